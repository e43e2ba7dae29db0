"""`lottery report` and the results API on a real two-job Hydra sweep (rewind.step=0,20).

The sweep runs once per module as the user would start it (`lottery -m ...`, a subprocess
inheriting conftest's environment: W&B disabled, synthetic data, two CPU devices); the
report's table is checked against pandas on the raw `record.jsonl` rows, with the rewind
step read from each record's own resolved config rather than from the override files.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from helpers import TINY

import lottery.cli
from lottery.analysis import results

PLOTS = ("accuracy_vs_density.png", "early_stop_vs_density.png", "learning_curves.png",
         "rewind_sweep.png")


def command() -> list[str]:
    """The `lottery` console script when installed, else the module."""
    script = Path(sys.executable).parent / "lottery"
    return [str(script)] if script.exists() else [sys.executable, "-m", "lottery.cli"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    overrides = [f"{k}={v}" for k, v in TINY.items() if k != "seed"]
    result = subprocess.run(
        [*command(), "-m", *overrides, "rewind.step=0,20", f"hydra.sweep.dir={root / 'sweep'}"],
        cwd=root, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return root / "sweep"


@pytest.fixture(scope="module")
def report(sweep):
    result = subprocess.run([*command(), "report", str(sweep)], capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def raw_summaries(sweep: Path) -> pd.DataFrame:
    """Summary rows of every job, with the job's rewind step from its own `run` row."""
    frames = []
    for file in sweep.glob("*/record.jsonl"):
        rows = [json.loads(line) for line in file.read_text().splitlines()]
        step = next(r for r in rows if r["kind"] == "run")["config"]["rewind"]["step"]
        frame = pd.DataFrame([r for r in rows if r["kind"] == "summary"])
        frames.append(frame.assign(rewind_step=step))
    return pd.concat(frames, ignore_index=True)


def report_tables(text: str) -> pd.DataFrame:
    """The cells of report.md's tables, one row per level and branch, with the
    `## rewind.step=K` heading each table is under (a table: per level, % remaining, then
    each branch's early-stop step and test accuracy, both "mean ± std")."""
    rows, step, branches = [], None, []
    for line in text.splitlines():
        if heading := re.match(r"## rewind\.step=(\d+)$", line):
            step = int(heading.group(1))
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[:2] == ["level", "% remaining"]:
            branches = [c.removesuffix(" early-stop iter") for c in cells[2::2]]
        elif step is not None and cells[0].isdigit():
            assert len(cells) == 2 + 2 * len(branches), line
            for branch, stop, accuracy in zip(branches, cells[2::2], cells[3::2]):
                stop, accuracy = ([float(x) for x in c.split("±")] for c in (stop, accuracy))
                rows.append({"rewind_step": step, "level": int(cells[0]), "branch": branch,
                             "percent": float(cells[1]), "mean": accuracy[0],
                             "std": accuracy[1], "stop": stop[0]})
    return pd.DataFrame(rows)


def test_report_writes_the_plots_and_the_table(sweep, report):
    for name in ("report.md", *PLOTS):
        file = sweep / name
        assert file.is_file() and str(file) in report.stdout, (name, report.stdout)
        if name.endswith(".png"):
            assert file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (sweep / "report.md").read_text()
    assert "Swept: `rewind.step` (0, 20)" in text
    assert text.count("| level | % remaining |") == 2  # one table per rewind step


def test_table_equals_pandas_on_the_raw_rows(sweep, report):
    text = (sweep / "report.md").read_text()
    table = report_tables(text)
    raw = raw_summaries(sweep)
    expected = raw.groupby(["level", "branch", "rewind_step"]).agg(
        mean=("early_stop_test_accuracy", "mean"), std=("early_stop_test_accuracy", "std"),
        stop=("early_stop_step", "mean"), n=("replicate", "count"),
        percent=("density", "mean")).reset_index()
    assert len(table) == len(expected) == 2 * 3 * 3  # rewind steps x levels x branches
    merged = table.merge(expected, on=["level", "branch", "rewind_step"],
                         suffixes=("", "_pandas"))
    assert len(merged) == len(expected)
    for column, scale, tolerance in (("mean", 100, 0.006), ("std", 100, 0.006),
                                     ("stop", 1, 0.6), ("percent", 100, 0.06)):
        difference = (merged[column] - scale * merged[f"{column}_pandas"]).abs()
        assert (difference <= tolerance).all(), merged[[column, f"{column}_pandas"]]
    # every group averages all its replicates: pandas counts 2, and the report says so
    assert (merged["n"] == 2).all()
    assert "mean ± std over 2 replicates per level and branch." in text
    assert "diverged" not in text


def test_results_api_has_the_override_columns(sweep):
    summaries = results.load(sweep, kind="summary")
    assert results.swept(summaries) == ["rewind.step"]
    assert {"dataset", "train.steps", "prune.levels"} <= set(results.overrides(summaries))
    assert sorted(summaries["rewind.step"].unique()) == [0, 20]  # numbers, not strings
    assert summaries["train.steps"].eq(40).all() and summaries["dataset"].eq("synthetic").all()
    runs = sorted(summaries["run"].unique())  # each job's directory: its run id
    assert runs == sorted(file.parent.name for file in sweep.glob("*/record.jsonl"))
    assert len(runs) == 2
    table = results.early_stop(summaries)
    assert list(table.columns[:4]) == ["rewind.step", "level", "branch", "density"]
    assert len(table) == 18 and table["early_stop_test_accuracy_count"].eq(2).all()
    assert (table["early_stop_test_accuracy_min"] <= table["early_stop_test_accuracy_mean"]).all()
    both = results.load([sweep / run for run in runs], kind="summary")
    assert len(both) == len(summaries) and results.swept(both) == ["rewind.step"]
    late = summaries.loc[summaries["rewind.step"] == 20, "run"].iloc[0]
    single = results.load(sweep / late, kind="eval")
    assert set(single["run"]) == {"."} and single["rewind.step"].eq(20).all()
    curves = results.curves(single)
    assert {"level", "branch", "step", "test_accuracy_mean"} <= set(curves.columns)


def test_override_values_are_parsed():
    parsed = [results.parse_value(v) for v in ("20", "1e-3", "0.5", "true", "null", "adam",
                                               "[1,2]")]
    assert parsed == [20, 0.001, 0.5, True, None, "adam", "[1,2]"]


@pytest.mark.parametrize("case", ["missing", "empty"])
def test_bad_dir_fails_with_one_line(tmp_path, monkeypatch, capsys, case):
    path = tmp_path / "nothing"
    if case == "empty":
        path.mkdir()
    monkeypatch.setattr(sys, "argv", ["lottery", "report", str(path)])
    with pytest.raises(SystemExit) as exit_info:
        lottery.cli.main()
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lottery: error: ") and str(path) in lines[0]
