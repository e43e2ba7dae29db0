"""Backend tuning in one place: everything the engine does differently on CPU.

On a CPU backend the engine runs on its *CPU path*:
  * one JAX device per core, as many as divide the member stack evenly (`use_cpu_cores`);
  * XLA:CPU's matmuls left to Eigen rather than its default YNNPACK fusions (`use_eigen_dots`);
  * the models' `Linear` and `Conv` layers compute their gradients with CPU kernels: a
    custom-VJP matmul and an im2col convolution gradient (`lottery.models.layers` says why);
  * members map one at a time where that trains faster (`member_mode`).
Everywhere else the models are plain `nnx` layers with JAX's own autodiff (forward mode too:
`jax.jvp`, Hessian-vector products) and the members are vmapped.

Only the entry points apply it: `lottery` and `lottery-bench` call `configure` before JAX's
backend starts, and so does the tests' `conftest.py`. A program that drives the engine
itself (a notebook, a script) gets plain JAX unless it calls `configure()` first; on CPU it
should, for the speed and for the numbers the `lottery` command records.

The layers and `member_mode` read the switch (`on_cpu_path`) when a function is traced, so
switching it (`use_cpu_path`, or `cpu_path` for a block) clears JAX's caches of traced
functions: nothing traced on one path runs on the other.

This module imports nothing of `lottery`: the layers below it and the entry points above it
may all import it.
"""

import contextlib
import os

import jax

_cpu_path = False


def on_cpu_path() -> bool:
    """Whether the CPU path is on (read at trace time by the layers and `member_mode`)."""
    return _cpu_path


def use_cpu_path(on: bool = True) -> None:
    """Switch the CPU path on or off; a change clears JAX's caches of traced functions."""
    global _cpu_path
    if bool(on) != _cpu_path:
        jax.clear_caches()
        _cpu_path = bool(on)


@contextlib.contextmanager
def cpu_path(on: bool):
    """The CPU path on or off for a block, then as before (e.g. `jax.jvp` on a CPU)."""
    before = _cpu_path
    use_cpu_path(on)
    try:
        yield
    finally:
        use_cpu_path(before)


def configure(stack_size: int | None = None, *, eigen_dots: bool = True) -> bool:
    """The entry points' one call, before anything starts JAX's backend: the CPU device
    count for a stack of `stack_size` members (none set when None), Eigen's matmuls (if
    `eigen_dots`), then the CPU path on if and only if the backend JAX starts is a CPU.
    Both settings tune the CPU client alone, so a GPU or TPU run is left as it is. Returns
    whether the CPU path is on."""
    if stack_size is not None:
        use_cpu_cores(stack_size)
    if eigen_dots:
        use_eigen_dots()
    use_cpu_path(jax.default_backend() == "cpu")
    return _cpu_path


def use_cpu_cores(stack_size: int) -> None:
    """On CPU, split the cores into as many JAX devices as divide the stack evenly.

    XLA's intra-op threading leaves cores idle for small matrices; one device per core, each
    with its share of the stack, uses them. `$JAX_NUM_CPU_DEVICES` wins when set. Must run
    before JAX's backend starts; afterwards it does nothing.
    """
    if "JAX_NUM_CPU_DEVICES" in os.environ:
        return
    cores = os.cpu_count() or 1
    count = max(d for d in range(1, min(cores, stack_size) + 1) if stack_size % d == 0)
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:
        pass  # backend already initialised (e.g. a second run in one process)


YNNPACK_OFF = "--xla_cpu_experimental_ynn_fusion_type="


def use_eigen_dots() -> None:
    """Leave XLA:CPU's matmuls to Eigen rather than its default YNNPACK fusions.

    For the engine's small matmuls Eigen is faster: LeNet-300-100's batch-60 forward matmul
    took 0.13 ms against YNNPACK's 0.51 (one device, JAX profiler), and `lottery-bench`'s
    worker on two devices (R=2, six alternating runs) trained at a median 1,444
    replica-steps/s against 1,278. `$XLA_FLAGS` that set YNNPACK's fusion types themselves
    win. Does nothing off CPU; must run before JAX's backend starts, and afterwards nothing.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "ynn_fusion_type" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {YNNPACK_OFF}".strip()


MEMBER_MODES = ("auto", "vmap", "map")


def member_mode(mode: str, convolves: bool, per_device: int) -> str:
    """How a device runs its `per_device` members: `vmap` (batched into one program) or `map`
    (one after another). `auto`, on the CPU path, maps when a device holds several members
    or the model convolves (`ModelSpec.convolves`), and vmaps otherwise; off it, vmaps. On
    CPU, XLA lowers a convolution vmapped over members with different kernels to a grouped
    convolution (Conv-2 forward, 3 members: 2.8 GFLOP/s vmapped vs 36 mapped), and even
    LeNet-300-100's batched matmuls trained slower than one member at a time
    (`lottery-bench`, 2 devices x 2 members: about 830 vs 920 replica-steps/s; 1 device x 4:
    520 vs 830)."""
    if mode not in MEMBER_MODES:
        raise ValueError(f"train.members={mode!r}: choose one of {', '.join(MEMBER_MODES)}")
    if mode != "auto":
        return mode
    return "map" if _cpu_path and (per_device > 1 or convolves) else "vmap"
