"""The standard lottery-ticket plots, made from summary rows (`load(run, kind="summary")`)."""

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
