"""Analysis of records: tables and plots (reads records; the core never imports it)."""
