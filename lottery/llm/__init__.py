"""One-shot pruning of pretrained language models, one linear layer at a time.

  rules.py   the per-layer rules, pure and jittable: the calibration statistics of a
             layer's inputs (token count, Gram matrix Σxᵀx, per-feature Σx²), magnitude,
             Wanda and SparseGPT (unstructured or N:M), exact counts per comparison group
             with random tie-breaking, and the layer-wise reconstruction error
"""
