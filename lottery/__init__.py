"""lottery: lottery-ticket and pruning research on JAX, Flax nnx, Optax, Hydra and W&B."""

__version__ = "0.1.0"
