"""Diverged members are left out of the tables, reports and plots, and counted.

A hand-written record: levels 0 and 1, branches ticket and random_prune, 3 replicates. At
level 1, random_prune replicate 1 diverged at step 100 and kept the untrained network's
early-stop accuracy 0.10; its two healthy replicates have 0.97 (step 100) and 0.98 (step
200). Expected numbers are computed by hand:
  mean (0.97 + 0.98) / 2 = 0.975, std (ddof 1) = 0.005 * sqrt(2) = 0.0070711,
  early-stop step mean (100 + 200) / 2 = 150, std 50 * sqrt(2) = 70.71;
  with the diverged member (an old record without `status`): (0.97 + 0.10 + 0.98) / 3.
"""

import json
import math

import pytest
import wandb

from lottery.analysis import plots, report, results
from lottery.record import RECORD_NAME, load, markdown_table, summary_table, wandb_summary

# (level, branch, replicate): (early-stop test accuracy, early-stop step)
MEMBERS = {
    **{(0, b, r): (0.98, 200) for b in ("ticket", "random_prune") for r in range(3)},
    (1, "ticket", 0): (0.96, 100), (1, "ticket", 1): (0.97, 200), (1, "ticket", 2): (0.98, 300),
    (1, "random_prune", 0): (0.97, 100), (1, "random_prune", 1): (0.10, 0),
    (1, "random_prune", 2): (0.98, 200),
}
DIVERGED = (1, "random_prune", 1)
OK_MEAN, OK_STD, OK_STEP = 0.975, 0.005 * math.sqrt(2), 150.0


def rows(config: dict | None = None) -> list[dict]:
    """The record's rows: per member, evaluations at steps 0..300 (a diverged member's last
    one empty), then its summary row; `config`: the `run` row's."""
    out = [{"kind": "run", "config": config or {}}]
    for (level, branch, replicate), (accuracy, step) in MEMBERS.items():
        member = {"level": level, "branch": branch, "replicate": replicate,
                  "density": 1.0 if level == 0 else 0.8}
        gone = (level, branch, replicate) == DIVERGED
        for at in (0, 100) if gone else (0, 100, 200, 300):
            value = None if gone and at == 100 else 0.5 + at / 1000
            out.append({"kind": "eval", **member, "step": at, "val_loss": value,
                        "test_accuracy": value})
        out.append({"kind": "summary", **member, "status": "diverged" if gone else "ok",
                    "diverged_step": 100 if gone else None, "early_stop_step": step,
                    "early_stop_test_accuracy": accuracy,
                    "final_test_accuracy": None if gone else accuracy})
    return out


@pytest.fixture
def run_dir(tmp_path):
    (tmp_path / RECORD_NAME).write_text("".join(json.dumps(r) + "\n" for r in rows()))
    return tmp_path


def row_of(table, level, branch):
    return table[(table["level"] == level) & (table["branch"] == branch)].iloc[0]


def test_summary_table_averages_only_the_healthy_members(run_dir):
    table = summary_table(load(run_dir, kind="summary"))
    row = row_of(table, 1, "random_prune")
    assert row["accuracy_mean"] == pytest.approx(OK_MEAN, abs=1e-12)
    assert row["accuracy_std"] == pytest.approx(OK_STD, abs=1e-12)
    assert row["early_stop_step_mean"] == pytest.approx(OK_STEP)
    assert (row["replicates"], row["diverged"]) == (2, 1)
    ticket = row_of(table, 1, "ticket")
    assert ticket["accuracy_mean"] == pytest.approx(0.97, abs=1e-12)
    assert (ticket["replicates"], ticket["diverged"]) == (3, 0)
    assert table["diverged"].sum() == 1


def test_a_group_with_no_healthy_member_has_no_mean(run_dir):
    summaries = load(run_dir, kind="summary")
    table = summary_table(summaries[summaries["status"] == "diverged"])
    assert len(table) == 1 and math.isnan(table["accuracy_mean"].iloc[0])
    assert (table["replicates"].iloc[0], table["diverged"].iloc[0]) == (0, 1)


def test_records_without_status_are_all_ok(run_dir):
    old = load(run_dir, kind="summary").drop(columns=["status", "diverged_step"])
    row = row_of(summary_table(old), 1, "random_prune")
    assert row["accuracy_mean"] == pytest.approx((0.97 + 0.10 + 0.98) / 3, abs=1e-12)
    assert (row["replicates"], row["diverged"]) == (3, 0)


def test_markdown_table_marks_and_names_the_left_out_member(run_dir):
    text = markdown_table(load(run_dir, kind="summary"))
    level1 = next(line for line in text.splitlines() if line.startswith("| 1 |"))
    assert "| 97.50 ± 0.71 (1 diverged) |" in level1  # random_prune, the last column
    assert "| 97.00 ± 1.00 |" in level1  # ticket: (0.96, 0.97, 0.98)
    assert "Left out of the means: 1 diverged member (level 1 random_prune r1)." in text
    clean = markdown_table(load(run_dir, kind="summary").query("status == 'ok'"))
    assert "diverged" not in clean and "Left out" not in clean


def test_results_keep_every_row_and_aggregate_the_healthy_ones(run_dir):
    summaries = results.load(run_dir, kind="summary")
    assert len(summaries) == len(MEMBERS) and (summaries["status"] == "diverged").sum() == 1
    row = row_of(results.early_stop(summaries), 1, "random_prune")
    assert row["early_stop_test_accuracy_mean"] == pytest.approx(OK_MEAN, abs=1e-12)
    assert row["early_stop_test_accuracy_min"] == pytest.approx(0.97)
    assert row["early_stop_step_mean"] == pytest.approx(OK_STEP)
    assert (row["early_stop_test_accuracy_count"], row["diverged"]) == (2, 1)
    evals = results.load(run_dir, kind="eval")
    kept = results.healthy(evals, summaries)
    assert len(evals) - len(kept) == 2  # the diverged member's two evaluations
    assert not ((kept["level"] == 1) & (kept["branch"] == "random_prune")
                & (kept["replicate"] == 1)).any()


def test_plots_average_only_the_healthy_members(run_dir, monkeypatch):
    drawn = {}

    def band(ax, x, mean, std, label, scale=1.0, **style):
        drawn[label] = list(mean)
        ax.plot(x, mean, label=label)

    monkeypatch.setattr(plots, "_band", band)
    summaries = results.load(run_dir, kind="summary")
    plots.plot_accuracy_vs_density(summaries, run_dir / "a.png")
    assert drawn["random_prune"] == pytest.approx([0.98, OK_MEAN])
    plots.plot_early_stop_vs_density(summaries, run_dir / "e.png")
    assert drawn["random_prune"] == pytest.approx([200, OK_STEP])


def report_text(path, level1: str, networks: int, gone: int, replicates: int) -> str:
    """report.md of `path`, checked for its level-1 row, its count of trained networks and
    diverged ones, and the replicates each mean is over."""
    report.write_report(path)
    text = (path / "report.md").read_text()
    assert level1 in text
    assert f"{networks} trained networks, {gone} of them diverged" in text
    assert (f"mean ± std over {replicates} replicates per level and branch (diverged ones "
            "left out)") in text
    return text


def test_report_says_how_many_were_left_out_and_where(run_dir):
    # level 1: ticket steps 100, 200, 300 (200 ± 100) and accuracies 0.96, 0.97, 0.98;
    # random_prune as in the module's docstring
    row = "| 1 | 80.0 | 200 ± 100 | 97.00 ± 1.00 | 150 ± 71 | 97.50 ± 0.71 (1 diverged) |"
    text = report_text(run_dir, row, networks=12, gone=1, replicates=3)
    assert "Left out of the means: 1 diverged member (level 1 random_prune r1)." in text


def test_wandb_levels_table_leaves_them_out_and_summaries_keep_them(run_dir, monkeypatch):
    logged = {}

    class Run:
        def log(self, values):
            logged.update(values)

        def finish(self):
            pass

    monkeypatch.setattr(wandb, "init", lambda **kwargs: Run())
    monkeypatch.setattr(wandb, "Table", lambda dataframe: dataframe)
    monkeypatch.setattr(wandb, "Image", lambda path: path)
    wandb_summary(run_dir, {"figure": run_dir / "figure.png"})
    assert len(logged["summaries"]) == len(MEMBERS)
    assert (logged["summaries"]["status"] == "diverged").sum() == 1
    row = row_of(logged["levels"], 1, "random_prune")
    assert row["accuracy_mean"] == pytest.approx(OK_MEAN, abs=1e-12)
    assert (row["replicates"], row["diverged"]) == (2, 1)
    assert logged["figure"] == str(run_dir / "figure.png")  # what it was given, as it is
    logged.clear()
    wandb_summary(run_dir)  # once per run folder: a finished run started again logs nothing
    assert logged == {}


def test_a_report_over_several_runs_names_the_run(tmp_path):
    """Two runs (seeds 0 and 1, pooled; the same rows): at level 1, random_prune has four
    healthy members (0.97, 0.98, 0.97, 0.98; std with ddof 1 = sqrt(4 * 0.005**2 / 3) =
    0.0057735; steps 100, 200, 100, 200: 150 ± 57.7) and two left out, each named with its
    run; ticket has six (0.96, 0.97, 0.98 twice: std sqrt(4 * 0.01**2 / 5) = 0.0089443; steps
    100, 200, 300 twice: 200 ± 89.4)."""
    for seed, name in enumerate(("a", "b")):  # two copies of one run would count once
        (tmp_path / name).mkdir()
        (tmp_path / name / RECORD_NAME).write_text(
            "".join(json.dumps(r) + "\n" for r in rows({"seed": seed})))
    row = "| 1 | 80.0 | 200 ± 89 | 97.00 ± 0.89 | 150 ± 58 | 97.50 ± 0.58 (2 diverged) |"
    text = report_text(tmp_path, row, networks=24, gone=2, replicates=6)
    assert ("Left out of the means: 2 diverged members (a level 1 random_prune r1, "
            "b level 1 random_prune r1).") in text
