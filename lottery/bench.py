"""The benchmark: training throughput against this machine's own matmul rate, and compilations.

    lottery-bench                    # or: python -m lottery.bench [--repeats 5] [--steps 1000]

For each device setting (on CPU: 1 device, and one device per core), a fresh process
measures LeNet-300-100 training replica-steps/s at batch 60 (Adam, masks applied, the
engine's own `Trainer` and XLA settings) for stacks of R replicates, and another the fp32
matmul rate (jitted 2048^3 `jnp.dot`, XLA's default kernels); it reports the median
training rate over repeats, the best matmul rate, and the fraction of it reached.
Then a 3-level IMP run on synthetic data counts its compilations.

    lottery-bench --section compact  # or --section all

measures, in this process, structured pruning's payoff: the dense model against models
compacted to 50%, 25% and 10% of their units (LeNet-300-100's hidden neurons, Conv-2's
conv channels on 32x32x3; the units with the largest L2 norms kept): training steps/s of
a jitted Adam step (value_and_grad) at batch 60 and evaluation-mode inference examples/s at
batches 100 and 1000, medians of repeated timings, and their ratios to the dense model.

    lottery-bench --section sparse

measures the per-step cost of each sparse-training method (fixed masks, static, SET, RigL,
gradual pruning, straight-through and SR-STE 2:4) against dense training, paired in one
process (`lottery.sparse_bench`).

    lottery-bench --section gpu [--precision bf16]

runs the GPU check (`lottery.gpu_check`: ResNet-20 stacks of 1, 4 and 16 members and a
data-parallel ResNet-50 at 224 px; images/s, fraction of peak, peak memory).

    lottery-bench --section input [--workers 0 1 2]

measures the streaming input pipeline alone (`lottery.data.stream`, no training) on a
generated image folder: training images/s (random-resized crop and flip, uint8 batches of
64) at 64 px from 64x64 JPEGs (Tiny-ImageNet's size) and at 224 px from 500x375 ones
(ImageNet's typical size), with 0 (in-process), 1 and 2 worker processes, against the
in-memory path, a jitted gather `x[batch_indices]` of a resident uint8 array of the same
images' shape; medians of repeated calls of a running pipeline, and each pipeline's time to
its first batch (its workers' start). The files are read from the page cache: this is
decoding and augmentation, not disk.
"""

import argparse
import json
import logging
import os
import subprocess
import sys
import time

BATCH = 60


def _median(values):
    values = sorted(values)
    return values[len(values) // 2]


def matmul_gflops(repeats: int) -> float:
    import jax
    import jax.numpy as jnp

    n = 2048
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dot(a, a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times) / 1e9  # the best: a shared machine only ever slows it


def training_rate(replicates: int, steps: int, repeats: int,
                  members: str = "auto") -> tuple[float, float]:
    """Median replica-steps/s of LeNet-300-100 training, and the MFLOP of one step."""
    import jax

    from lottery.data.synthetic import load_synthetic
    from lottery.models import build_model
    from lottery.optim import build_optimizer
    from lottery.pruning.masks import full_masks
    from lottery.state import Network
    from lottery.train import Trainer

    data = load_synthetic(train_size=55000, validation_size=100, test_size=100)
    model = build_model("lenet_300_100", data.input_shape, data.num_classes)
    trainer = Trainer(model, build_optimizer("adam", 1.2e-3, steps_per_epoch=1), data, BATCH,
                      steps, replicates, members=members)
    keys = jax.random.split(jax.random.key(0), trainer.padded_size)
    network = Network(*jax.jit(jax.vmap(model.init), out_shardings=trainer.stacked)(keys))
    masks = jax.jit(jax.vmap(full_masks), out_shardings=trainer.stacked)(network.params)
    weights = model.param_counts(Network(*jax.eval_shape(model.init, jax.random.key(0))).params)
    state = trainer.start(network, masks)
    keys = jax.device_put(jax.random.key_data(keys), trainer.stacked)
    state, loss = trainer.train_chunk(state, keys, 0)
    loss.block_until_ready()
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        state, loss = trainer.train_chunk(state, keys, (i + 1) * steps)
        loss.block_until_ready()
        times.append(time.perf_counter() - start)
    first = next(iter(weights.values()))
    # forward + weight gradients + activation gradients (none for the input layer)
    mflop = 2 * BATCH * (3 * sum(weights.values()) - first) / 1e6
    return replicates * steps / _median(times), mflop


def imp_compilations() -> dict[str, int]:
    """Compilations in a 3-level IMP run (synthetic data), total and of the train function."""
    import tempfile

    import jax

    from lottery.config import validate
    from lottery.imp import run

    compiled = []

    class Catch(logging.Handler):
        def emit(self, record):
            message = record.getMessage()
            if message.startswith("Compiling "):
                compiled.append(message.split()[1])

    handler = Catch()
    logger = logging.getLogger("jax._src.interpreters.pxla")
    logger.addHandler(handler)
    logger.propagate = False
    jax.config.update("jax_log_compiles", True)
    cfg = {"name": "bench", "seed": 0, "replicates": 2,
           "branches": ["ticket", "reinit", "random_prune"],
           "dataset": {"name": "synthetic", "train_size": 600, "validation_size": 100,
                       "test_size": 100},
           "model": {"name": "lenet_300_100"}, "optimizer": {"name": "adam", "lr": 1.2e-3},
           "train": {"steps": 40, "batch_size": 60, "eval_every": 20},
           "prune": {"levels": 3, "rate": 0.2, "scope": "layerwise", "layer_rates": {"out": 0.1}},
           "rewind": {"step": 0}, "logger": {"name": "none"}}
    with tempfile.TemporaryDirectory() as out:
        run(validate(cfg), out, log=lambda *_: None)
    jax.config.update("jax_log_compiles", False)
    logger.removeHandler(handler)
    return {"total": len(compiled),
            "train": sum(name == "jit(member_chunk)" for name in compiled),
            "evaluate": sum(name == "jit(member_eval)" for name in compiled)}


# model, input shape, units removed, training steps per timed (scanned) chunk
COMPACT_MODELS = (("lenet_300_100", (28, 28, 1), "neurons", 20),
                  ("conv2", (32, 32, 3), "channels", 1))
KEPT = (0.5, 0.25, 0.1)
# small batches favour Conv-2 (few channels are memory-bound at large ones), large LeNet
INFERENCE_BATCHES = (100, 1000)


class _Timer:
    """Times `call()` (which blocks) in runs of `count` calls, a count that makes a run last
    about `min_time`; made after one untimed call (compilation) and one calibrating call."""

    def __init__(self, call, min_time: float):
        call()
        start = time.perf_counter()
        call()
        once = max(time.perf_counter() - start, 1e-6)
        self.call, self.count, self.times = call, max(1, round(min_time / once)), []

    def run(self) -> None:
        start = time.perf_counter()
        for _ in range(self.count):
            self.call()
        self.times.append((time.perf_counter() - start) / self.count)

    def median(self) -> float:
        """Median seconds per call over the runs so far."""
        return _median(self.times)


def _train_call(spec, params, state, input_shape, batch, steps):
    """A call running `steps` Adam steps (value_and_grad of the cross-entropy, training
    mode) in one jitted `lax.scan`, on a few random batches resident on the device."""
    import jax
    import jax.numpy as jnp
    import optax

    optimizer = optax.adam(1e-3)
    keys = jax.random.split(jax.random.key(1), 2)
    xs = jax.random.normal(keys[0], (4, batch, *input_shape), jnp.float32)
    ys = jax.random.randint(keys[1], (4, batch), 0, 10)

    def loss(params, state, x, y):
        logits, state = spec.apply(params, state, x, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), state

    def step(carry, i):
        params, state, opt_state = carry
        (value, state), grads = jax.value_and_grad(loss, has_aux=True)(
            params, state, xs[i % 4], ys[i % 4])
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), state, opt_state), value

    @jax.jit
    def chunk(carry):
        carry, values = jax.lax.scan(step, carry, jnp.arange(steps))
        return carry, values[-1]

    carry = (params, state, optimizer.init(params))

    def call():
        nonlocal carry
        carry, value = chunk(carry)
        value.block_until_ready()

    return call


def _inference_call(spec, params, state, input_shape, batch):
    """A call of the jitted evaluation-mode forward pass on `batch` random examples."""
    import jax
    import jax.numpy as jnp

    x = jax.random.normal(jax.random.key(2), (batch, *input_shape), jnp.float32)
    logits = jax.jit(spec.logits)
    return lambda: logits(params, state, x).block_until_ready()


def compact_rates(models=COMPACT_MODELS, kept=KEPT, batch: int = BATCH,
                  inference_batches=INFERENCE_BATCHES, repeats: int = 5,
                  min_time: float = 0.2) -> list[dict]:
    """One row per model and kept fraction of its units (1.0: the dense model itself):
    parameters, training steps/s at `batch` and inference examples/s at each of
    `inference_batches` (`inference_per_s`: {batch: rate}).
    Each rate is the median of `repeats` runs of about `min_time` seconds; the runs of a
    model's variants take turns, so that a slow spell of the machine hits them all."""
    import jax

    from lottery.models import build_model
    from lottery.pruning.compact import compact, param_count
    from lottery.pruning.structured import group_scores, keep_fraction, model_groups

    rows = []
    for name, input_shape, kind, steps in models:
        spec = build_model(name, input_shape, 10)
        params, state = jax.jit(spec.init)(jax.random.key(0))
        groups = model_groups(spec, kind)
        scores = group_scores(params, groups)
        variants = [(1.0, spec, params, state)]
        for fraction in kept:
            small = compact(spec, params, state, keep_fraction(scores, fraction))
            variants.append((fraction, small.spec, small.params, small.state))
        timers = [(_Timer(_train_call(model, weights, model_state, input_shape, batch, steps),
                          min_time),
                   {size: _Timer(_inference_call(model, weights, model_state, input_shape,
                                                 size), min_time)
                    for size in inference_batches})
                  for _, model, weights, model_state in variants]
        for _ in range(repeats):
            for train, infer in timers:
                train.run()
                for timer in infer.values():
                    timer.run()
        rows += [{"model": name, "kind": kind, "kept": fraction, "params": param_count(weights),
                  "train_steps_per_s": steps / train.median(),
                  "inference_per_s": {size: size / timer.median()
                                      for size, timer in infer.items()}}
                 for (fraction, _, weights, _), (train, infer) in zip(variants, timers)]
    return rows


def print_compact(rows, batch: int, repeats: int) -> None:
    sizes = list(rows[0]["inference_per_s"])
    print(f"Structured pruning, compacted models vs dense: training steps/s at batch {batch} "
          f"(Adam), inference examples/s at batch {' and '.join(map(str, sizes))}; medians "
          f"of {repeats}")
    print(f"{'model':<14} {'units':<9} {'kept':>5} {'params':>10} {'fewer':>6} "
          f"{'train steps/s':>14} {'x dense':>8}"
          + "".join(f" {f'infer@{size} ex/s':>16} {'x dense':>8}" for size in sizes))
    dense = {}
    for row in rows:
        base = dense.setdefault(row["model"], row)
        print(f"{row['model']:<14} {row['kind']:<9} {100 * row['kept']:>4.0f}% "
              f"{row['params']:>10,} {base['params'] / row['params']:>5.1f}x "
              f"{row['train_steps_per_s']:>14.1f} "
              f"{row['train_steps_per_s'] / base['train_steps_per_s']:>7.2f}x"
              + "".join(f" {row['inference_per_s'][size]:>16.0f} "
                        f"{row['inference_per_s'][size] / base['inference_per_s'][size]:>7.2f}x"
                        for size in sizes))


# resolution, source image size (width, height); a batch of INPUT_BATCH, INPUT_STEPS steps
# a timed call
INPUT_SIZES = ((64, (64, 64)), (224, (500, 375)))
INPUT_BATCH, INPUT_STEPS, INPUT_FILES, RESIDENT = 64, 2, 129, 2048


def _photo(rng, width: int, height: int):
    """A JPEG-friendly stand-in for a photo: smooth colour fields plus a little noise (pure
    noise would decode far slower than real photos)."""
    import numpy as np
    from PIL import Image

    coarse = rng.integers(0, 256, (height // 16 + 2, width // 16 + 2, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))
    noise = rng.integers(-12, 13, smooth.shape)
    return Image.fromarray(np.clip(smooth + noise, 0, 255).astype(np.uint8))


def make_image_folder(root, size: tuple[int, int], files: int = INPUT_FILES,
                      classes: int = 4) -> None:
    """`files` JPEGs (quality 90) of `size` in `classes` class folders of root/train, and
    one of each class in root/val."""
    import numpy as np

    rng = np.random.default_rng(0)
    for i in range(files + classes):
        split, c = ("train", i % classes) if i < files else ("val", i - files)
        folder = root / split / f"c{c}"
        folder.mkdir(parents=True, exist_ok=True)
        _photo(rng, *size).save(folder / f"{i}.JPEG", quality=90)


def _stream_rate(root, resolution: int, workers: int, repeats: int) -> tuple[float, float]:
    """Training images/s of a running pipeline (median of `repeats` calls of INPUT_STEPS
    steps), and the seconds to its first batch."""
    import jax
    import numpy as np

    from lottery.data.imagenet import load_image_folder

    keys = np.asarray(jax.random.key_data(jax.random.key(0)))[None]
    data = load_image_folder(str(root), resolution, validation_size=1, num_workers=workers,
                             log=lambda *_: None)
    with data:
        start = time.perf_counter()
        data.train_batches(keys, 0, 1, INPUT_BATCH)
        first = time.perf_counter() - start
        data.train_batches(keys, 1, INPUT_STEPS, INPUT_BATCH)  # every worker up
        times = []
        for i in range(repeats):
            start = time.perf_counter()
            data.train_batches(keys, 1 + (i + 1) * INPUT_STEPS, INPUT_STEPS, INPUT_BATCH)
            times.append(time.perf_counter() - start)
    return INPUT_STEPS * INPUT_BATCH / _median(times), first


def _resident_rate(resolution: int, repeats: int) -> float:
    """Images/s of the in-memory path: a jitted gather of batches `batch_indices` picks from
    a resident uint8 array (RESIDENT images), INPUT_STEPS steps a call."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from lottery.data.order import batch_indices

    x = jax.device_put(np.random.default_rng(0).integers(
        0, 256, (RESIDENT, resolution, resolution, 3), dtype=np.uint8))
    key = jax.random.key(0)

    @jax.jit
    def gather(x, first):
        return x[batch_indices(key, first + jnp.arange(INPUT_STEPS), RESIDENT, INPUT_BATCH)]

    timer = _Timer(lambda: gather(x, 0).block_until_ready(), 0.1)
    for _ in range(repeats):
        timer.run()
    return INPUT_STEPS * INPUT_BATCH / timer.median()


def input_rates(workers=(0, 1, 2), sizes=INPUT_SIZES, repeats: int = 5) -> list[dict]:
    """One row per resolution and path: `workers` None for the in-memory gather, else the
    stream's worker count; images/s and (streams) seconds to the first batch."""
    import tempfile
    from pathlib import Path

    rows = []
    for resolution, size in sizes:
        rows.append({"resolution": resolution, "source": size, "workers": None,
                     "images_per_s": _resident_rate(resolution, repeats), "first_s": None})
        with tempfile.TemporaryDirectory() as tmp:
            make_image_folder(Path(tmp), size)
            for count in workers:
                rate, first = _stream_rate(Path(tmp), resolution, count, repeats)
                rows.append({"resolution": resolution, "source": size, "workers": count,
                             "images_per_s": rate, "first_s": first})
    return rows


def print_input(rows, repeats: int) -> None:
    import platform as host

    from lottery.data.stream import THREADS

    cores = len(os.sched_getaffinity(0))
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = host.processor() or host.machine()
    print(f"Input pipeline alone: training images/s (random-resized crop + flip, uint8), "
          f"batches of {INPUT_BATCH}, median of {repeats} calls of {INPUT_STEPS} steps; "
          f"{cores} cores ({cpu})")
    print(f"{'px':>4} {'from':>8}  {'path':<26} {'images/s':>10} {'first batch s':>14}")
    for row in rows:
        path = ("in-memory x[batch_indices]" if row["workers"] is None
                else f"stream, {row['workers']} worker{'s' if row['workers'] != 1 else ''}")
        first = "" if row["first_s"] is None else f"{row['first_s']:.1f}"
        print(f"{row['resolution']:>4} {'x'.join(map(str, row['source'])):>8}  {path:<26} "
              f"{row['images_per_s']:>10,.0f} {first:>14}")
    print(f"0 workers: decoded in this process (on {THREADS} threads); first batch: a "
          "pipeline's start (its workers' imports, and compiling the order the first time)")


def worker(args) -> None:
    if args.matmul:  # XLA's own choice of matmul kernels, as any JAX program gets them
        print(json.dumps({"matmul_gflops": matmul_gflops(args.repeats)}))
        return
    from lottery import platform

    platform.configure()  # as `lottery` trains (the parent chose the CPU device count)
    import jax

    result = {"devices": len(jax.devices()), "platform": jax.devices()[0].platform,
              "rates": {}}
    for replicates in args.replicates:
        rate, mflop = training_rate(replicates, args.steps, args.repeats, args.members)
        result["rates"][replicates] = rate
        result["step_mflop"] = mflop
    if args.compilations:
        result["compilations"] = imp_compilations()
    print(json.dumps(result))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="steps per timed chunk")
    parser.add_argument("--repeats", type=int, default=5, help="timed chunks (median reported)")
    parser.add_argument("--replicates", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--members", choices=("auto", "vmap", "map"), default="auto",
                        help="how each device runs its members (train.members)")
    parser.add_argument("--section",
                        choices=("training", "compact", "input", "sparse", "gpu", "all"),
                        default="training",
                        help="training: replica-steps/s and compilations (the default); "
                        "compact: compacted models after structured pruning vs dense; "
                        "input: the streaming input pipeline vs the in-memory path; "
                        "sparse: the per-step cost of each sparse-training method vs dense; "
                        "gpu: ResNet-20 stacks and data-parallel ResNet-50 on this machine's "
                        "accelerator (lottery/gpu_check.py; not part of all)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="gpu section: train.precision")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                        help="input section: the worker process counts of the stream")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--compilations", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--matmul", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.section == "gpu":
        from lottery.gpu_check import run

        return run(args.precision, repeats=args.repeats)
    from lottery import platform

    # the compact section runs in this process: with the CPU kernels on CPU, but XLA's own
    # dots (its environment goes to the workers: the matmul one measures XLA's defaults)
    platform.configure(eigen_dots=False)
    if args.section in ("training", "all"):
        training_section(args)
    if args.section in ("compact", "all"):
        print_compact(compact_rates(repeats=args.repeats), BATCH, args.repeats)
    if args.section in ("input", "all"):
        print_input(input_rates(args.workers, repeats=args.repeats), args.repeats)
    if args.section in ("sparse", "all"):
        from lottery.sparse_bench import print_sparse, sparse_rates

        steps = min(args.steps, 200)  # straight-through training is slow on a CPU
        print_sparse(sparse_rates(steps, args.repeats), steps, args.repeats)


def _run_worker(env, *options) -> dict:
    """`python -m lottery.bench --worker OPTIONS` in a fresh process: its JSON result."""
    command = [sys.executable, "-m", "lottery.bench", "--worker", *options]
    output = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return json.loads(output.stdout.strip().splitlines()[-1])


def training_section(args) -> None:
    from lottery import platform

    cores = os.cpu_count() or 1
    settings = [1, cores] if platform.on_cpu_path() and cores > 1 else [None]
    results = []
    for i, devices in enumerate(settings):
        env = dict(os.environ)
        if devices is not None:
            env["JAX_NUM_CPU_DEVICES"] = str(devices)
        stacks = set(args.replicates)
        if devices and devices > 1:  # stacks that fill every device (others would be padded)
            stacks = {r for r in stacks if r % devices == 0} | {devices}
        options = ["--steps", str(args.steps), "--repeats", str(args.repeats),
                   "--members", args.members, "--replicates", *map(str, sorted(stacks))]
        if i == len(settings) - 1:
            options.append("--compilations")
        result = _run_worker(env, *options)
        result.update(_run_worker(env, "--repeats", str(args.repeats), "--matmul"))
        results.append(result)
    print(f"LeNet-300-100, batch {BATCH}, Adam, masks applied; median of {args.repeats} chunks "
          f"of {args.steps} steps, best of {args.repeats} matmuls; one step = "
          f"{results[0]['step_mflop']:.1f} MFLOP")
    print(f"{'devices':>8} {'matmul GFLOP/s':>15} {'R':>3} {'replica-steps/s':>16} "
          f"{'GFLOP/s':>8} {'of matmul':>10}")
    for result in results:
        for replicates, rate in sorted(result["rates"].items(), key=lambda kv: int(kv[0])):
            gflops = rate * result["step_mflop"] / 1e3
            print(f"{result['devices']:>4} {result['platform']:<3} {result['matmul_gflops']:>15.1f} "
                  f"{replicates:>3} {rate:>16.0f} {gflops:>8.1f} "
                  f"{100 * gflops / result['matmul_gflops']:>9.1f}%")
    counts = results[-1]["compilations"]
    print(f"compilations in a 3-level IMP run (3 branches x 2 replicates): train function "
          f"{counts['train']}, evaluation {counts['evaluate']}, all programs {counts['total']}")


if __name__ == "__main__":
    main()
