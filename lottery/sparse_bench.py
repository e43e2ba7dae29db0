"""`lottery-bench --section sparse`: the per-step cost of each sparse-training method against
dense training, in one process, paired.

Each method is a one-level run of LeNet-300-100 at 90% sparsity (2:4 for SR-STE) on
synthetic MNIST-shaped data, batch 60, Adam, one member, built as `lottery` builds it
(`lottery.setup.build`): its level started (`imp.Experiment.start_level`) and its compiled
chunk of `steps` steps timed. The repeats go round the methods in turn, so each round times
every method under the same load; a method's ratio is the median over rounds of its time
over the dense network's in the same round. The schedules update as they would in a long
run: RigL and SET every 100 steps, gradual pruning's events every 100 steps,
straight-through masks at every step.
"""

import tempfile
import time

METHODS = {  # name: prune.* overrides of a one-level run (level 1; dense: level 0)
    "dense": {"schedule": "iterative"},
    "fixed mask (IMP ticket)": {"schedule": "iterative"},
    "static": {"schedule": "static"},
    "SET": {"schedule": "set"},
    "RigL": {"schedule": "rigl"},
    "gradual": {"schedule": "gradual", "gradual": {"start": 0, "end": 99_000, "every": 100}},
    "straight-through": {"schedule": "oneshot", "ste": True},
    "SR-STE 2:4": {"schedule": "oneshot", "ste": "sr", "structure": "nm"},
}
LONG = 100_000  # train.steps of every run: updates fall due throughout the timed chunks


def _level(name: str, steps: int, out: str):
    """The started level of `name`'s run, and its setup."""
    from lottery.config import validate
    from lottery.imp import Experiment
    from lottery.setup import build

    cfg = validate({
        "dataset": {"name": "synthetic", "train_size": 55_000, "validation_size": 100,
                    "test_size": 100},
        "model": {"name": "lenet_300_100"}, "optimizer": {"name": "adam", "lr": 1.2e-3},
        "train": {"steps": LONG, "batch_size": 60, "eval_every": steps,
                  "checkpoint_every": 0},
        "prune": {"levels": 1, "rate": 0.9, "dst": {"stop": LONG}, **METHODS[name]},
        "replicates": 1, "branches": ["ticket"], "logger": {"name": "none"}})
    setup = build(cfg)
    return Experiment(setup, out, log=lambda *_: None).start_level(0 if name == "dense" else 1), \
        setup


def sparse_rates(steps: int = 200, repeats: int = 5, methods=tuple(METHODS)) -> list[dict]:
    """Per method: median ms per step and median paired ratio to dense (`methods` must
    start with "dense")."""
    levels, times = {}, {name: [] for name in methods}
    with tempfile.TemporaryDirectory() as out:
        for name in methods:
            level, setup = _level(name, steps, f"{out}/{len(levels)}")
            level.state, loss = setup.trainer.train_chunk(level.state, level.keys, 0,
                                                          level.controls)  # compiles
            loss.block_until_ready()
            levels[name] = level, setup, steps
        for _ in range(repeats):
            for name in methods:
                level, setup, at = levels[name]
                start = time.perf_counter()
                level.state, loss = setup.trainer.train_chunk(level.state, level.keys, at,
                                                              level.controls)
                loss.block_until_ready()
                times[name].append(time.perf_counter() - start)
                levels[name] = level, setup, at + steps
    dense = times[methods[0]]
    return [{"method": name, "ms_per_step": 1e3 * _median(times[name]) / steps,
             "ratio": _median([t / d for t, d in zip(times[name], dense)])}
            for name in methods]


def _median(values):
    values = sorted(values)
    return values[len(values) // 2]


def print_sparse(rows: list[dict], steps: int, repeats: int) -> None:
    print(f"Sparse training methods, LeNet-300-100 at 90% sparsity (SR-STE: 2:4), batch 60, "
          f"Adam, one member; median of {repeats} chunks of {steps} steps, ratios paired by "
          "round")
    print(f"{'method':<26} {'ms/step':>8} {'x dense':>8}")
    for row in rows:
        print(f"{row['method']:<26} {row['ms_per_step']:>8.2f} {row['ratio']:>8.2f}")
