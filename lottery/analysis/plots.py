"""The standard lottery-ticket plots, made from summary rows (`load(run, kind="summary")`)."""

from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from lottery.record import summary_table  # noqa: E402


TICKS = (100, 51.3, 21.1, 8.6, 3.6, 1.9, 0.5, 0.1)  # densities the papers report


def plot_tickets_vs_controls(summaries: pd.DataFrame, path: Path, title: str = "",
                             accuracy: str = "early_stop") -> Path:
    """Early-stop iteration and test accuracy (at early stop, or "final") against percent of
    weights remaining (log axis, decreasing), one line per branch, error bars = std over
    replicates."""
    table = summary_table(summaries, accuracy)
    accuracy_label = ("test accuracy at early stop (%)" if accuracy == "early_stop"
                      else f"{accuracy} test accuracy (%)")
    figure, (steps_ax, accuracy_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for branch, rows in table.groupby("branch", sort=False):
        percent = 100 * rows["density"]
        style = dict(marker="o", markersize=3, capsize=2, label=branch)
        steps_ax.errorbar(percent, rows["early_stop_step_mean"], rows["early_stop_step_std"], **style)
        accuracy_ax.errorbar(percent, 100 * rows["accuracy_mean"], 100 * rows["accuracy_std"], **style)
    for ax, label in ((steps_ax, "early-stop iteration"), (accuracy_ax, accuracy_label)):
        ax.set_xscale("log")
        ax.set_xticks([t for t in TICKS if table["density"].min() * 100 * 0.8 <= t])
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.invert_xaxis()
        ax.set_xlabel("percent of weights remaining")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
