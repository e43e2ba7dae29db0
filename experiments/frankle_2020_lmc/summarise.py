"""Tables and plots of the instability analysis (Frankle et al. 2020) from the records of the
runs in `run/` (README.md beside this file has the commands).

    python experiments/frankle_2020_lmc/summarise.py

Writes `results.md` (error barrier, mean ± std over replicates, per rewind step and level)
and `barrier_vs_k.png` (MNIST-1D: barrier against the rewind step k, one line per level;
error along the path for each k) beside this file.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from lottery.record import load

HERE = Path(__file__).resolve().parent


def barrier_table(rows) -> str:
    """Markdown: barrier (%) mean ± std over replicates per rewind step and level."""
    table = rows.groupby(["rewind_step", "level"]).agg(
        density=("density", "mean"), mean=("barrier", "mean"), std=("barrier", "std"),
        replicates=("barrier", "count")).reset_index()
    lines = ["| rewind step k | level | % remaining | barrier (%) | replicates |",
             "|---|---|---|---|---|"]
    lines += [f"| {r.rewind_step} | {r.level} | {100 * r.density:.1f} | "
              f"{100 * r.mean:.2f} ± {100 * r.std:.2f} | {r.replicates} |"
              for r in table.itertuples()]
    return "\n".join(lines) + "\n"


def main() -> None:
    mnist1d = load(HERE / "run" / "mnist1d", kind="instability")
    lenet = load(HERE / "run" / "lenet", kind="instability")
    text = ("## LeNet-300-100 on MNIST, k = 0\n\n" + barrier_table(lenet)
            + "\n## MNIST-1D MLP, barrier vs k\n\n" + barrier_table(mnist1d))
    (HERE / "results.md").write_text(text)

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for level, rows in mnist1d.groupby("level"):
        stats = rows.groupby("rewind_step")["barrier"].agg(["mean", "std"])
        left.errorbar(stats.index, 100 * stats["mean"], 100 * stats["std"], marker="o",
                      capsize=2, label=f"level {level} ({100 * rows.density.mean():.0f}%)")
    left.set_xscale("symlog", linthresh=50)
    left.set_xlabel("rewind step k")
    left.set_ylabel("error barrier (%)")
    left.legend()
    dense = mnist1d[mnist1d.level == 0]
    for k, rows in dense.groupby("rewind_step"):
        errors = 100 * np.mean(np.stack(rows["errors"].to_list()), axis=0)
        right.plot(rows["alphas"].iloc[0], errors, label=f"k = {k}")
    right.set_xlabel("interpolation alpha")
    right.set_ylabel("test error (%), dense network")
    right.legend()
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
    figure.suptitle("MNIST-1D MLP: linear mode connectivity of two copies trained from step k")
    figure.tight_layout()
    figure.savefig(HERE / "barrier_vs_k.png", dpi=120)
    print(text)


if __name__ == "__main__":
    main()
