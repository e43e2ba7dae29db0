"""lottery: lottery-ticket and pruning research on JAX, Flax nnx, Optax, Hydra and W&B."""

import jax

# JAX's default "partitionable" threefry compiles every random draw about 8x slower on CPU
# (2.5 s vs 0.3 s for one conv kernel's init, measured with jax 0.10.2), which made a
# ResNet's jitted init take tens of seconds. Our draws are per member (vmapped, sharded
# along the member axis), so the partitionable layout buys nothing. Set once, on import,
# so every key in a run uses the same bits.
jax.config.update("jax_threefry_partitionable", False)

__version__ = "0.1.0"
