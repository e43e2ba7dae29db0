"""The benchmark: training throughput against this machine's own matmul rate, and compilations.

    lottery-bench                    # or: python -m lottery.bench [--repeats 5] [--steps 1000]

For each device setting (on CPU: 1 device, and one device per core), a fresh process
measures the fp32 matmul rate (jitted 2048^3 `jnp.dot`) and LeNet-300-100 training
replica-steps/s at batch 60 (Adam, masks applied, the engine's own `Trainer`) for stacks of
R replicates; it reports medians over repeats and the fraction of the matmul rate reached.
Then a 3-level IMP run on synthetic data counts its compilations.
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
    return 2 * n**3 / _median(times) / 1e9


def training_rate(replicates: int, steps: int, repeats: int,
                  members: str = "auto") -> tuple[float, float]:
    """Median replica-steps/s of LeNet-300-100 training, and the MFLOP of one step."""
    import jax

    from lottery.data.synthetic import load_synthetic
    from lottery.models import build_model
    from lottery.pruning.masks import full_masks
    from lottery.optim import build_optimizer
    from lottery.train import Trainer

    data = load_synthetic(train_size=55000, validation_size=100, test_size=100)
    model = build_model("lenet_300_100", data.input_shape, data.num_classes)
    trainer = Trainer(model, build_optimizer("adam", 1.2e-3, steps_per_epoch=1), data, BATCH,
                      steps, replicates, members=members)
    keys = jax.random.split(jax.random.key(0), trainer.padded_size)
    params, model_state = jax.jit(jax.vmap(model.init), out_shardings=trainer.stacked)(keys)
    masks = jax.jit(jax.vmap(full_masks), out_shardings=trainer.stacked)(params)
    weights = model.param_counts(jax.eval_shape(model.init, jax.random.key(0))[0])
    state = trainer.start(params, model_state, masks)
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


def worker(args) -> None:
    import jax

    result = {"devices": len(jax.devices()), "platform": jax.devices()[0].platform,
              "matmul_gflops": matmul_gflops(args.repeats), "rates": {}}
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
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--compilations", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    import jax

    on_cpu = jax.default_backend() == "cpu"
    cores = os.cpu_count() or 1
    settings = [1, cores] if on_cpu and cores > 1 else [None]
    results = []
    for i, devices in enumerate(settings):
        env = dict(os.environ)
        if devices is not None:
            env["JAX_NUM_CPU_DEVICES"] = str(devices)
        stacks = set(args.replicates)
        if devices and devices > 1:  # stacks that fill every device (others would be padded)
            stacks = {r for r in stacks if r % devices == 0} | {devices}
        command = [sys.executable, "-m", "lottery.bench", "--worker", "--steps", str(args.steps),
                   "--repeats", str(args.repeats), "--members", args.members,
                   "--replicates", *map(str, sorted(stacks))]
        if i == len(settings) - 1:
            command.append("--compilations")
        output = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
        results.append(json.loads(output.stdout.strip().splitlines()[-1]))
    print(f"LeNet-300-100, batch {BATCH}, Adam, masks applied; {args.repeats} chunks of "
          f"{args.steps} steps, medians; one step = {results[0]['step_mflop']:.1f} MFLOP")
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
