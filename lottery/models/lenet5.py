"""LeNet-5 (LeCun et al. 1998) and LeNet-5-Caffe (SNIP, Lee et al. 2019; GraSP, Wang et al. 2020).

`LeNet5` is the layout pruning papers use on 28x28 MNIST: conv 6@5x5 (SAME, standing in for
the original 32x32 padding) -> maxpool 2 -> conv 16@5x5 (VALID) -> maxpool 2 -> fc 120 -> fc 84
-> out, ReLU; 61,470 weights (61,706 parameters) on MNIST, "~60K" in the papers.

`LeNet5Caffe` is Caffe's MNIST LeNet (`examples/mnist/lenet_train_test.prototxt`): conv 20@5x5
-> maxpool 2 -> conv 50@5x5 -> maxpool 2 -> fc 500 -> out, all VALID; 430,500 weights, 431,080
parameters on MNIST ("431K"). Caffe's prototxt has a ReLU only after fc 500; we follow the
PyTorch ports used with SNIP/GraSP (e.g. mi-lad/snip), which also put one after each conv.

Choice: Gaussian Glorot kernels and zero biases, as the repo's LeNet-300-100 and SNIP's
variance-scaling initialisation. Every conv and dense kernel is prunable.
"""

import math

from flax import nnx

from lottery.models.layers import Conv, Linear
from lottery.models.structure import chain

glorot_normal = nnx.initializers.glorot_normal()


def _pooled(size: int, kernel: int, input_shape) -> int:
    """Spatial size after a VALID `kernel` conv and a 2x2 max pool; errors if nothing is left."""
    size = (size - kernel + 1) // 2
    if size < 1:
        raise ValueError(f"its inputs (input_shape={tuple(input_shape)}) are too small "
                         "for its 5x5 convs and 2x2 max pools: use larger images or a smaller "
                         "model")
    return size


def _image(input_shape) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(f"its inputs (input_shape={tuple(input_shape)}) are not "
                         "images (height, width, channels): use an MLP "
                         "(model=lenet_300_100 or mnist1d_mlp)")
    return tuple(input_shape)


def _pool(x):
    return nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2))


class LeNet5(nnx.Module):
    """conv 6@5x5 SAME, pool, conv 16@5x5 VALID, pool, fc 120, fc 84, out (ReLU)."""

    prunable = ("conv1", "conv2", "fc1", "fc2", "out")
    convolves = True

    def __init__(self, input_shape, num_classes: int, *, rngs: nnx.Rngs):
        height, width, channels = _image(input_shape)
        height, width = (_pooled(height // 2, 5, input_shape), _pooled(width // 2, 5, input_shape))
        self.conv1 = Conv(channels, 6, (5, 5), padding="SAME", kernel_init=glorot_normal,
                              rngs=rngs)
        self.conv2 = Conv(6, 16, (5, 5), padding="VALID", kernel_init=glorot_normal,
                              rngs=rngs)
        self.fc1 = Linear(height * width * 16, 120, kernel_init=glorot_normal, rngs=rngs)
        self.fc2 = Linear(120, 84, kernel_init=glorot_normal, rngs=rngs)
        self.out = Linear(84, num_classes, kernel_init=glorot_normal, rngs=rngs)

    def __call__(self, x, *, train: bool = False, rngs: nnx.Rngs | None = None):
        x = _pool(nnx.relu(self.conv1(x)))
        x = _pool(nnx.relu(self.conv2(x)))
        x = x.reshape(x.shape[0], -1)
        x = nnx.relu(self.fc1(x))
        x = nnx.relu(self.fc2(x))
        return self.out(x)

    def structure(self):
        return chain(self, self.prunable)


class LeNet5Caffe(nnx.Module):
    """conv 20@5x5, pool, conv 50@5x5, pool, fc 500, out (all VALID, ReLU)."""

    prunable = ("conv1", "conv2", "fc1", "out")
    convolves = True

    def __init__(self, input_shape, num_classes: int, *, rngs: nnx.Rngs):
        height, width, channels = _image(input_shape)
        for _ in range(2):
            height, width = _pooled(height, 5, input_shape), _pooled(width, 5, input_shape)
        self.conv1 = Conv(channels, 20, (5, 5), padding="VALID", kernel_init=glorot_normal,
                              rngs=rngs)
        self.conv2 = Conv(20, 50, (5, 5), padding="VALID", kernel_init=glorot_normal,
                              rngs=rngs)
        self.fc1 = Linear(math.prod((height, width, 50)), 500, kernel_init=glorot_normal,
                          rngs=rngs)
        self.out = Linear(500, num_classes, kernel_init=glorot_normal, rngs=rngs)

    def __call__(self, x, *, train: bool = False, rngs: nnx.Rngs | None = None):
        x = _pool(nnx.relu(self.conv1(x)))
        x = _pool(nnx.relu(self.conv2(x)))
        x = x.reshape(x.shape[0], -1)
        x = nnx.relu(self.fc1(x))
        return self.out(x)

    def structure(self):
        return chain(self, self.prunable)
