"""Tables and the plot of the sparse-training comparison (Evci et al. 2020) from its runs.

    python experiments/evci_2020_rigl/summarise.py [RUNS_DIR]

Writes `results.md` (test accuracy at the end of training, mean ± std over replicates, of
dense training, static sparse training, SET, RigL, gradual magnitude pruning and the IMP
ticket at 80, 90 and 95% sparsity; the ITOP rates of SET and RigL; the 2:4 ticket beside
the unstructured one at 50%) and `accuracy_vs_sparsity.png` beside this file.
"""

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lottery.analysis import results  # noqa: E402

HERE = Path(__file__).resolve().parent
TRAIN_ONCE = ("static", "set", "rigl", "gradual")
NAMES = {"static": "static", "set": "SET", "rigl": "RigL", "gradual": "gradual pruning",
         "iterative": "IMP ticket"}
IMP_LEVELS = {7: 0.8, 10: 0.9, 13: 0.95}  # levels of the IMP run nearest each sparsity


def mean_std(values, scale=100.0) -> str:
    return f"{scale * values.mean():.2f} ± {scale * values.std():.2f}"


def main() -> None:
    runs = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "runs"
    summaries = results.healthy(results.load(runs, kind="summary"))
    summaries["method"] = summaries["run"].str.split("/").str[0].map(
        lambda name: name if name in ("imp", "nm_2_4", "unstructured_0.5")
        else name.rsplit("_", 1)[0])
    dense = summaries[(summaries.level == 0) & (summaries.method == "imp")]
    rows, curves = [], {}
    for method in TRAIN_ONCE:
        sparse = summaries[(summaries.method == method) & (summaries.level == 1)]
        curves[method] = sparse.groupby("prune.rate")["final_test_accuracy"]
        rows.append((NAMES[method], {rate: group for rate, group in curves[method]},
                     sparse.groupby("prune.rate")))
    imp = summaries[(summaries.method == "imp") & (summaries.level > 0)]
    imp_rows = {IMP_LEVELS[level]: imp[imp.level == level]["final_test_accuracy"]
                for level in IMP_LEVELS}
    lines = [f"Test accuracy (%) at the end of training (step 5,000), mean ± std over "
             f"{dense['replicate'].nunique()} replicates; LeNet-300-100 on MNIST. "
             f"Dense: {mean_std(dense['final_test_accuracy'])}.\n",
             "| method | 80% sparse | 90% sparse | 95% sparse |", "|---|---|---|---|"]
    for name, groups, _ in rows:
        lines.append(f"| {name} | " + " | ".join(mean_std(groups[rate]) for rate in
                                                 (0.8, 0.9, 0.95)) + " |")
    imp_density = {sparsity: 100 * imp[imp.level == level]["density"].mean()
                   for level, sparsity in IMP_LEVELS.items()}
    lines.append("| IMP ticket (20.63% per level; " + ", ".join(
        f"{d:.2f}" for d in imp_density.values()) + "% remain) | "
        + " | ".join(mean_std(imp_rows[s]) for s in (0.8, 0.9, 0.95)) + " |")
    lines += ["", "In-time over-parameterisation (the fraction of weights active at some step, "
              "%), mean over replicates:", "", "| method | 80% sparse | 90% sparse | 95% sparse |",
              "|---|---|---|---|"]
    for method in ("set", "rigl"):
        sparse = summaries[(summaries.method == method) & (summaries.level == 1)]
        itop = sparse.groupby("prune.rate")["itop_rate"].mean()
        lines.append(f"| {NAMES[method]} | " + " | ".join(f"{100 * itop[r]:.1f}"
                                                          for r in (0.8, 0.9, 0.95)) + " |")
    lines += ["", "One level of IMP at 50%: a 2:4 ticket beside the unstructured ticket, each "
              "with its random-pruning control (random 2:4 masks for 2:4):", "",
              "| mask | ticket | random_prune | bytes of the pruned layers |", "|---|---|---|---|"]
    for method, name in (("unstructured_0.5", "unstructured 50%"), ("nm_2_4", "2:4")):
        level = summaries[(summaries.method == method) & (summaries.level == 1)]
        cells = [mean_std(level[level.branch == b]["final_test_accuracy"])
                 for b in ("ticket", "random_prune")]
        size = (f"{int(level['nm_bytes'].iloc[0]):,} (2:4 layout) of "
                f"{int(level['dense_bytes'].iloc[0]):,} dense" if "nm_bytes" in level
                and level["nm_bytes"].notna().any() else "dense float32 kernels")
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {size} |")
    text = "\n".join(lines) + "\n"
    (HERE / "results.md").write_text(text)
    plot(curves, imp, dense)
    print(text)


def plot(curves, imp, dense) -> None:
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    axes.axhline(100 * dense["final_test_accuracy"].mean(), color="black", linestyle=":",
                 label="dense")
    for method, groups in curves.items():
        stats = groups.agg(["mean", "std"])
        axes.errorbar(100 * stats.index, 100 * stats["mean"], yerr=100 * stats["std"],
                      marker="o", capsize=3, label=NAMES[method])
    by_level = imp.groupby("level").agg(density=("density", "mean"),
                                        mean=("final_test_accuracy", "mean"),
                                        std=("final_test_accuracy", "std"))
    axes.errorbar(100 * (1 - by_level["density"]), 100 * by_level["mean"],
                  yerr=100 * by_level["std"], marker="s", capsize=3, label=NAMES["iterative"])
    axes.set_xlabel("sparsity (%)")
    axes.set_ylabel("test accuracy at the end of training (%)")
    axes.set_title("LeNet-300-100 on MNIST, 3 replicates")
    axes.set_xlim(75, 96)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(HERE / "accuracy_vs_sparsity.png", dpi=120)


if __name__ == "__main__":
    main()
