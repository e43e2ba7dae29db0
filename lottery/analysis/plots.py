"""The standard lottery-ticket plots, made from summary rows (`load(run, kind="summary")`)
and eval rows, of `lottery.record.load` or of `lottery.analysis.results.load` (whose override
columns can split the plots into one panel per swept value). `lottery report` draws them.

Every plot goes through the same helpers, so that every figure reads the same way: a grid
sized to its panel count (`_grid`), density axes fitted to the data with a tick at each
level's density (`_density_axis`), one legend below the panels, off the data (`_legend`),
and titles wrapped to the width they have (`_save`)."""

import textwrap
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from lottery.record import summary_table  # noqa: E402

PANEL = (5.0, 3.8)  # inches per panel
LABEL_SPACING = 0.45  # inches: the least distance between two labelled density ticks
MARGIN = 0.04  # beyond the data on each side of a fitted axis, as a fraction of its span


def _percent(value: float) -> str:
    """A percentage as the papers print it: 100, 80, 51.2, 21, 8.6, 3.5, 0.12."""
    return f"{value:.3g}" if value >= 10 else f"{value:.2g}"


def _density_axis(ax, percents, label: str) -> None:
    """Percent of weights remaining on a decreasing log axis spanning the data (plus
    `MARGIN`), with a tick at every level's density, labelled where there is room: from the
    sparsest level (always labelled: the one a plot is read for) towards the dense one, a
    label at least `LABEL_SPACING` from the last."""
    levels = np.unique(np.asarray(percents, dtype=float))
    levels = levels[np.isfinite(levels) & (levels > 0)]
    ax.set_xscale("log")
    ax.set_xlabel("percent of weights remaining")
    ax.set_ylabel(label)
    ax.grid(True, which="both", alpha=0.3)
    if not len(levels):
        return
    decades = np.log10(levels[-1] / levels[0])
    inches = ax.get_position().width * ax.figure.get_figwidth()
    labelled = [levels[0]]
    for level in levels[1:]:
        if np.log10(level / labelled[-1]) >= decades * LABEL_SPACING / inches:
            labelled.append(level)
    ax.set_xticks(levels, minor=True)
    ax.set_xticks(labelled, [_percent(p) for p in labelled])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    pad = 10 ** (MARGIN * decades) if decades else 1.1
    ax.set_xlim(levels[-1] * pad, levels[0] / pad)  # decreasing: dense on the left


def _colours(names) -> dict:
    """A colour per name (branch), in order of appearance, the same in every panel, so that
    one legend serves them all."""
    return {name: f"C{i % 10}" for i, name in enumerate(dict.fromkeys(names))}


def _legend(figure, title: str | None = None) -> None:
    """One legend for the whole figure, below the panels so that it covers no data, each
    label once, in as few rows as the figure's width holds (rows filled evenly)."""
    entries = {}
    for ax in figure.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    renderer = figure.canvas.get_renderer()
    for widest in range(len(entries), 0, -1):
        rows = -(-len(entries) // widest)
        legend = figure.legend(entries.values(), entries.keys(), loc="outside lower center",
                               ncols=-(-len(entries) // rows), title=title, frameon=False)
        if widest == 1 or legend.get_window_extent(renderer).width <= figure.bbox.width:
            return
        legend.remove()


def _accuracy_label(accuracy: str) -> str:
    return ("test accuracy at early stop (%)" if accuracy == "early_stop"
            else f"{accuracy} test accuracy (%)")


def _wrap(text, inches: float) -> None:
    """Break a title into lines no wider than `inches`: first at 0.5 em a character, then
    shorter lines until the renderer measures them within the width."""
    words, renderer = text.get_text(), text.figure.canvas.get_renderer()
    chars = int(inches * 72 / (0.5 * text.get_fontsize()))
    while True:
        text.set_text(textwrap.fill(words, max(chars, 12)))
        if chars <= 12 or text.get_window_extent(renderer).width <= inches * text.figure.dpi:
            return
        chars -= 4


def _save(figure, path: Path, title: str = "") -> Path:
    """Write the figure, each panel's title wrapped to its panel's width and the figure's to
    the figure's, so that long titles (a sweep's panels) neither overlap nor run off."""
    figure.draw_without_rendering()  # lays the panels out: their widths
    for ax in figure.axes:
        _wrap(ax.title, ax.get_position().width * figure.get_figwidth())
    if title:
        _wrap(figure.suptitle(title), figure.get_figwidth())
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _grid(count: int, columns: int = 3, sharey: bool = True):
    """A figure of `count` panels of `PANEL` inches (at most `columns` a row, unused axes
    hidden), with room below them for the legend."""
    columns = min(columns, count)
    rows = -(-count // columns)
    figure, axes = plt.subplots(rows, columns, sharey=sharey, squeeze=False,
                                figsize=(PANEL[0] * columns, PANEL[1] * rows + 0.6),
                                layout="constrained")
    for ax in axes.ravel()[count:]:
        ax.set_visible(False)
    return figure, axes.ravel()[:count]


def plot_tickets_vs_controls(summaries: pd.DataFrame, path: Path, title: str = "",
                             accuracy: str = "early_stop") -> Path:
    """Early-stop iteration and test accuracy (at early stop, or "final") against percent of
    weights remaining (log axis, decreasing), one line per branch, error bars = std over
    replicates."""
    table = summary_table(summaries, accuracy)
    figure, (steps_ax, accuracy_ax) = _grid(2, sharey=False)
    colours = _colours(table["branch"])
    for branch, rows in table.groupby("branch", sort=False):
        percent = 100 * rows["density"]
        style = dict(marker="o", markersize=3, capsize=2, label=branch, color=colours[branch])
        steps_ax.errorbar(percent, rows["early_stop_step_mean"], rows["early_stop_step_std"], **style)
        accuracy_ax.errorbar(percent, 100 * rows["accuracy_mean"], 100 * rows["accuracy_std"], **style)
    _density_axis(steps_ax, 100 * table["density"], "early-stop iteration")
    _density_axis(accuracy_ax, 100 * table["density"], _accuracy_label(accuracy))
    _legend(figure)
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
    figure, axes = _grid(len(panels), columns)
    colours = _colours(b for summaries in panels.values() for b in summaries["branch"])
    for ax, (name, summaries) in zip(axes, panels.items()):
        table = summary_table(summaries, accuracy)
        for branch, rows in table.groupby("branch", sort=False):
            ax.errorbar(100 * rows["density"], 100 * rows["accuracy_mean"],
                        100 * rows["accuracy_std"], marker="o", markersize=3, capsize=2,
                        label=branch, color=colours[branch])
        _density_axis(ax, 100 * table["density"], _accuracy_label(accuracy))
        ax.set_title(name)
    _legend(figure)
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


def _titled_panels(frame: pd.DataFrame, panels, *titles: str):
    """(figure title, `_panels`): the `panels` columns holding one value throughout are
    named once, in the figure's title after `titles`, rather than in every panel's."""
    panels = list(panels or ())
    same = [c for c in panels if frame[c].nunique(dropna=False) == 1]
    common = _panel_label(same, tuple(frame[c].iloc[0] for c in same))
    title = "; ".join(t for t in (*titles, common) if t)
    return title, _panels(frame, [c for c in panels if c not in same])


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

    title, groups = _titled_panels(summaries, panels, title)
    figure, axes = _grid(len(groups))
    colours = _colours(summaries["branch"])
    for ax, (name, rows) in zip(axes, groups):
        table = aggregate(rows, ["level", "branch"], (metric,), ("mean", "std"))
        for branch, lines in table.groupby("branch", sort=False):
            _band(ax, 100 * lines["density"], lines[f"{metric}_mean"], lines[f"{metric}_std"],
                  branch, scale, color=colours[branch])
        _density_axis(ax, 100 * table["density"], ylabel)
        ax.set_title(name, fontsize=9)
    _legend(figure)
    return _save(figure, path, title)


def plot_perplexity_vs_sparsity(summaries: pd.DataFrame, path: Path, title: str = "") -> Path:
    """`lottery llm` runs: perplexity (log axis) against sparsity, one line per method, one
    panel per model; sparsities in order, unstructured ones then N:M patterns (a category
    axis: 50% and 2:4 prune as many weights, in different patterns); the dense model's
    perplexity as a dashed line. Runs that evaluated nothing (timing only): seconds instead."""
    from lottery.llm.table import llm_summary, sparsity_order

    table = llm_summary(summaries)
    metric, label = (("perplexity", "perplexity (lower is better)")
                     if table["perplexity"].notna().any() else
                     ("seconds", "seconds to prune (no evaluation)"))
    groups = list(table.groupby("model", sort=False))
    figure, axes = _grid(len(groups), sharey=False)
    colours = _colours(table["branch"])
    for ax, (model, rows) in zip(axes, groups):
        order = sorted(set(rows["sparsity"]) - {"0"}, key=sparsity_order)
        place = {value: i for i, value in enumerate(order)}
        for method, lines in rows[rows["branch"] != "dense"].groupby("branch", sort=False):
            lines = lines.assign(x=lines["sparsity"].map(place)).sort_values("x")
            ax.plot(lines["x"], lines[metric], "o-", label=method, color=colours[method])
        for value in rows.loc[rows["branch"] == "dense", "perplexity"].drop_duplicates():
            ax.axhline(value, color="black", linestyle="--", linewidth=1, label="dense")
        ax.set_xticks(range(len(order)), order)
        ax.set_yscale("log")
        ax.set_xlabel("sparsity (fraction pruned, or N:M kept)")
        ax.set_ylabel(label)
        ax.set_title(Path(str(model)).name, fontsize=9)
    _legend(figure)
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
    (coloured from dense to sparsest; `levels`, default at most `most_levels` evenly spaced
    ones so the lines stay readable), mean over replicates with a std band; one panel per
    combination of `panels`. The legend names each level shown with its percent remaining,
    and how many of the levels are shown when not all are. The y-axis is fitted to the
    evaluations after each level's first one, so the untrained networks' accuracy does not
    flatten the curves."""
    from lottery.analysis.results import aggregate

    evals = evals[evals["branch"] == branch]
    if evals.empty:
        raise ValueError(f"no eval rows of branch {branch!r}")
    every = sorted(evals["level"].unique())
    shown = _some_levels(every, most_levels) if levels is None else sorted(levels)
    evals = evals[evals["level"].isin(shown)]
    title, groups = _titled_panels(evals, panels, title, f"{branch} branch")
    figure, axes = _grid(len(groups))
    colours = plt.get_cmap("viridis")([i / max(1, len(shown) - 1) for i in range(len(shown))])
    density = 100 * evals.groupby("level")["density"].mean()
    scale = 100.0 if "accuracy" in metric else 1.0
    trained = []
    for ax, (name, rows) in zip(axes, groups):
        table = aggregate(rows, ["level", "step"], (metric,), ("mean", "std"))
        for level, lines in table.groupby("level", sort=True):
            _band(ax, lines["step"], lines[f"{metric}_mean"], lines[f"{metric}_std"],
                  f"level {level}: {_percent(density[level])}%", scale,
                  color=colours[shown.index(level)])
            if len(lines) > 3:
                trained.append(scale * lines[f"{metric}_mean"].iloc[1:])
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(6, integer=True))
        ax.xaxis.set_major_formatter(matplotlib.ticker.StrMethodFormatter("{x:,.0f}"))
        ax.set_xlabel("training step")
        ax.set_ylabel(metric.replace("_", " ") + (" (%)" if scale == 100.0 else ""))
        ax.set_title(name, fontsize=9)
        ax.grid(True, alpha=0.3)
    if trained:  # once for all panels: they share the y-axis
        low, high = pd.concat(trained).agg(["min", "max"])
        margin = MARGIN * (high - low) or 0.5
        axes[0].set_ylim(low - margin, high + margin)
    count = f"{len(shown)} of {len(every)} levels shown" if len(shown) < len(every) else ""
    _legend(figure, ", ".join(filter(None, (count, "level: % of weights remaining"))))
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
    title, groups = _titled_panels(rows, panels, title)
    figure, axes = _grid(len(groups))
    colours = _colours(rows["branch"])
    for ax, (name, group) in zip(axes, groups):
        table = aggregate(group, ["branch", column], (metric,), ("mean", "std"))
        table = table.sort_values(column, kind="stable")
        for branch, lines in table.groupby("branch", sort=False):
            _band(ax, lines[column], lines[f"{metric}_mean"], lines[f"{metric}_std"],
                  branch, 100.0, color=colours[branch])
        percent = _percent(100 * group["density"].mean())
        ax.set_title(f"level {level}, {percent}% remaining{': ' + name if name else ''}",
                     fontsize=9)
        ax.set_xticks(sorted(table[column].dropna().unique()))
        ax.set_xlabel(f"rewind step k ({column})")
        ax.set_ylabel(_accuracy_label(accuracy))
        ax.grid(True, alpha=0.3)
    _legend(figure)
    return _save(figure, path, title)
