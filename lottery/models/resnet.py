"""ResNet-20/32/56 for CIFAR-10 (He et al. 2016, Section 4.2) as OpenLTH's `models/cifar_resnet.py`.

A 3x3 conv (16w filters) -> BN -> ReLU, then three stages of n = (depth - 2) / 6 basic blocks
with 16w, 32w, 64w filters (w = option `width`, default 1; OpenLTH's `cifar_resnet_D_W` is
`width = W / 16`); the first block of stages 2 and 3 has stride 2 and a 1x1 stride-2 conv + BN
projection shortcut as in OpenLTH (He et al.'s own CIFAR nets use the parameter-free zero-padding
shortcut, option A), the others the identity. Block: conv3x3 -> BN -> ReLU -> conv3x3 -> BN, add
the shortcut, ReLU. Then global average pool and a linear layer. Convs have no bias.

Initialisation as OpenLTH's defaults: Kaiming-normal kernels (untruncated, fan-in, gain
sqrt 2), batch-norm scale uniform in [0, 1), shift 0. Choices: the final linear's bias starts
at zero; batch norm momentum 0.9 / epsilon 1e-5 (PyTorch's defaults: its momentum 0.1 is
flax's 0.9); 3x3 convs pad 1 on each side (PyTorch's `padding=1`, so stride-2 windows align as
in OpenLTH, not as XLA's "SAME"). ResNet-20 has 272,474 parameters, equal to OpenLTH's test.
Prunable: every conv kernel (shortcut convs too) and the final linear.
"""

from flax import nnx

from lottery.models.layers import Conv, Linear
from lottery.models.structure import group

kaiming_normal = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")
bn_scale_uniform = nnx.initializers.uniform(1.0)


def _bn(features: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return nnx.BatchNorm(features, momentum=0.9, epsilon=1e-5, scale_init=bn_scale_uniform,
                         rngs=rngs)


def _conv(c_in: int, c_out: int, size: int, stride: int, rngs: nnx.Rngs) -> nnx.Conv:
    return Conv(c_in, c_out, (size, size), strides=stride, padding=size // 2,
                    use_bias=False, kernel_init=kaiming_normal, rngs=rngs)


class Block(nnx.Module):
    """Basic residual block; a 1x1 conv + BN shortcut when it downsamples."""

    def __init__(self, c_in: int, c_out: int, downsample: bool, *, rngs: nnx.Rngs):
        stride = 2 if downsample else 1
        self.conv1 = _conv(c_in, c_out, 3, stride, rngs)
        self.bn1 = _bn(c_out, rngs)
        self.conv2 = _conv(c_out, c_out, 3, 1, rngs)
        self.bn2 = _bn(c_out, rngs)
        if downsample:
            self.shortcut = _conv(c_in, c_out, 1, 2, rngs)
            self.shortcut_bn = _bn(c_out, rngs)
        else:
            self.shortcut = self.shortcut_bn = None

    def __call__(self, x, train: bool):
        average = not train
        out = nnx.relu(self.bn1(self.conv1(x), use_running_average=average))
        out = self.bn2(self.conv2(out), use_running_average=average)
        if self.shortcut is not None:
            x = self.shortcut_bn(self.shortcut(x), use_running_average=average)
        return nnx.relu(out + x)


class ResNet(nnx.Module):
    """CIFAR ResNet of `depth` = 6n + 2 layers; `width` multiplies the 16/32/64 filters."""

    depth: int = 0
    convolves = True

    def __init__(self, input_shape, num_classes: int, *, rngs: nnx.Rngs, width: int = 1):
        if len(input_shape) != 3:
            raise ValueError(f"its inputs (input_shape={tuple(input_shape)}) are not "
                             "images (height, width, channels): use an MLP "
                             "(model=lenet_300_100 or mnist1d_mlp)")
        if isinstance(width, bool) or not isinstance(width, int):
            raise TypeError(f"model.width={width!r} must be a positive integer")
        if width < 1:
            raise ValueError(f"model.width={width} must be a positive integer")
        blocks = (self.depth - 2) // 6
        filters = [16 * width, 32 * width, 64 * width]
        self.conv = _conv(input_shape[2], filters[0], 3, 1, rngs)
        self.bn = _bn(filters[0], rngs)
        channels = filters[0]
        for stage, out in enumerate(filters, start=1):
            stage_blocks = []
            for index in range(blocks):
                stage_blocks.append(Block(channels, out, stage > 1 and index == 0, rngs=rngs))
                channels = out
            setattr(self, f"stage{stage}", nnx.List(stage_blocks))
        self.fc = Linear(channels, num_classes, kernel_init=kaiming_normal, rngs=rngs)

    def __call__(self, x, *, train: bool = False, rngs: nnx.Rngs | None = None):
        x = nnx.relu(self.bn(self.conv(x), use_running_average=not train))
        for stage in (self.stage1, self.stage2, self.stage3):
            for block in stage:
                x = block(x, train)
        return self.fc(x.mean(axis=(1, 2)))

    def structure(self):
        """Per stage, the residual stream "stageS.stream": written by the stem conv + bn
        (stage 1) or the first block's shortcut conv + bn (stages 2, 3) and by every block's
        conv2 + bn2, read by every block's conv1, the next stage's first conv1 and shortcut,
        or the fc. Per block, the channels of conv1 + bn1, read by conv2 ("stageS.i.conv1")."""
        stages = [[f"stage{s}.{i}" for i in range(len(getattr(self, f"stage{s}")))]
                  for s in (1, 2, 3)]
        groups = []
        for s, blocks in enumerate(stages, start=1):
            writers = ["conv", "bn"] if s == 1 else [f"{blocks[0]}.shortcut",
                                                     f"{blocks[0]}.shortcut_bn"]
            writers += [f"{b}.{leaf}" for b in blocks for leaf in ("conv2", "bn2")]
            readers = [f"{b}.conv1" for b in (blocks if s == 1 else blocks[1:])]
            readers += [f"{stages[s][0]}.conv1", f"{stages[s][0]}.shortcut"] if s < 3 else ["fc"]
            groups.append(group(self, f"stage{s}.stream", writers, readers))
            groups += [group(self, f"{b}.conv1", [f"{b}.conv1", f"{b}.bn1"], [f"{b}.conv2"])
                       for b in blocks]
        return tuple(groups)


def _prunable(depth: int) -> tuple[str, ...]:
    """Every conv (the stem, two per block, the shortcuts of stages 2 and 3), then the fc."""
    paths = ["conv"]
    for stage in (1, 2, 3):
        for index in range((depth - 2) // 6):
            paths += [f"stage{stage}.{index}.conv1", f"stage{stage}.{index}.conv2"]
            if stage > 1 and index == 0:
                paths.append(f"stage{stage}.{index}.shortcut")
    return (*paths, "fc")


class ResNet20(ResNet):
    depth = 20
    prunable = _prunable(20)


class ResNet32(ResNet):
    depth = 32
    prunable = _prunable(32)


class ResNet56(ResNet):
    depth = 56
    prunable = _prunable(56)
