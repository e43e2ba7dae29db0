"""The MNIST-1D MLP of Greydanus & Kobak 2020 (greydanus/mnist1d, `notebooks/models.py` MLPBase).

40 inputs -> `hidden` -> `hidden` -> num_classes with ReLU, `hidden=100` by default (the
paper's lottery-ticket notebook uses 500). As in the reference, the second hidden layer is
residual, `h = h + relu(linear2(h))`; option `residual=False` gives the plain MLP. Initialised
as PyTorch's `nn.Linear` (the reference's framework): kernels and biases uniform in
+-1/sqrt(fan_in). The three kernels are prunable.
"""

import math

import jax
from flax import nnx

from lottery.models.layers import Linear
from lottery.models.structure import chain, group

torch_kernel = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def _torch_bias(fan_in: int):
    bound = 1 / math.sqrt(fan_in)

    def init(key, shape, dtype=jax.numpy.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def _linear(n_in: int, n_out: int, rngs: nnx.Rngs) -> nnx.Linear:
    return Linear(n_in, n_out, kernel_init=torch_kernel, bias_init=_torch_bias(n_in),
                  rngs=rngs)


class MNIST1DMLP(nnx.Module):
    """inputs -> hidden -> hidden (residual) -> num_classes, ReLU."""

    prunable = ("fc1", "fc2", "out")
    convolves = False

    def __init__(self, input_shape, num_classes: int, *, rngs: nnx.Rngs, hidden: int = 100,
                 residual: bool = True):
        if isinstance(hidden, bool) or not isinstance(hidden, int):
            raise TypeError(f"model.hidden={hidden!r} must be a positive integer")
        if hidden < 1:
            raise ValueError(f"model.hidden={hidden} must be a positive integer")
        if not isinstance(residual, bool):
            raise TypeError(f"model.residual={residual!r} must be true or false")
        self.residual = residual
        self.fc1 = _linear(math.prod(input_shape), hidden, rngs)
        self.fc2 = _linear(hidden, hidden, rngs)
        self.out = _linear(hidden, num_classes, rngs)

    def __call__(self, x, *, train: bool = False, rngs: nnx.Rngs | None = None):
        h = nnx.relu(self.fc1(x.reshape(x.shape[0], -1)))
        update = nnx.relu(self.fc2(h))
        h = h + update if self.residual else update
        return self.out(h)

    def structure(self):
        """With the residual, fc1 and fc2 both write the hidden stream `h` that fc2 and out
        read: one group "stream"; without it, the neurons of fc1 and of fc2."""
        if self.residual:
            return (group(self, "stream", ["fc1", "fc2"], ["fc2", "out"]),)
        return chain(self, self.prunable)
