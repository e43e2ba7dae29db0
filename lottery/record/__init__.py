"""The run folder: written and read here only.

    record.jsonl                  the rows, as they happen (`rows`: JsonlSink, read_rows, load)
    levels/level_NN.npz, levels/level_NN_<branch>.npz, rewind.npz, levels/trained_NN.npz
                                  masks and weights (`arrays`: save_arrays, load_arrays)
    wandb_summary.json            the W&B summary run was logged (`wandb_sink`)
    checkpoints/                  `lottery.checkpoint`

The engine, analysis, notebooks, experiments and `lottery lm` read and write these files
through this package; `tables` turns summary rows into the summary table. Nothing here
imports `lottery.analysis`: figures are drawn by the entry points and handed to
`wandb_summary`.
"""

from lottery.record.arrays import (LEVELS, REWIND, level_file, load_arrays, rewind_file,
                                   save_arrays, saved_levels, trained_file)
from lottery.record.rows import (INTEGER_COLUMNS, RECORD_NAME, JsonlSink, Record, load,
                                 of_kind, read_rows, recorded_rows, rows_frame, run_dirs)
from lottery.record.tables import diverged, left_out, markdown_table, summary_table
from lottery.record.wandb_sink import SUMMARY_LOGGED, WandbSink, wandb_summary

__all__ = ["INTEGER_COLUMNS", "LEVELS", "RECORD_NAME", "REWIND", "SUMMARY_LOGGED", "JsonlSink",
           "Record", "WandbSink", "diverged", "left_out", "level_file", "load", "load_arrays",
           "markdown_table", "of_kind", "read_rows", "recorded_rows", "rewind_file",
           "rows_frame", "run_dirs", "save_arrays", "saved_levels", "summary_table",
           "trained_file", "wandb_summary"]
