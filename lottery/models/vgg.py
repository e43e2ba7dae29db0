"""VGG-11/16/19 for CIFAR-10 as OpenLTH's `models/cifar_vgg.py` (facebookresearch/open_lth).

Configurations A/D/E of Simonyan & Zisserman 2015 with the last max pool dropped: each entry a
3x3 SAME conv (with bias) -> batch norm -> ReLU, a 2x2 max pool between stages; then average
pooling and one linear 512 -> num_classes (no hidden FC layers). Initialisation as OpenLTH's
defaults: Kaiming-normal kernels (untruncated, fan-in, gain sqrt 2 = PyTorch's
`kaiming_normal_`), batch-norm scale uniform in [0, 1) and shift 0 (`batchnorm_init=uniform`).

Choices: biases start at zero (PyTorch's default uniform bias init is not reproduced); batch
norm momentum 0.9 / epsilon 1e-5 (PyTorch's defaults: its momentum 0.1 is flax's 0.9); the
average pool is global, which on 32x32 inputs is exactly OpenLTH's `AvgPool2d(2)` over the
final 2x2 map and keeps the linear 512 -> num_classes on other input sizes. Parameter totals
equal OpenLTH's tests (VGG-11 9,231,114; VGG-16 14,728,266; VGG-19 20,040,522 for 10 classes).
Every conv kernel and the final linear are prunable (OpenLTH's VGG preset leaves `fc` unpruned:
do the same in a preset).
"""

from flax import nnx

from lottery.models.layers import Conv, Linear
from lottery.models.structure import group

kaiming_normal = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")
bn_scale_uniform = nnx.initializers.uniform(1.0)


class ConvBN(nnx.Module):
    """3x3 SAME conv -> batch norm -> ReLU."""

    def __init__(self, c_in: int, c_out: int, *, rngs: nnx.Rngs):
        self.conv = Conv(c_in, c_out, (3, 3), padding="SAME", kernel_init=kaiming_normal,
                             rngs=rngs)
        self.bn = nnx.BatchNorm(c_out, momentum=0.9, epsilon=1e-5, scale_init=bn_scale_uniform,
                                rngs=rngs)

    def __call__(self, x, train: bool):
        return nnx.relu(self.bn(self.conv(x), use_running_average=not train))


class VGG(nnx.Module):
    """The convs of `plan` ("M" a 2x2 max pool), global average pool, linear."""

    plan: tuple = ()
    convolves = True

    def __init__(self, input_shape, num_classes: int, *, rngs: nnx.Rngs):
        if len(input_shape) != 3:
            raise ValueError(f"its inputs (input_shape={tuple(input_shape)}) are not "
                             "images (height, width, channels): use an MLP "
                             "(model=lenet_300_100 or mnist1d_mlp)")
        pools = self.plan.count("M")
        if min(input_shape[:2]) < 2**pools:
            raise ValueError(f"its inputs (input_shape={tuple(input_shape)}) are too small "
                             f"for its {pools} 2x2 max pools: use larger images or a smaller model")
        layers, channels = [], input_shape[2]
        for spec in self.plan:
            if spec != "M":
                layers.append(ConvBN(channels, spec, rngs=rngs))
                channels = spec
        self.layers = nnx.List(layers)
        self.fc = Linear(channels, num_classes, kernel_init=kaiming_normal, rngs=rngs)

    def __call__(self, x, *, train: bool = False, rngs: nnx.Rngs | None = None):
        layers = iter(self.layers)
        for spec in self.plan:
            if spec == "M":
                x = nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2))
            else:
                x = next(layers)(x, train)
        return self.fc(x.mean(axis=(1, 2)))

    def structure(self):
        """Each conv's channels (with its batch norm), read by the next conv or the fc."""
        paths = [f"layers.{index}" for index in range(len(self.layers))]
        readers = [f"{path}.conv" for path in paths[1:]] + ["fc"]
        return tuple(group(self, f"{path}.conv", [f"{path}.conv", f"{path}.bn"], [reader])
                     for path, reader in zip(paths, readers))


def _prunable(plan) -> tuple[str, ...]:
    convs = sum(spec != "M" for spec in plan)
    return (*(f"layers.{index}.conv" for index in range(convs)), "fc")


class VGG11(VGG):
    plan = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512)
    prunable = _prunable(plan)


class VGG16(VGG):
    plan = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
    prunable = _prunable(plan)


class VGG19(VGG):
    plan = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
            512, 512, 512, 512)
    prunable = _prunable(plan)
