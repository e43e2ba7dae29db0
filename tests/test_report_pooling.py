"""`lottery report` pools what users pool (issue 17.6), on run folders written here by hand
(a `run` row with its config, summary and eval rows, Hydra's `.hydra/overrides.yaml` and
`.hydra/hydra.yaml`): the runs of a `seed=0,1` sweep are one table (`--by seed` splits it),
two folders of one run are counted once, a key one run did not override holds that run's
own value (not nan), and integers print as integers. Every expected cell is computed by hand
in the comments: mean, and std with n - 1."""

import json
import sys
from pathlib import Path

import pytest

import lottery.cli

# accuracy and early-stop step of each (seed, level, replicate) of the ticket
ACCURACY = {(0, 0, 0): 0.90, (0, 0, 1): 0.92, (1, 0, 0): 0.94, (1, 0, 1): 0.96,
            (0, 1, 0): 0.80, (0, 1, 1): 0.80, (1, 1, 0): 0.84, (1, 1, 1): 0.84}
STEP = {(0, 0, 0): 10, (0, 0, 1): 20, (1, 0, 0): 30, (1, 0, 1): 40,
        (0, 1, 0): 20, (0, 1, 1): 20, (1, 1, 0): 20, (1, 1, 1): 20}
DENSITY = {0: 1.0, 1: 0.8}


def config(seed: int, **prune) -> dict:
    return {"name": "default", "seed": seed, "replicates": 2, "branches": ["ticket"],
            "dataset": {"name": "synthetic"}, "model": {"name": "lenet_300_100"},
            "train": {"steps": 40}, "rewind": {"step": 0},
            "prune": {"levels": 1, "structure": "weights", "layer_rates": None, **prune}}


def write_run(folder: Path, overrides: list[str], cfg: dict, seed: int) -> None:
    """One run's folder; the metrics of `seed`'s members (ACCURACY, STEP)."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(
        "".join(f"- {o}\n" for o in overrides))
    (folder / ".hydra" / "hydra.yaml").write_text(
        "hydra:\n  runtime:\n    choices:\n      experiment: null\n      dataset: synthetic\n")
    rows = [{"kind": "run", "name": "default", "config": cfg}]
    for level in (0, 1):
        for replicate in (0, 1):
            member = {"level": level, "branch": "ticket", "replicate": replicate,
                      "density": DENSITY[level]}
            accuracy = ACCURACY[seed, level, replicate]
            rows += [{"kind": "eval", **member, "step": step, "test_accuracy": accuracy,
                      "val_loss": 1.0} for step in (0, 40)]
            rows.append({"kind": "summary", **member, "status": "ok",
                         "early_stop_step": STEP[seed, level, replicate],
                         "early_stop_test_accuracy": accuracy, "final_test_accuracy": accuracy})
    (folder / "record.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def report(path: Path, *args: str, monkeypatch) -> str:
    monkeypatch.setattr(sys, "argv", ["lottery", "report", str(path), *args])
    with pytest.raises(SystemExit) as exit_:
        lottery.cli.main()
    assert exit_.value.code == 0
    return (path / "report.md").read_text()


def table_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line[:3] in ("| 0", "| 1")]


@pytest.fixture
def seed_sweep(tmp_path) -> Path:
    sweep = tmp_path / "sweep"
    for seed in (0, 1):
        write_run(sweep / f"run{seed}", [f"seed={seed}", "prune.levels=1"], config(seed), seed)
    return sweep


def test_seeds_are_pooled_like_replicates(seed_sweep, monkeypatch):
    text = report(seed_sweep, monkeypatch=monkeypatch)
    # level 0: accuracies 90, 92, 94, 96: mean 93, std sqrt((9 + 1 + 1 + 9) / 3) = 2.58;
    #          steps 10, 20, 30, 40: mean 25, std sqrt((225 + 25 + 25 + 225) / 3) = 12.9
    # level 1: accuracies 80, 80, 84, 84: mean 82, std sqrt(4 * 4 / 3) = 2.31; steps all 20
    assert table_rows(text) == ["| 0 | 100.0 | 25 ± 13 | 93.00 ± 2.58 |",
                                "| 1 | 80.0 | 20 ± 0 | 82.00 ± 2.31 |"]
    assert text.count("| level | % remaining |") == 1 and "## seed" not in text
    assert "mean ± std over 4 replicates per level and branch, 2 values of `seed` pooled." in text
    assert "Pooled: `seed` (0, 1): its runs are replicates of one experiment (`--by seed` " \
           "splits them)." in text
    assert "Overrides: `prune.levels=1`" in text and "Swept" not in text


def test_by_seed_splits_the_seeds(seed_sweep, monkeypatch):
    text = report(seed_sweep, "--by", "seed", monkeypatch=monkeypatch)
    # seed 0, level 0: 90, 92: mean 91, std sqrt(2) = 1.41; steps 10, 20: 15 ± 7.07
    # seed 1, level 0: 94, 96: mean 95, std 1.41; steps 30, 40: 35 ± 7.07
    # level 1: 80, 80 and 84, 84: std 0
    assert "## seed=0\n" in text and "## seed=1\n" in text
    assert table_rows(text) == ["| 0 | 100.0 | 15 ± 7 | 91.00 ± 1.41 |",
                                "| 1 | 80.0 | 20 ± 0 | 80.00 ± 0.00 |",
                                "| 0 | 100.0 | 35 ± 7 | 95.00 ± 1.41 |",
                                "| 1 | 80.0 | 20 ± 0 | 84.00 ± 0.00 |"]
    assert "mean ± std over 2 replicates per level and branch." in text


def test_two_folders_of_one_run_are_counted_once(tmp_path, monkeypatch):
    """The same config spelled two ways (layer_rates null and {}: one run id) and a copy."""
    sweep = tmp_path / "sweep"
    write_run(sweep / "a", ["prune.layer_rates=null"], config(0), 0)
    write_run(sweep / "b", ["~prune.layer_rates.out"], config(0, layer_rates={}), 0)
    text = report(sweep, monkeypatch=monkeypatch)
    # only seed 0's two replicates: level 0 is 91.00 ± 1.41 (not 4 networks with std 1.15)
    assert table_rows(text) == ["| 0 | 100.0 | 15 ± 7 | 91.00 ± 1.41 |",
                                "| 1 | 80.0 | 20 ± 0 | 80.00 ± 0.00 |"]
    assert "1 run(s), 4 trained networks" in text
    lines = [line for line in text.splitlines() if line.startswith("Counted once: ")]
    assert len(lines) == 1 and "`b` is the same run as `a` (run " in lines[0]


def test_a_key_another_run_did_not_override_holds_its_own_value(tmp_path, monkeypatch):
    """Run a overrode prune.structure and rewind.step, run b neither: b's values are the
    ones its config holds (weights, 0), never nan, and integers print as integers."""
    sweep = tmp_path / "sweep"
    cfg = config(0, structure="neurons")
    cfg["rewind"] = {"step": 20}
    write_run(sweep / "a", ["prune.structure=neurons", "rewind.step=20"], cfg, 0)
    write_run(sweep / "b", [], config(1), 1)
    text = report(sweep, monkeypatch=monkeypatch)
    headings = [line for line in text.splitlines() if line.startswith("## prune")]
    assert headings == ["## prune.structure=neurons, rewind.step=20",
                        "## prune.structure=weights, rewind.step=0"]
    assert "Swept: `prune.structure` (neurons, weights), `rewind.step` (20, 0)." in text
    assert "nan" not in text and ".0`" not in text and "=20.0" not in text


def test_by_a_key_null_in_every_run_splits_as_null(seed_sweep, monkeypatch):
    """`--by prune.layer_rates` (null in both configs): one table headed by the null value,
    the seeds pooled as without it (the key's column was dropped as empty: a KeyError)."""
    text = report(seed_sweep, "--by", "prune.layer_rates", monkeypatch=monkeypatch)
    assert "## prune.layer_rates=null\n" in text
    assert table_rows(text) == ["| 0 | 100.0 | 25 ± 13 | 93.00 ± 2.58 |",
                                "| 1 | 80.0 | 20 ± 0 | 82.00 ± 2.31 |"]


def test_by_a_key_no_run_has_is_one_line_naming_the_nearest(seed_sweep, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["lottery", "report", str(seed_sweep), "--by",
                                      "prune.level"])
    with pytest.raises(SystemExit) as exit_:
        lottery.cli.main()
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "lottery: error: prune.level is not a config key of these runs (did you mean "
        "prune.levels?)"]
