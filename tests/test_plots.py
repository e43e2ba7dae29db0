"""Every plot of `lottery.analysis.plots` reads right, drawn from a hand-built table: 9 levels
at densities 0.8**level, two branches, two replicates, two panels with long titles.

Each figure is drawn as `lottery report` draws it (the same function, saved to a PNG) and its
axes checked with the renderer: ticks at the levels' densities (the sparsest labelled), limits
fitted to the data, legends off the axes, titles apart, the shown levels named. Expected values
come from the table built here, never from the plotting code.
"""

import re

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from lottery.analysis import plots

LEVELS = range(9)
PERCENT = {level: 100 * 0.8**level for level in LEVELS}  # percent of weights remaining
BRANCHES = ("ticket", "random_prune")
PANEL = "optimizer.schedule"  # the swept column: one panel per value, long values
VALUES = ("linear_warmup_for_the_first_thousand_steps_then_cosine_decay_to_zero_version_a",
          "linear_warmup_for_the_first_thousand_steps_then_cosine_decay_to_zero_version_b")
STEPS = (0, 10, 20, 30, 40)


def accuracy(level: int, branch: int, replicate: int, panel: int) -> float:
    return 0.95 - 0.01 * level * (1 + 2 * branch) + 0.004 * replicate - 0.01 * panel


@pytest.fixture(scope="module")
def summaries() -> pd.DataFrame:
    return pd.DataFrame([
        {PANEL: value, "model.name": "lenet_300_100", "rewind.step": rewind, "level": level,
         "branch": name, "replicate": replicate, "density": PERCENT[level] / 100,
         "early_stop_test_accuracy": accuracy(level, branch, replicate, panel) + rewind / 1e3,
         "final_test_accuracy": accuracy(level, branch, replicate, panel) - 0.01,
         "early_stop_step": 100 + 10 * level + 5 * replicate}
        for panel, value in enumerate(VALUES) for rewind in (0, 20) for level in LEVELS
        for branch, name in enumerate(BRANCHES) for replicate in (0, 1)])


@pytest.fixture(scope="module")
def evals(summaries) -> pd.DataFrame:
    rows = summaries.drop(columns=["early_stop_test_accuracy", "final_test_accuracy"])
    return pd.concat([rows.assign(step=step, test_accuracy=0.1 + 0.02 * step
                                  - 0.001 * rows["level"] + 0.002 * rows["replicate"])
                      for step in STEPS], ignore_index=True)


@pytest.fixture
def drawn(monkeypatch):
    """The figures the plot functions save, kept open (and drawn) for the checks."""
    figures, close = [], plt.close
    monkeypatch.setattr(plots.plt, "close", figures.append)
    yield figures
    for figure in figures:
        close(figure)


def last(figures):
    figure = figures[-1]
    figure.canvas.draw()
    return figure, [ax for ax in figure.axes if ax.get_visible()]


def check_layout(figure, axes, entries: set[str]):
    """One or more legends naming `entries`, none over any axes; titles apart, inside."""
    legends = [*figure.legends, *(ax.get_legend() for ax in axes if ax.get_legend())]
    assert {t.get_text() for legend in legends for t in legend.get_texts()} == entries
    boxes = [ax.get_window_extent() for ax in axes]
    for legend in legends:
        assert not any(legend.get_window_extent().overlaps(box) for box in boxes)
    titles = [ax.title.get_window_extent() for ax in axes if ax.get_title()]
    if figure._suptitle is not None:
        titles.append(figure._suptitle.get_window_extent())
    for i, box in enumerate(titles):
        assert figure.bbox.x0 <= box.x0 and box.x1 <= figure.bbox.x1, "title runs off"
        assert not any(box.overlaps(other) for other in titles[i + 1:]), "titles overlap"


def check_density_axis(ax, percents):
    """Ticks at the data's densities, the sparsest labelled; decreasing log limits holding
    all the data and at most a small margin (10% of its span in decades) beyond it."""
    percents = np.array(sorted(percents))
    ticks, minor = ax.get_xticks(), ax.get_xticks(minor=True)
    assert np.isclose(ticks, percents.min()).any(), ticks
    for tick in (*ticks, *minor):
        assert np.isclose(percents, tick).any(), tick
    assert all(np.isclose(np.concatenate([ticks, minor]), p).any() for p in percents)
    labels = [label.get_text() for label in ax.get_xticklabels()]
    assert len(labels) == len(ticks) and all(labels), labels
    sparsest = labels[list(ticks).index(min(ticks))]
    assert float(sparsest) == pytest.approx(percents.min(), rel=0.01), sparsest
    left, right = ax.get_xlim()
    assert left > right, "the density axis decreases"
    assert right <= percents.min() and left >= percents.max()
    span = np.log10(percents.max() / percents.min())
    assert np.log10(left / right) <= 1.2 * span


def check_fitted(limits, low, high):
    """Limits holding [low, high] with at most 10% of its span beyond each side."""
    bottom, top = limits
    assert bottom <= low and top >= high, (limits, low, high)
    assert top - bottom <= 1.2 * (high - low), (limits, low, high)


def spread(rows, metric, scale, by):
    """The lowest and highest mean ∓ std over replicates (the bands and error bars)."""
    stats = rows.groupby(by)[metric].agg(["mean", "std"])
    return (scale * (stats["mean"] - stats["std"]).min(),
            scale * (stats["mean"] + stats["std"]).max())


def test_density_plots_read_right(summaries, drawn, tmp_path):
    rows = summaries[summaries["rewind.step"] == 0]
    plots.plot_accuracy_vs_density(rows, tmp_path / "a.png", [PANEL, "model.name"])
    figure, axes = last(drawn)
    assert len(axes) == 2
    for ax, value in zip(axes, VALUES):
        assert value in "".join(ax.get_title().split()), ax.get_title()  # wrapped, whole
        check_density_axis(ax, PERCENT.values())
    check_fitted(axes[0].get_ylim(), *spread(rows, "early_stop_test_accuracy", 100,
                                             [PANEL, "level", "branch"]))
    check_layout(figure, axes, set(BRANCHES))
    assert "model.name=lenet_300_100" in figure._suptitle.get_text()  # same in both panels

    plots.plot_early_stop_vs_density(rows, tmp_path / "e.png", [PANEL])
    figure, axes = last(drawn)
    for ax in axes:
        check_density_axis(ax, PERCENT.values())
    check_fitted(axes[0].get_ylim(), *spread(rows, "early_stop_step", 1,
                                             [PANEL, "level", "branch"]))
    check_layout(figure, axes, set(BRANCHES))

    one = rows[rows[PANEL] == VALUES[0]]
    plots.plot_tickets_vs_controls(one, tmp_path / "t.png", title=VALUES[0] * 2)
    figure, axes = last(drawn)
    for ax in axes:
        check_density_axis(ax, PERCENT.values())
    check_fitted(axes[1].get_ylim(), *spread(one, "early_stop_test_accuracy", 100,
                                             ["level", "branch"]))
    check_layout(figure, axes, set(BRANCHES))

    plots.plot_accuracy_panels({value: rows[rows[PANEL] == value] for value in VALUES},
                               tmp_path / "p.png")
    figure, axes = last(drawn)
    for ax in axes:
        check_density_axis(ax, PERCENT.values())
    check_layout(figure, axes, set(BRANCHES))


def test_learning_curves_name_the_levels_shown(evals, drawn, tmp_path):
    rows = evals[evals["rewind.step"] == 0]
    plots.plot_learning_curves(rows, tmp_path / "l.png", panels=[PANEL])
    figure, axes = last(drawn)
    (legend,) = figure.legends
    named = {}
    for label in (t.get_text() for t in legend.get_texts()):
        level, percent = re.fullmatch(r"level (\d+): ([\d.]+)%", label).groups()
        named[int(level)] = float(percent)
    assert len(named) == 6 and {0, 8} <= set(named)  # the dense and the sparsest level
    for level, percent in named.items():
        assert percent == pytest.approx(PERCENT[level], rel=0.02)
    assert "6 of 9 levels shown" in legend.get_title().get_text()
    check_layout(figure, axes, {t.get_text() for t in legend.get_texts()})

    plots.plot_learning_curves(rows, tmp_path / "all.png", panels=[PANEL], most_levels=9)
    figure, axes = last(drawn)
    assert len(figure.legends[0].get_texts()) == 9
    assert "of 9" not in figure.legends[0].get_title().get_text()


def test_rewind_sweep_reads_right(summaries, drawn, tmp_path):
    plots.plot_rewind_sweep(summaries, tmp_path / "r.png", panels=[PANEL])
    figure, axes = last(drawn)
    assert len(axes) == 2
    for ax in axes:
        assert set(ax.get_xticks()) == {0, 20}
        check_fitted(ax.get_xlim(), 0, 20)
    check_layout(figure, axes, set(BRANCHES))
