"""LeNet-300-100 (LeCun et al. 1998) as used by Frankle & Carbin 2019: Gaussian Glorot init."""

import math

from flax import nnx

from lottery.models.layers import Linear
from lottery.models.structure import chain

glorot_normal = nnx.initializers.glorot_normal()


class LeNet300100(nnx.Module):
    """784-300-100-10 fully connected network with ReLU; its three kernels are prunable."""

    prunable = ("fc1", "fc2", "out")
    convolves = False

    def __init__(self, input_shape, num_classes: int, *, rngs: nnx.Rngs,
                 hidden: tuple[int, ...] = (300, 100)):
        if (isinstance(hidden, str) or not isinstance(hidden, (list, tuple)) or len(hidden) != 2
                or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0
                           for n in hidden)):
            raise ValueError(f"model.hidden={hidden!r} must be the two hidden layers' widths, "
                             "positive integers, e.g. [300,100]")
        inputs = math.prod(input_shape)
        self.fc1 = Linear(inputs, hidden[0], kernel_init=glorot_normal, rngs=rngs)
        self.fc2 = Linear(hidden[0], hidden[1], kernel_init=glorot_normal, rngs=rngs)
        self.out = Linear(hidden[1], num_classes, kernel_init=glorot_normal, rngs=rngs)

    def __call__(self, x, *, train: bool = False, rngs: nnx.Rngs | None = None):
        x = x.reshape(x.shape[0], -1)
        x = nnx.relu(self.fc1(x))
        x = nnx.relu(self.fc2(x))
        return self.out(x)

    def structure(self):
        return chain(self, self.prunable)
