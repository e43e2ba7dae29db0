"""ResNet-18 and ResNet-50 for ImageNet (He et al. 2016, Table 1) in torchvision's layout.

A 7x7 stride-2 conv (64w filters) -> BN -> ReLU -> 3x3 stride-2 max pool (padding 1), then
four stages of 64w, 128w, 256w, 512w "planes" (w = option `width`, default 1): ResNet-18 has
[2, 2, 2, 2] basic blocks (conv3x3 -> BN -> ReLU -> conv3x3 -> BN), ResNet-50 [3, 4, 6, 3]
bottlenecks (conv1x1 -> BN -> ReLU -> conv3x3 -> BN -> ReLU -> conv1x1 to 4x the planes ->
BN), each adding its shortcut, then ReLU. Stages 2-4 downsample in their first block, a
bottleneck on its 3x3 conv (torchvision's "v1.5"; the paper strides the first 1x1). The
shortcut is the identity, or a 1x1 conv + BN projection (He et al.'s option B) where the
shape changes: every stage's first block but ResNet-18's first. Then global average pool
and a linear layer. Convs have no bias and pad as PyTorch (7x7: 3, 3x3: 1, 1x1: 0 on each
side; the pool's padding counts as -inf), so stride-2 windows align as in torchvision, not
as XLA's "SAME". Inputs of any size work (224x224 ends in 7x7 maps, 32x32 in 1x1). At 224 x
224 x 3 and 1000 classes: 11,689,512 and 25,557,032 parameters, torchvision's counts.

Initialisation follows torchvision (`torchvision.models.resnet`), not OpenLTH's defaults that
the CIFAR ResNets (`resnet.py`) follow: Kaiming-normal conv kernels on the *fan-out* (gain
sqrt 2, untruncated), batch-norm scale 1 and shift 0, and the linear layer as PyTorch's
`nn.Linear` (kernel and bias uniform in +-1/sqrt(fan-in)). Option `zero_init_residual`
(torchvision's, default false) starts each block's last batch-norm scale at zero, so that
every block starts as its shortcut. As the CIFAR ResNets: batch norm momentum 0.9 / epsilon
1e-5 (PyTorch's defaults), the project's `Conv` / `Linear` (their CPU-path gradients).
Prunable: every conv kernel (shortcuts and the stem too) and the final linear.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from lottery.models.layers import Conv, Linear
from lottery.models.structure import group

kaiming_fan_out = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
torch_linear_kernel = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
BASE = (64, 128, 256, 512)  # the stages' planes at width 1


def _torch_linear_bias(fan_in: int):
    bound = 1 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype,
                                                                    -bound, bound)


def _bn(features: int, rngs: nnx.Rngs, zero: bool = False) -> nnx.BatchNorm:
    scale = nnx.initializers.zeros_init() if zero else nnx.initializers.ones_init()
    return nnx.BatchNorm(features, momentum=0.9, epsilon=1e-5, scale_init=scale, rngs=rngs)


def _conv(c_in: int, c_out: int, size: int, stride: int, rngs: nnx.Rngs) -> nnx.Conv:
    return Conv(c_in, c_out, (size, size), strides=stride, padding=size // 2,
                use_bias=False, kernel_init=kaiming_fan_out, rngs=rngs)


class _Block(nnx.Module):
    """The shortcut (1x1 conv + BN where the shape changes) shared by both block kinds."""

    expansion = 1
    convs = 2  # conv1 .. convN on the main path; bnN is the one `zero_init_residual` zeroes

    def _shortcut(self, c_in: int, c_out: int, stride: int, rngs: nnx.Rngs):
        if stride != 1 or c_in != c_out:
            self.shortcut = _conv(c_in, c_out, 1, stride, rngs)
            self.shortcut_bn = _bn(c_out, rngs)
        else:
            self.shortcut = self.shortcut_bn = None

    def _add(self, out, x, average: bool):
        if self.shortcut is not None:
            x = self.shortcut_bn(self.shortcut(x), use_running_average=average)
        return nnx.relu(out + x)


class BasicBlock(_Block):
    """conv3x3 (stride) -> BN -> ReLU -> conv3x3 -> BN, + shortcut, ReLU."""

    def __init__(self, c_in: int, planes: int, stride: int, zero: bool, *, rngs: nnx.Rngs):
        self.conv1 = _conv(c_in, planes, 3, stride, rngs)
        self.bn1 = _bn(planes, rngs)
        self.conv2 = _conv(planes, planes, 3, 1, rngs)
        self.bn2 = _bn(planes, rngs, zero)
        self._shortcut(c_in, planes, stride, rngs)

    def __call__(self, x, train: bool):
        average = not train
        out = nnx.relu(self.bn1(self.conv1(x), use_running_average=average))
        return self._add(self.bn2(self.conv2(out), use_running_average=average), x, average)


class Bottleneck(_Block):
    """conv1x1 -> BN -> ReLU -> conv3x3 (stride) -> BN -> ReLU -> conv1x1 (4x planes) -> BN,
    + shortcut, ReLU."""

    expansion = 4
    convs = 3

    def __init__(self, c_in: int, planes: int, stride: int, zero: bool, *, rngs: nnx.Rngs):
        self.conv1 = _conv(c_in, planes, 1, 1, rngs)
        self.bn1 = _bn(planes, rngs)
        self.conv2 = _conv(planes, planes, 3, stride, rngs)
        self.bn2 = _bn(planes, rngs)
        self.conv3 = _conv(planes, 4 * planes, 1, 1, rngs)
        self.bn3 = _bn(4 * planes, rngs, zero)
        self._shortcut(c_in, 4 * planes, stride, rngs)

    def __call__(self, x, train: bool):
        average = not train
        out = nnx.relu(self.bn1(self.conv1(x), use_running_average=average))
        out = nnx.relu(self.bn2(self.conv2(out), use_running_average=average))
        return self._add(self.bn3(self.conv3(out), use_running_average=average), x, average)


def _width(width) -> float:
    """`width` checked: a positive number with 64 * width whole (each stage's channels)."""
    if isinstance(width, bool) or not isinstance(width, (int, float)):
        raise TypeError(f"model.width={width!r} must be a positive number")
    if width <= 0 or not float(64 * width).is_integer():
        raise ValueError(f"model.width={width} must be a positive number with 64 * width a "
                         "whole number (64 * width channels in the first stage; e.g. 0.125 "
                         "for 8)")
    return width


class ImageNetResNet(nnx.Module):
    """An ImageNet ResNet of `blocks` per stage of `block`; `width` multiplies the
    64/128/256/512 planes (a fraction shrinks them: 0.125 gives 8/16/32/64)."""

    block: type[_Block] = BasicBlock
    blocks: tuple[int, ...] = ()
    convolves = True

    def __init__(self, input_shape, num_classes: int, *, rngs: nnx.Rngs, width: float = 1,
                 zero_init_residual: bool = False):
        if len(input_shape) != 3:
            raise ValueError(f"its inputs (input_shape={tuple(input_shape)}) are not "
                             "images (height, width, channels): use an MLP "
                             "(model=lenet_300_100 or mnist1d_mlp)")
        if not isinstance(zero_init_residual, bool):
            raise TypeError(f"model.zero_init_residual={zero_init_residual!r} must be true "
                            "or false")
        planes = [int(base * _width(width)) for base in BASE]
        self.conv = _conv(input_shape[2], planes[0], 7, 2, rngs)
        self.bn = _bn(planes[0], rngs)
        channels = planes[0]
        for stage, (count, plane) in enumerate(zip(self.blocks, planes), start=1):
            stage_blocks = []
            for index in range(count):
                stride = 2 if stage > 1 and index == 0 else 1
                stage_blocks.append(self.block(channels, plane, stride, zero_init_residual,
                                               rngs=rngs))
                channels = plane * self.block.expansion
            setattr(self, f"stage{stage}", nnx.List(stage_blocks))
        self.fc = Linear(channels, num_classes, kernel_init=torch_linear_kernel,
                         bias_init=_torch_linear_bias(channels), rngs=rngs)

    def __call__(self, x, *, train: bool = False, rngs: nnx.Rngs | None = None):
        x = self.stem(x, train)
        for stage in self._stages():
            for block in stage:
                x = block(x, train)
        return self.fc(x.mean(axis=(1, 2)))

    def stem(self, x, train: bool):
        """7x7 stride-2 conv -> BN -> ReLU -> 3x3 stride-2 max pool: a quarter of the size."""
        x = nnx.relu(self.bn(self.conv(x), use_running_average=not train))
        return nnx.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

    def _stages(self):
        return [getattr(self, f"stage{s}") for s in range(1, len(self.blocks) + 1)]

    def structure(self):
        """Per stage, the residual stream "stageS.stream": written by the first block's
        shortcut conv + bn (or, where that block has none, by whatever wrote the stream
        before it: ResNet-18's stage 1 continues the stem's "conv") and by every block's last
        conv + bn, read by every later block's conv1, the next stage's first conv1 and
        shortcut, or the fc. ResNet-50's stem is a group of its own ("conv", read by stage
        1's first conv1 and shortcut). Per block, the channels of each inner conv + bn, read
        by the next conv ("stageS.i.conv1"; a bottleneck's "stageS.i.conv2" too)."""
        names = [[f"stage{s}.{i}" for i in range(count)]
                 for s, count in enumerate(self.blocks, start=1)]
        last = self.block.convs
        groups = []
        name, writers, readers = "conv", ["conv", "bn"], []
        for s, blocks in enumerate(names, start=1):
            first = getattr(self, f"stage{s}")[0]
            if first.shortcut is not None:  # a new stream starts: close the one before
                readers += [f"{blocks[0]}.conv1", f"{blocks[0]}.shortcut"]
                groups.append(group(self, name, writers, readers))
                name = f"stage{s}.stream"
                writers, readers = [f"{blocks[0]}.shortcut", f"{blocks[0]}.shortcut_bn"], []
            else:  # the stream goes on into this stage: its first block reads it too
                name = f"stage{s}.stream"
                readers.append(f"{blocks[0]}.conv1")
            writers += [f"{b}.{leaf}{last}" for b in blocks for leaf in ("conv", "bn")]
            readers += [f"{b}.conv1" for b in blocks[1:]]
            for b in blocks:
                groups += [group(self, f"{b}.conv{i}", [f"{b}.conv{i}", f"{b}.bn{i}"],
                                 [f"{b}.conv{i + 1}"]) for i in range(1, last)]
        groups.append(group(self, name, writers, readers + ["fc"]))
        return tuple(groups)


def _prunable(block: type[_Block], blocks) -> tuple[str, ...]:
    """Every conv (the stem, the blocks' convs, the projection shortcuts), then the fc."""
    paths = ["conv"]
    channels = BASE[0]
    for stage, (count, plane) in enumerate(zip(blocks, BASE), start=1):
        for index in range(count):
            paths += [f"stage{stage}.{index}.conv{i}" for i in range(1, block.convs + 1)]
            stride = 2 if stage > 1 and index == 0 else 1
            if stride != 1 or channels != plane * block.expansion:
                paths.append(f"stage{stage}.{index}.shortcut")
            channels = plane * block.expansion
    return (*paths, "fc")


class ResNet18(ImageNetResNet):
    block = BasicBlock
    blocks = (2, 2, 2, 2)
    prunable = _prunable(BasicBlock, (2, 2, 2, 2))


class ResNet50(ImageNetResNet):
    block = Bottleneck
    blocks = (3, 4, 6, 3)
    prunable = _prunable(Bottleneck, (3, 4, 6, 3))
