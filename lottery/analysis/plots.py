"""The standard lottery-ticket plots, made from summary rows (`load(run, kind="summary")`)
and eval rows, of `lottery.record.load` or of `lottery.analysis.results.load` (whose override
columns can split the plots into one panel per swept value). `lottery report` draws them."""

from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from lottery.record import summary_table  # noqa: E402


TICKS = (100, 51.3, 21.1, 8.6, 3.6, 1.9, 0.5, 0.1)  # densities the papers report


def _density_axis(ax, table: pd.DataFrame, label: str) -> None:
    """Percent of weights remaining on a decreasing log axis, with the papers' ticks."""
    ax.set_xscale("log")
    ax.set_xticks([t for t in TICKS if table["density"].min() * 100 * 0.8 <= t])
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.invert_xaxis()
    ax.set_xlabel("percent of weights remaining")
    ax.set_ylabel(label)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()


def _accuracy_label(accuracy: str) -> str:
    return ("test accuracy at early stop (%)" if accuracy == "early_stop"
            else f"{accuracy} test accuracy (%)")


def _save(figure, path: Path, title: str) -> Path:
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_tickets_vs_controls(summaries: pd.DataFrame, path: Path, title: str = "",
                             accuracy: str = "early_stop") -> Path:
    """Early-stop iteration and test accuracy (at early stop, or "final") against percent of
    weights remaining (log axis, decreasing), one line per branch, error bars = std over
    replicates."""
    table = summary_table(summaries, accuracy)
    figure, (steps_ax, accuracy_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for branch, rows in table.groupby("branch", sort=False):
        percent = 100 * rows["density"]
        style = dict(marker="o", markersize=3, capsize=2, label=branch)
        steps_ax.errorbar(percent, rows["early_stop_step_mean"], rows["early_stop_step_std"], **style)
        accuracy_ax.errorbar(percent, 100 * rows["accuracy_mean"], 100 * rows["accuracy_std"], **style)
    _density_axis(steps_ax, table, "early-stop iteration")
    _density_axis(accuracy_ax, table, _accuracy_label(accuracy))
    return _save(figure, path, title)


def summary_figures(summaries: pd.DataFrame, directory: Path,
                    title: str = "") -> dict[str, Path]:
    """The figures of a finished run's W&B summary (`lottery.record.wandb_summary`), drawn
    into `directory`: {"accuracy_vs_density": `plot_tickets_vs_controls`' PNG}."""
    path = Path(directory) / "accuracy_vs_density.png"
    return {"accuracy_vs_density": plot_tickets_vs_controls(summaries, path, title)}


def plot_accuracy_panels(panels: dict[str, pd.DataFrame], path: Path, title: str = "",
                         accuracy: str = "early_stop", columns: int = 3) -> Path:
    """One panel per entry of `panels` (e.g. per pruning method): test accuracy against
    percent of weights remaining, one line per branch, error bars = std over replicates; the
    panels share the accuracy axis."""
    rows_count = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows_count, columns, figsize=(4.2 * columns, 3.6 * rows_count),
                                sharey=True, squeeze=False)
    for ax, (name, summaries) in zip(axes.ravel(), panels.items()):
        table = summary_table(summaries, accuracy)
        for branch, rows in table.groupby("branch", sort=False):
            ax.errorbar(100 * rows["density"], 100 * rows["accuracy_mean"],
                        100 * rows["accuracy_std"], marker="o", markersize=3, capsize=2,
                        label=branch)
        _density_axis(ax, table, _accuracy_label(accuracy))
        ax.set_title(name)
    for ax in axes.ravel()[len(panels):]:
        ax.set_visible(False)
    return _save(figure, path, title)


# Plots of tidy results (`lottery.analysis.results`): one panel per combination of the
# `panels` columns (e.g. what a sweep varied), shaded bands = std over replicates.


def _panel_label(columns, key) -> str:
    from lottery.analysis.results import text

    key = key if isinstance(key, tuple) else (key,)
    return ", ".join(f"{column}={text(value)}" for column, value in zip(columns, key))


def _panels(frame: pd.DataFrame, panels) -> list[tuple[str, pd.DataFrame]]:
    """(title, rows) per combination of the `panels` columns, in order of appearance; one
    untitled panel when there are none."""
    panels = list(panels or ())
    if not panels:
        return [("", frame)]
    return [(_panel_label(panels, key), rows)
            for key, rows in frame.groupby(panels, sort=False, dropna=False)]


def _grid(count: int, columns: int = 3, sharey: bool = True):
    """A figure with `count` panels (at most `columns` a row); unused axes hidden."""
    columns = min(columns, count)
    rows = -(-count // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5.0 * columns, 3.8 * rows),
                                sharey=sharey, squeeze=False)
    for ax in axes.ravel()[count:]:
        ax.set_visible(False)
    return figure, axes.ravel()[:count]


def _data_ticks(ax, percents: pd.Series) -> None:
    """When fewer than three of the papers' ticks fall within the data (a short run), tick
    the data's own densities instead, so that the axis spans only the data."""
    low, high = percents.min(), percents.max()
    if sum(low <= tick <= high for tick in TICKS) < 3:
        ax.set_xticks(sorted({float(f"{p:.3g}") for p in percents}))


def _band(ax, x, mean, std, label, scale: float = 1.0, **style) -> None:
    """A line of means with a shaded mean ± std band (no band where std is undefined)."""
    mean, std = scale * mean, scale * std.fillna(0.0)
    (line,) = ax.plot(x, mean, marker="o", markersize=3, label=label, **style)
    ax.fill_between(x, mean - std, mean + std, alpha=0.2, color=line.get_color(), linewidth=0)


def plot_metric_vs_density(summaries: pd.DataFrame, path: Path, metric: str,
                           ylabel: str, panels=(), scale: float = 1.0,
                           title: str = "") -> Path:
    """`metric` of the summary rows against percent of weights remaining (log axis,
    decreasing), mean over replicates per level and branch, one line per branch, shaded
    band = std over replicates; one panel per combination of `panels`."""
    from lottery.analysis.results import aggregate

    groups = _panels(summaries, panels)
    figure, axes = _grid(len(groups))
    for ax, (name, rows) in zip(axes, groups):
        table = aggregate(rows, ["level", "branch"], (metric,), ("mean", "std"))
        for branch, lines in table.groupby("branch", sort=False):
            _band(ax, 100 * lines["density"], lines[f"{metric}_mean"], lines[f"{metric}_std"],
                  branch, scale)
        _density_axis(ax, table, ylabel)
        _data_ticks(ax, 100 * table["density"])
        ax.set_title(name, fontsize=9)
    return _save(figure, path, title)


def plot_accuracy_vs_density(summaries: pd.DataFrame, path: Path, panels=(),
                             accuracy: str = "early_stop", title: str = "") -> Path:
    """Test accuracy at early stop (or `accuracy="final"`) against percent of weights
    remaining, one line per branch, bands = std over replicates."""
    return plot_metric_vs_density(summaries, path, f"{accuracy}_test_accuracy",
                                  _accuracy_label(accuracy), panels, 100.0, title)


def plot_early_stop_vs_density(summaries: pd.DataFrame, path: Path, panels=(),
                               title: str = "") -> Path:
    """Early-stop iteration (minimum validation loss) against percent of weights remaining,
    one line per branch, bands = std over replicates."""
    return plot_metric_vs_density(summaries, path, "early_stop_step", "early-stop iteration",
                                  panels, 1.0, title)


def _some_levels(levels: list, most: int) -> list:
    """At most `most` of `levels`, evenly spaced, always the first (dense) and the last."""
    if len(levels) <= most:
        return list(levels)
    picks = {round(i * (len(levels) - 1) / (most - 1)) for i in range(most)}
    return [levels[i] for i in sorted(picks)]


def plot_learning_curves(evals: pd.DataFrame, path: Path, branch: str = "ticket", panels=(),
                         metric: str = "test_accuracy", levels=None, most_levels: int = 6,
                         title: str = "") -> Path:
    """`metric` of the eval rows of one branch against the training step, one line per level
    (coloured from dense to sparsest, labelled with percent remaining; `levels`, default at
    most `most_levels` evenly spaced ones so the lines stay readable), mean over replicates
    with a std band; one panel per combination of `panels`. The y-axis is fitted to the
    evaluations after each level's first one, so the untrained networks' accuracy does not
    flatten the curves."""
    from lottery.analysis.results import aggregate

    evals = evals[evals["branch"] == branch]
    if evals.empty:
        raise ValueError(f"no eval rows of branch {branch!r}")
    shown = sorted(evals["level"].unique()) if levels is None else sorted(levels)
    if levels is None:
        shown = _some_levels(shown, most_levels)
    evals = evals[evals["level"].isin(shown)]
    groups = _panels(evals, panels)
    figure, axes = _grid(len(groups))
    colours = plt.get_cmap("viridis")([i / max(1, len(shown) - 1) for i in range(len(shown))])
    scale = 100.0 if "accuracy" in metric else 1.0
    for ax, (name, rows) in zip(axes, groups):
        table = aggregate(rows, ["level", "step"], (metric,), ("mean", "std"))
        trained = []
        for level, lines in table.groupby("level", sort=True):
            _band(ax, lines["step"], lines[f"{metric}_mean"], lines[f"{metric}_std"],
                  f"{100 * lines['density'].iloc[0]:.3g}%", scale,
                  color=colours[shown.index(level)])
            trained.append(lines[f"{metric}_mean"].iloc[1:])
        trained = pd.concat(trained)
        if len(trained) and len(table["step"].unique()) > 3:
            low, high = scale * trained.min(), scale * trained.max()
            margin = 0.1 * (high - low) or 0.5
            ax.set_ylim(low - margin, high + margin)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(6, integer=True))
        ax.xaxis.set_major_formatter(matplotlib.ticker.StrMethodFormatter("{x:,.0f}"))
        ax.set_xlabel("training step")
        ax.set_ylabel(metric.replace("_", " ") + (" (%)" if scale == 100.0 else ""))
        ax.set_title(f"{branch}{': ' + name if name else ''}", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(title="remaining", fontsize=7, title_fontsize=7)
    return _save(figure, path, title)


def plot_rewind_sweep(summaries: pd.DataFrame, path: Path, level: int | None = None,
                      panels=(), accuracy: str = "early_stop", column: str = "rewind.step",
                      title: str = "") -> Path:
    """Test accuracy (at early stop, or "final") against the rewind step k (`column`) at one
    pruning level (default: the sparsest level every run reached), one line per branch,
    bands = std over replicates; one panel per combination of `panels`."""
    from lottery.analysis.results import aggregate

    if level is None:
        level = int(summaries.groupby(column, dropna=False)["level"].max().min())
    rows = summaries[summaries["level"] == level]
    if rows.empty:
        raise ValueError(f"no summary rows at level {level}")
    metric = f"{accuracy}_test_accuracy"
    groups = _panels(rows, panels)
    figure, axes = _grid(len(groups))
    for ax, (name, group) in zip(axes, groups):
        table = aggregate(group, ["branch", column], (metric,), ("mean", "std"))
        table = table.sort_values(column, kind="stable")
        for branch, lines in table.groupby("branch", sort=False):
            _band(ax, lines[column], lines[f"{metric}_mean"], lines[f"{metric}_std"],
                  branch, 100.0)
        percent = 100 * group["density"].mean()
        ax.set_title(f"level {level}, {percent:.3g}% remaining{': ' + name if name else ''}",
                     fontsize=9)
        ax.set_xticks(sorted(table[column].dropna().unique()))
        ax.set_xlabel(f"rewind step k ({column})")
        ax.set_ylabel(_accuracy_label(accuracy))
        ax.grid(True, alpha=0.3)
        ax.legend()
    return _save(figure, path, title)
