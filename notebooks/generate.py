"""Write the analysis notebooks of this folder (without outputs) from the cells below.

    python notebooks/generate.py

Each notebook starts with a parameters cell (tagged `parameters`): `RESULTS`, a results
directory (one run, or a sweep of runs), and `FIGURES`, where the PNG figures go. Both
default to environment variables (`LOTTERY_NOTEBOOK_RESULTS`, `LOTTERY_NOTEBOOK_FIGURES`);
with `RESULTS = None` the notebook first makes its own small run (synthetic data, well under
a minute on a laptop CPU) under `outputs/notebooks/` of the working directory. Edit a
notebook here, not in Jupyter, so that the committed notebooks stay free of outputs.
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

PARAMETERS = '''\
import os

# A results directory: a run (`hydra.run.dir`) or a sweep of runs (`hydra.sweep.dir`).
# None: make a small run here first.
RESULTS = os.environ.get("LOTTERY_NOTEBOOK_RESULTS") or None
# Where the PNG figures go; None: a folder `<RESULTS>-figures` next to the results.
FIGURES = os.environ.get("LOTTERY_NOTEBOOK_FIGURES") or None'''

SETUP = '''\
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import Image, display

from lottery.record import load

pd.set_option("display.width", 160)
pd.set_option("display.max_columns", 30)

# The small run made when RESULTS is None: synthetic data, LeNet-300-100, 2 pruning levels,
# 40 steps per level, 2 replicates.
SMALL_RUN = ["dataset=synthetic", "dataset.train_size=600", "dataset.validation_size=100",
             "dataset.test_size=100", "train.steps=40", "train.eval_every=20",
             "train.batch_size=20", "prune.levels=2", "replicates=2", "logger=none"]


def lottery(*overrides):
    """Run the `lottery` command with these overrides; print the end of its output."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "lottery.cli", *overrides],
                            check=False, capture_output=True, text=True)
    print(result.stdout[-2500:])
    if result.returncode:
        raise RuntimeError(f"lottery failed (exit {result.returncode}):\\n{result.stderr[-2500:]}")
    print(f"({time.perf_counter() - started:.0f}s)")


def new_results(name):
    return Path("outputs", "notebooks", name, time.strftime("%Y-%m-%d_%H-%M-%S")).resolve()


def figures_for(results, figures):
    folder = Path(figures) if figures else results.parent / f"{results.name}-figures"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def save(figure, name):
    """Save `figure` as FIGURES/name and show it."""
    path = FIGURES / name
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    display(Image(filename=str(path)))
    return path'''

NOTEBOOKS = {}

NOTEBOOKS["01_tickets_vs_controls"] = [
    new_markdown_cell("""\
# Winning tickets against their controls

Test accuracy (at early stop: the minimum validation loss) of the IMP ticket and its controls
(`reinit`: the ticket's masks on fresh weights; `random_prune`: random masks of the ticket's
per-layer densities) at every pruning level, mean ± std over replicates, as in Frankle &
Carbin (2019), Figures 1 and 3."""),
    new_code_cell(PARAMETERS, metadata={"tags": ["parameters"]}),
    new_code_cell(SETUP),
    new_code_cell('''\
from lottery.analysis.plots import plot_tickets_vs_controls
from lottery.record import summary_table

if RESULTS is None:
    RESULTS = new_results("01_tickets_vs_controls")
    lottery(*SMALL_RUN, f"hydra.run.dir={RESULTS}")
RESULTS = Path(RESULTS)
FIGURES = figures_for(RESULTS, FIGURES)
summaries = load(RESULTS, kind="summary")
evals = load(RESULTS, kind="eval")
runs = list(dict.fromkeys(summaries["run"]))
print(f"{len(runs)} run(s) in {RESULTS}; figures in {FIGURES}")'''),
    new_markdown_cell("## Accuracy per level and branch"),
    new_code_cell('''\
tables = {}
for run in runs:
    table = summary_table(summaries[summaries["run"] == run])
    table["percent_remaining"] = 100 * table["density"]
    tables[run] = table.pivot(index=["level", "percent_remaining"], columns="branch",
                              values=["accuracy_mean", "accuracy_std", "early_stop_step_mean"])
    print(f"run {run}")
    display(tables[run].round(4))'''),
    new_markdown_cell("## Accuracy and early-stop iteration against weights remaining"),
    new_code_cell('''\
for run in runs:
    name = "tickets_vs_controls.png" if len(runs) == 1 else f"tickets_vs_controls_{run.replace('/', '_')}.png"
    path = plot_tickets_vs_controls(summaries[summaries["run"] == run], FIGURES / name,
                                    title=f"{RESULTS.name} {run if run != '.' else ''}")
    display(Image(filename=str(path)))'''),
    new_markdown_cell("## Learning curves of each branch at the last level"),
    new_code_cell('''\
last = evals["level"].max()
figure, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 3.8), squeeze=False)
for ax, run in zip(axes[0], runs):
    rows = evals[(evals["run"] == run) & (evals["level"] == last)]
    curves = rows.groupby(["branch", "step"], sort=False)["test_accuracy"].agg(["mean", "std"])
    for branch, curve in curves.groupby(level="branch", sort=False):
        steps = curve.index.get_level_values("step")
        ax.errorbar(steps, 100 * curve["mean"], 100 * curve["std"].fillna(0), marker="o",
                    markersize=3, capsize=2, label=branch)
    ax.set(xlabel="iteration", ylabel="test accuracy (%)",
           title=f"level {last}, {100 * rows['density'].min():.1f}% remaining")
    ax.grid(alpha=0.3)
    ax.legend()
save(figure, "learning_curves.png");'''),
]

NOTEBOOKS["02_rewind_and_sparsity_sweep"] = [
    new_markdown_cell("""\
# Rewinding and sparsity

A sweep over the rewind step k (`lottery -m ... rewind.step=0,K`): test accuracy at early stop
against the fraction of weights remaining for each k, and against k at a fixed level
(Frankle et al. 2020, "Linear mode connectivity and the lottery ticket hypothesis", Figure 4).
Any sweep whose runs differ in `rewind.step` works; runs are grouped by their rewind step."""),
    new_code_cell(PARAMETERS + '''
# The level whose accuracy is plotted against k; None: the last level.
LEVEL = None''', metadata={"tags": ["parameters"]}),
    new_code_cell(SETUP),
    new_code_cell('''\
from lottery.record import summary_table

if RESULTS is None:
    RESULTS = new_results("02_rewind_and_sparsity_sweep")
    lottery("-m", *SMALL_RUN, "rewind.step=0,20", f"hydra.sweep.dir={RESULTS}")
RESULTS = Path(RESULTS)
FIGURES = figures_for(RESULTS, FIGURES)
summaries = load(RESULTS, kind="summary")
configs = load(RESULTS, kind="run").set_index("run")["config"]
summaries["rewind_step"] = summaries["run"].map(lambda run: configs[run]["rewind"]["step"])
steps = sorted(set(summaries["rewind_step"].tolist()), key=lambda k: (isinstance(k, str), k))
LEVEL = summaries["level"].max() if LEVEL is None else LEVEL
print(f"{configs.size} run(s) in {RESULTS}, rewind steps {steps}; figures in {FIGURES}")'''),
    new_markdown_cell("## Accuracy per rewind step, level and branch"),
    new_code_cell('''\
tables = []
for k in steps:
    table = summary_table(summaries[summaries["rewind_step"] == k])
    table.insert(0, "rewind_step", k)
    tables.append(table)
table = pd.concat(tables, ignore_index=True)
table["percent_remaining"] = 100 * table["density"]
display(table.pivot(index=["level", "percent_remaining"], columns=["branch", "rewind_step"],
                    values="accuracy_mean").round(4))'''),
    new_markdown_cell("## Accuracy against weights remaining, one line per rewind step"),
    new_code_cell('''\
import matplotlib.ticker

branches = list(dict.fromkeys(table["branch"]))
figure, axes = plt.subplots(1, len(branches), figsize=(4.6 * len(branches), 3.8),
                            sharey=True, squeeze=False)
for ax, branch in zip(axes[0], branches):
    for k in steps:
        rows = table[(table["branch"] == branch) & (table["rewind_step"] == k)]
        ax.errorbar(rows["percent_remaining"], 100 * rows["accuracy_mean"],
                    100 * rows["accuracy_std"], marker="o", markersize=3, capsize=2,
                    label=f"k = {k}")
    ax.set_xscale("log")
    ticks = sorted(set(table["percent_remaining"].round(1)), reverse=True)
    ax.set_xticks(ticks[::-(-len(ticks) // 8)])  # at most 8 labels
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.invert_xaxis()
    ax.set(title=branch, xlabel="percent of weights remaining")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
axes[0, 0].set_ylabel("test accuracy at early stop (%)")
save(figure, "accuracy_vs_density.png");'''),
    new_markdown_cell("## Accuracy against the rewind step at a fixed level"),
    new_code_cell('''\
at_level = table[table["level"] == LEVEL]
figure, ax = plt.subplots(figsize=(5.5, 3.8))
positions = {k: i for i, k in enumerate(steps)}  # rewind steps as given (steps or epochs)
for branch, rows in at_level.groupby("branch", sort=False):
    ax.errorbar([positions[k] for k in rows["rewind_step"]], 100 * rows["accuracy_mean"],
                100 * rows["accuracy_std"], marker="o", markersize=4, capsize=2, label=branch)
ax.set_xticks(range(len(steps)), [str(k) for k in steps])
ax.set(xlabel="rewind step k", ylabel="test accuracy at early stop (%)",
       title=f"level {LEVEL}: {at_level['percent_remaining'].mean():.1f}% remaining")
ax.grid(alpha=0.3)
ax.legend()
save(figure, "accuracy_vs_rewind_step.png")
display(at_level.pivot(index="rewind_step", columns="branch", values="accuracy_mean").round(4))'''),
]

NOTEBOOKS["04_masks_and_weights"] = [
    new_markdown_cell("""\
# Masks and weights of the tickets

What IMP keeps: how the ticket masks overlap between levels, between replicates (against the
overlap chance gives at the same densities) and between runs (e.g. two methods or rewind
steps); where the survivors' initial values lie (Zhou et al. 2019, "Deconstructing lottery
tickets": large initial magnitudes survive); and whether training keeps the survivors'
initial signs (needs `train.save_weights=true`). Uses `lottery.analysis.masks`."""),
    new_code_cell(PARAMETERS + '''
# The level of the histograms; None: the last level.
LEVEL = None''', metadata={"tags": ["parameters"]}),
    new_code_cell(SETUP),
    new_code_cell('''\
import numpy as np

from lottery.analysis import masks

if RESULTS is None:
    RESULTS = new_results("04_masks_and_weights")
    lottery("-m", *SMALL_RUN, "rewind.step=0,20", "train.save_weights=true",
            f"hydra.sweep.dir={RESULTS}")
RESULTS = Path(RESULTS)
FIGURES = figures_for(RESULTS, FIGURES)
runs = masks.load_runs(RESULTS)
name, run = next(iter(runs.items()))  # the run analysed alone: the first one
LEVEL = run.levels[-1] if LEVEL is None else LEVEL
for key, each in runs.items():
    print(key, each)
print(f"figures in {FIGURES}")'''),
    new_markdown_cell("## Overlap of the masks between levels (Jaccard index of kept weights)"),
    new_code_cell('''\
levels = masks.level_overlap(run)
matrix = masks.overlap_matrix(levels)
display(matrix.round(3))
figure, ax = plt.subplots(figsize=(4.8, 4))
image = ax.imshow(matrix.to_numpy(), vmin=0, vmax=1, cmap="viridis")
ax.set_xticks(range(len(matrix)), matrix.columns)
ax.set_yticks(range(len(matrix)), matrix.index)
for (i, j), value in np.ndenumerate(matrix.to_numpy()):
    ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="w" if value < 0.6 else "k")
ax.set(xlabel="level", ylabel="level", title="mask overlap between levels" + (f" (run {name})" if name != "." else ""))
figure.colorbar(image, label="Jaccard index (mean over replicates)")
save(figure, "level_overlap.png");'''),
    new_markdown_cell("## Overlap between replicates, against chance"),
    new_code_cell('''\
replicates = masks.replicate_overlap(run)
per_level = replicates.groupby(["level", "layer"], sort=False)[["jaccard", "jaccard_random"]].mean()
display(per_level.unstack("layer").round(3))
figure, ax = plt.subplots(figsize=(5.5, 3.8))
pooled = per_level.xs(masks.ALL, level="layer")
ax.plot(pooled.index, pooled["jaccard"], marker="o", label="replicates")
ax.plot(pooled.index, pooled["jaccard_random"], linestyle="--", label="chance (random masks)")
ax.set(xlabel="level", ylabel="Jaccard index", title="mask overlap between replicates")
ax.set_xticks(list(pooled.index))
ax.grid(alpha=0.3)
ax.legend()
save(figure, "replicate_overlap.png");'''),
    new_markdown_cell("## Overlap between runs (matched replicates)"),
    new_code_cell('''\
if len(runs) > 1:
    configs = load(RESULTS, kind="run").set_index("run")["config"]
    figure, ax = plt.subplots(figsize=(5.5, 3.8))
    for other, each in list(runs.items())[1:]:
        overlap = masks.run_overlap(run, each)
        pooled = overlap[overlap["layer"] == masks.ALL].groupby("level")[["jaccard", "jaccard_random"]].mean()
        display(overlap.groupby(["level", "layer"], sort=False)["jaccard"].mean().unstack().round(3))
        ax.plot(pooled.index, pooled["jaccard"], marker="o", label=f"{name} vs {other}")
    ax.plot(pooled.index, pooled["jaccard_random"], linestyle="--", color="grey", label="chance")
    ax.set(xlabel="level", ylabel="Jaccard index", title="mask overlap between runs")
    ax.set_xticks(list(pooled.index))
    ax.grid(alpha=0.3)
    ax.legend()
    save(figure, "run_overlap.png")
else:
    print("one run: nothing to compare it with")'''),
    new_markdown_cell("## Initial values of the survivors"),
    new_code_cell('''\
summary = masks.init_summary(run)
display(summary.groupby(["level", "layer"], sort=False)[["density", "mean_abs_all", "mean_abs_survivors", "magnitude_ratio"]].mean().round(4))
histograms = masks.init_distribution(run, levels=[LEVEL])
figure, axes = plt.subplots(1, len(run.layers), figsize=(4.2 * len(run.layers), 3.4), squeeze=False)
for ax, layer in zip(axes[0], run.layers):
    rows = histograms[histograms["layer"] == layer]
    width = rows["bin_right"] - rows["bin_left"]
    ax.bar(rows["bin_left"], rows["all"], width, align="edge", alpha=0.4, label="all weights")
    ax.bar(rows["bin_left"], rows["survivors"], width, align="edge", alpha=0.7, label=f"survivors, level {LEVEL}")
    ax.set(title=layer, xlabel="initial (rewind) value", ylabel="weights")
    ax.legend(fontsize="small")
save(figure, "init_histograms.png");'''),
    new_markdown_cell("## Do the survivors keep their initial signs?"),
    new_code_cell('''\
if run.trained_levels:
    signs = masks.sign_agreement_by_level(run)
    table = signs.groupby(["level", "layer"], sort=False)["sign_agreement"].mean().unstack()
    display(table.round(4))
    figure, ax = plt.subplots(figsize=(5.5, 3.8))
    for layer in table.columns:
        ax.plot(table.index, 100 * table[layer], marker="o", label=layer,
                linewidth=2.5 if layer == masks.ALL else 1)
    ax.set(xlabel="level (0: dense)", ylabel="survivors with their initial sign (%)",
           title="sign agreement, initial vs trained")
    ax.set_xticks(list(table.index))
    ax.grid(alpha=0.3)
    ax.legend()
    save(figure, "sign_agreement.png")
else:
    print("no trained weights saved: run with train.save_weights=true")'''),
]

NOTEBOOKS["03_instability"] = [
    new_markdown_cell("""\
# Instability analysis: linear mode connectivity

Frankle et al. (2020): train two copies of a network from the same point (step k of the
dense run at level 0, the rewound ticket at later levels) with different data orders, and
evaluate the test error on the straight line between them. The error barrier (maximum error
on the line minus the mean of the ends') is near 0 when the copies are linearly connected:
the network is *stable* to SGD noise from step k. The `instability` branch records it per
level and replicate (`kind: instability` rows: `barrier`, `errors` at 30 `alphas`); a sweep
over `rewind.step` gives the barrier against k."""),
    new_code_cell(PARAMETERS, metadata={"tags": ["parameters"]}),
    new_code_cell(SETUP),
    new_code_cell('''\
import numpy as np

if RESULTS is None:  # a small sweep of rewind points with the instability branch
    RESULTS = new_results("03_instability")
    lottery("-m", *SMALL_RUN, "branches=[ticket,instability]", "rewind.step=0,20",
            f"hydra.sweep.dir={RESULTS}")
RESULTS = Path(RESULTS)
FIGURES = figures_for(RESULTS, FIGURES)
rows = load(RESULTS, kind="instability")
if rows.empty:
    raise ValueError(f"no instability rows in {RESULTS}: run with 'branches=[ticket,instability]'")
print(f"{rows['run'].nunique()} run(s), rewind steps {sorted(rows['rewind_step'].unique())}; "
      f"figures in {FIGURES}")
barriers = (rows.groupby(["rewind_step", "level"])
            .agg(density=("density", "mean"), barrier_mean=("barrier", "mean"),
                 barrier_std=("barrier", "std"), replicates=("barrier", "count")))
barriers'''),
    new_code_cell('''\
figure, ax = plt.subplots(figsize=(6, 4))
for level, group in rows.groupby("level"):
    stats = group.groupby("rewind_step")["barrier"].agg(["mean", "std"]).fillna(0)
    ax.errorbar(stats.index, 100 * stats["mean"], 100 * stats["std"], marker="o", capsize=2,
                label=f"level {level} ({100 * group['density'].mean():.1f}%)")
ax.set(xlabel="rewind step k", ylabel="error barrier (%)", title="instability vs rewind step")
ax.grid(alpha=0.3)
ax.legend()
save(figure, "barrier_vs_rewind_step.png")'''),
    new_code_cell('''\
levels = sorted(rows["level"].unique())
figure, axes = plt.subplots(1, len(levels), figsize=(4.5 * len(levels), 3.6), sharey=True,
                            squeeze=False)
for ax, level in zip(axes[0], levels):
    for k, group in rows[rows["level"] == level].groupby("rewind_step"):
        errors = 100 * np.mean(np.stack(group["errors"].to_list()), axis=0)
        ax.plot(group["alphas"].iloc[0], errors, marker=".", label=f"k = {k}")
    ax.set(xlabel="interpolation alpha", title=f"level {level}")
    ax.grid(alpha=0.3)
    ax.legend()
axes[0][0].set_ylabel("test error (%)")
save(figure, "interpolation_curves.png")'''),
]


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        notebook = new_notebook(cells=cells, metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"}})
        for i, cell in enumerate(notebook.cells):  # stable ids: no diff on regeneration
            cell["id"] = f"{name[:2]}-{i:02d}"
        nbformat.validate(notebook)
        nbformat.write(notebook, HERE / f"{name}.ipynb")
        print(HERE / f"{name}.ipynb")


if __name__ == "__main__":
    main()
