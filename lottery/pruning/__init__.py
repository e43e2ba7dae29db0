"""Masks, scores and the pruning of one level."""
