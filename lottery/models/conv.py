"""Conv-2, Conv-4 and Conv-6 of Frankle & Carbin 2019 (Figure 2 and the CIFAR-10 appendix).

Scaled-down VGG: pairs of 3x3 SAME convolutions (64,64 | 128,128 | 256,256), each pair followed
by a 2x2 max pool, then fully connected 256, 256, num_classes; ReLU; Gaussian Glorot kernels
and zero biases, as in the paper and in uber-research/deconstructing-lottery-tickets
(`network_builders.py`, a faithful TensorFlow reimplementation). Option `dropout` is applied
after each hidden FC layer (the paper's dropout experiments use 0.5); default 0.0, no dropout.
All conv and FC kernels are prunable.

Weights on 32x32x3: Conv-2 4,300,992 and Conv-4 2,425,024 (paper: 4.3M, 2.4M). Conv-6 has
2,261,184 (1,144,512 in the convs), while Figure 2 prints "1.7M" total / "1.1M" conv. The conv
count matches the figure; the architecture as the paper describes it (and as Uber's code builds
it: dense 4*4*256 -> 256) cannot give 1.7M without breaking Conv-2 and Conv-4, which match
exactly, so the printed total is taken as a typo and the described layout is followed.
"""

import itertools

from flax import nnx

from lottery.models.layers import Conv, Linear
from lottery.models.structure import chain

glorot_normal = nnx.initializers.glorot_normal()


class ConvNet(nnx.Module):
    """`len(filters)` 3x3 convs, a max pool after every second one, then FC 256, 256, out."""

    filters: tuple[int, ...] = ()
    convolves = True

    def __init__(self, input_shape, num_classes: int, *, rngs: nnx.Rngs, dropout: float = 0.0):
        if len(input_shape) != 3:
            raise ValueError(f"its inputs (input_shape={tuple(input_shape)}) are not "
                             "images (height, width, channels): use an MLP "
                             "(model=lenet_300_100 or mnist1d_mlp)")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
            raise TypeError(f"model.dropout={dropout!r} must be a number in [0, 1)")
        if not 0 <= dropout < 1:
            raise ValueError(f"model.dropout={dropout} must be in [0, 1)")
        height, width, channels = input_shape
        pools = len(self.filters) // 2
        height, width = height // 2**pools, width // 2**pools
        if height < 1 or width < 1:
            raise ValueError(f"its inputs (input_shape={tuple(input_shape)}) are too small "
                             f"for its {pools} 2x2 max pools: use larger images or a smaller model")
        sizes = (channels, *self.filters)
        self.convs = nnx.List([
            Conv(c_in, c_out, (3, 3), padding="SAME", kernel_init=glorot_normal, rngs=rngs)
            for c_in, c_out in itertools.pairwise(sizes)])
        self.fc1 = Linear(height * width * self.filters[-1], 256, kernel_init=glorot_normal,
                          rngs=rngs)
        self.fc2 = Linear(256, 256, kernel_init=glorot_normal, rngs=rngs)
        self.out = Linear(256, num_classes, kernel_init=glorot_normal, rngs=rngs)
        self.dropout = nnx.Dropout(float(dropout))

    def __call__(self, x, *, train: bool = False, rngs: nnx.Rngs | None = None):
        for index, conv in enumerate(self.convs):
            x = nnx.relu(conv(x))
            if index % 2 == 1:
                x = nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        x = self.dropout(nnx.relu(self.fc1(x)), deterministic=not train, rngs=rngs)
        x = self.dropout(nnx.relu(self.fc2(x)), deterministic=not train, rngs=rngs)
        return self.out(x)

    def structure(self):
        """Every conv's channels (the last one's read by fc1 through the flatten), then
        the neurons of fc1 and fc2."""
        return chain(self, self.prunable)


def _prunable(convs: int) -> tuple[str, ...]:
    return (*(f"convs.{index}" for index in range(convs)), "fc1", "fc2", "out")


class Conv2(ConvNet):
    filters = (64, 64)
    prunable = _prunable(2)


class Conv4(ConvNet):
    filters = (64, 64, 128, 128)
    prunable = _prunable(4)


class Conv6(ConvNet):
    filters = (64, 64, 128, 128, 256, 256)
    prunable = _prunable(6)
