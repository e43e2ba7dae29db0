"""The GPU check: what the engine reaches on this machine's accelerator, ready to run.

    lottery-bench --section gpu [--precision bf16]

trains, with the engine's own `Trainer` on synthetic data resident on the devices (no input
pipeline: `--section input` measures that), ResNet-20 on CIFAR-shaped 32x32x3 images with
a stack of 1, 4 and 16 members (batch 128 each, members spread over the devices), then
ResNet-50 at 224 px as one data-parallel member (batch 64 per device, `train.mesh.data`
over every device). For each it prints images/s (members x batch x steps per second), the
fraction of the device's peak (XLA's own FLOP count of the compiled step against the
`PEAKS` table; blank for a device not listed), and the peak device memory. On a CPU it runs
the same code tiny (narrow models, small inputs, few steps) and says that its numbers are
not GPU numbers.
"""

import resource
import time
from dataclasses import dataclass

# dense peak TFLOP/s by device kind and precision (vendor data sheets; fp32 matmuls run as
# TF32 on tensor cores by XLA's default precision)
PEAKS = {"NVIDIA H100 80GB HBM3": {"fp32": 494.7, "bf16": 989.4},
         "NVIDIA H200": {"fp32": 494.7, "bf16": 989.4},
         "NVIDIA A100-SXM4-80GB": {"fp32": 156.0, "bf16": 312.0},
         "NVIDIA A100-SXM4-40GB": {"fp32": 156.0, "bf16": 312.0}}


@dataclass(frozen=True)
class Case:
    name: str
    model: str
    shape: tuple[int, int, int]
    members: int
    batch: int  # per member: the whole batch, split over `data` devices when data-parallel
    options: dict


def cases(devices: int, on_gpu: bool) -> list[Case]:
    """Full size on a GPU; on a CPU narrow models on small inputs."""
    if on_gpu:
        return [*(Case(f"resnet20 x{m}", "resnet20", (32, 32, 3), m, 128, {}) for m in (1, 4, 16)),
                Case("resnet50 224px data-parallel", "resnet50", (224, 224, 3), 1,
                     64 * devices, {})]
    return [*(Case(f"resnet20 x{m} (tiny)", "resnet20", (8, 8, 3), m, 8, {}) for m in (1, 4)),
            Case("resnet50 (tiny: width 1/8, 32px)", "resnet50", (32, 32, 3), 1,
                 4 * devices, {"width": 0.125})]


def measure(case: Case, steps: int, repeats: int, precision: str) -> dict:
    """Images/s (median of `repeats` calls of `steps` steps), FLOP per image and peak memory."""
    import jax
    import numpy as np

    from lottery.data.synthetic import load_synthetic
    from lottery.models import build_model
    from lottery.optim import build_optimizer
    from lottery.pruning.masks import full_masks
    from lottery.state import Network
    from lottery.train import Trainer

    classes = 1000 if case.model == "resnet50" else 10
    data = load_synthetic(shape=case.shape, num_classes=classes, train_size=2 * case.batch,
                          validation_size=1, test_size=1)
    model = build_model(case.model, case.shape, classes, **case.options)
    trainer = Trainer(model, build_optimizer("sgd", 0.1, steps_per_epoch=1, momentum=0.9), data,
                      case.batch, steps, case.members, precision=precision)
    keys = jax.random.split(jax.random.key(0), trainer.padded_size)
    network = Network(*jax.jit(jax.vmap(model.init), out_shardings=trainer.stacked)(keys))
    masks = jax.jit(jax.vmap(full_masks), out_shardings=trainer.stacked)(network.params)
    state = trainer.start(network, masks)
    keys = jax.device_put(jax.random.key_data(keys), trainer.stacked)
    state, loss = trainer.train_chunk(state, keys, 0)  # compiles
    loss.block_until_ready()
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        state, loss = trainer.train_chunk(state, keys, (i + 1) * steps)
        loss.block_until_ready()
        times.append(time.perf_counter() - start)
    images = case.members * case.batch * steps
    flops = _flops(trainer, state, keys)
    return {"case": case.name, "mesh": str(trainer.shape), "images_per_s":
            images / float(np.median(times)), "flop_per_s": None if flops is None
            else flops / float(np.median(times)), "peak_memory_gb": _peak_memory(jax.devices())}


def _flops(trainer, state, keys) -> float | None:
    """XLA's FLOP count of one compiled chunk (every device's share), or None if unknown."""
    import numpy as np

    try:
        compiled = trainer._train.lower(*state, keys, np.int32(0), trainer.train_data,
                                        {"lr": np.float32(0.0)}).compile()
        analysis = compiled.cost_analysis()
        analysis = analysis[0] if isinstance(analysis, list) else analysis
        return float(analysis["flops"]) * len(trainer.mesh.devices.flat)
    except Exception:  # noqa: BLE001  cost analysis is best effort on every backend
        return None


def _peak_memory(devices) -> float:
    """The largest peak device memory in GB, or this process's peak RSS where the backend
    keeps no statistics (CPU)."""
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in devices]
    if max(peaks, default=0):
        return max(peaks) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def run(precision: str = "fp32", steps: int | None = None, repeats: int = 3) -> None:
    from lottery import platform

    platform.configure()
    import jax

    devices = jax.devices()
    on_gpu = devices[0].platform == "gpu"
    steps = steps or (20 if on_gpu else 2)
    kind = devices[0].device_kind
    peak = PEAKS.get(kind, {}).get(precision)
    print(f"GPU check: {len(devices)} x {kind} ({devices[0].platform}), {precision}, "
          f"median of {repeats} calls of {steps} steps")
    if not on_gpu:
        print("not a GPU: tiny models and inputs, so these are not GPU numbers")
    print(f"{'case':<34} {'mesh':<22} {'images/s':>10} {'of peak':>8} {'peak GB':>8}")
    for case in cases(len(devices), on_gpu):
        row = measure(case, steps, repeats, precision)
        share = ("" if peak is None or row["flop_per_s"] is None
                 else f"{row['flop_per_s'] / (peak * 1e12 * len(devices)):.1%}")
        print(f"{row['case']:<34} {row['mesh']:<22} {row['images_per_s']:>10,.0f} "
              f"{share:>8} {row['peak_memory_gb']:>8.1f}")
    if peak is None:
        print(f"of peak: no peak listed for {kind!r} at {precision} (lottery.gpu_check.PEAKS)")

