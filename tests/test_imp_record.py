"""The record of a run (`record.jsonl`, `levels/level_NN.npz`, `rewind.npz`), early-stop
summaries, exact densities, rewinding to step k > 0, and `lottery.record.load`."""

import functools
import json
import re
import shutil

import jax
import numpy as np
import pandas as pd
import pytest

import helpers
from helpers import BRANCHES, LAYERS, METRICS, WEIGHTS, expected_counts, load_npz
from lottery.data import load_dataset
from lottery.models import build_model
from lottery.record import RECORD_NAME, load
from plain_loop import data_key, flat, hand_schedule, initial_weights, ones_like, plain_training

R, LEVELS = 2, 2
EVAL_COLUMNS = ["level", "branch", "replicate", "density", "step", "val_loss", "val_accuracy",
                "test_loss", "test_accuracy"]
TOTAL = sum(WEIGHTS.values())


@pytest.fixture(scope="module")
def evals(main_run):
    return load(main_run.dir, kind="eval")


@pytest.fixture(scope="module")
def summaries(main_run):
    return load(main_run.dir, kind="summary")


def steps_by_member(frame):
    return {key: rows["step"].tolist()
            for key, rows in frame.groupby(["level", "branch", "replicate"])}


# ---------------------------------------------------------------- files and rows


def test_run_writes_the_record_masks_and_rewind_weights(main_run):
    files = sorted(str(p.relative_to(main_run.dir)) for p in main_run.dir.rglob("*") if p.is_file())
    levels = [f"levels/level_{level:02d}{suffix}.npz" for level in range(3)
              for suffix in ("", "_random_prune", "_reinit")]
    assert files == [".lock", "checkpoints/finished.json", *levels, RECORD_NAME, "rewind.npz"]


def test_every_branchs_masks_are_on_disk(main_run):
    """reinit trains the ticket's masks; random_prune random ones with the ticket's counts
    per layer (its summary rows' per-layer densities say the same)."""
    summaries = load(main_run.dir, kind="summary")
    for level in range(3):
        ticket = load_npz(main_run.dir / "levels" / f"level_{level:02d}.npz")
        reinit = load_npz(main_run.dir / "levels" / f"level_{level:02d}_reinit.npz")
        random = load_npz(main_run.dir / "levels" / f"level_{level:02d}_random_prune.npz")
        assert set(ticket) == set(reinit) == set(random)
        for name in ticket:
            assert ticket[name].dtype == random[name].dtype == bool
            np.testing.assert_array_equal(reinit[name], ticket[name])
            assert random[name].shape == ticket[name].shape  # (replicates, ...)
        for layer in LAYERS:
            kernel = f"{layer}/kernel"
            for r in range(R):
                assert random[kernel][r].sum() == ticket[kernel][r].sum()
                row = summaries[(summaries.level == level) & (summaries.replicate == r)
                                & (summaries.branch == "random_prune")]
                assert row[f"density_{layer}"].item() == random[kernel][r].sum() / WEIGHTS[layer]
            if level:
                assert not np.array_equal(random[kernel], ticket[kernel])


def test_first_row_describes_the_run(main_run):
    lines = (main_run.dir / RECORD_NAME).read_text().splitlines()
    first = json.loads(lines[0])
    assert first["kind"] == "run"
    assert first["name"] == "default"
    assert first["prunable_weights"] == WEIGHTS
    assert first["pruned_layers"] == list(LAYERS)  # the default prunes every layer
    assert first["members_by"] in ("map", "vmap")
    assert first["chunk"] == 20
    assert first["devices"] == len(jax.devices())
    assert first["config"] == main_run.cfg.resolved
    assert first["config"]["train"]["steps"] == 40
    assert [json.loads(line)["kind"] for line in lines[1:]].count("run") == 0


def test_first_log_line_says_the_essentials_in_one_row(main_run):
    """Model, data, prunable weights (784*300 + 300*100 + 100*10), method, members and
    devices, output directory; the per-layer counts are in the run row (above)."""
    devices = len(jax.devices())
    head = (f"lenet_300_100 on synthetic, 266,200 prunable weights; iterative layerwise "
            f"magnitude pruning, rewind to step 0; 6 members on {devices} "
            f"cpu{'s' if devices > 1 else ''} -> ")
    assert main_run.logs[0] == head + str(main_run.dir)
    # one row of a terminal with the default output directory
    assert len(head + "outputs/default/0123456789") <= 160


def test_level_lines_round_as_the_table(main_run):
    """Densities (by hand, as in the table's test below) and accuracies with 2 decimals."""
    prune = main_run.cfg.resolved["prune"]
    levels = [line for line in main_run.logs if line.startswith("level ")]
    assert len(levels) == LEVELS + 1
    for level, line in enumerate(levels):
        assert line.startswith(f"level {level}: {100 * remaining_fraction(prune, level):.2f}% "
                               "remaining, "), line
        accuracies = re.findall(r"(\w+) (\d+\.\d+)%", line.split("accuracy ", 1)[1])
        assert [b for b, _ in accuracies] == list(BRANCHES), line
        assert all(len(value.split(".")[1]) == 2 for _, value in accuracies), line


def test_eval_rows_have_every_column_and_evaluation(evals):
    assert set(EVAL_COLUMNS) <= set(evals.columns)
    assert len(evals) == (LEVELS + 1) * len(BRANCHES) * R * 3
    assert all(steps == [0, 20, 40] for steps in steps_by_member(evals).values())
    assert len(steps_by_member(evals)) == (LEVELS + 1) * len(BRANCHES) * R
    for level in range(LEVELS + 1):
        rows = evals[evals.level == level]
        assert set(rows.branch) == set(BRANCHES)
        assert sorted(set(rows.replicate)) == list(range(R))
    assert not evals[list(METRICS) + ["density"]].isna().any().any()
    for split in ("val", "test"):  # 100 examples each: accuracies are multiples of 1%
        hundredths = evals[f"{split}_accuracy"] * 100
        assert np.allclose(hundredths, np.round(hundredths), atol=1e-4)
        assert evals[f"{split}_accuracy"].between(0, 1).all()


def test_one_summary_row_per_level_branch_and_replicate(summaries):
    assert len(summaries) == (LEVELS + 1) * len(BRANCHES) * R
    assert (summaries.groupby(["level", "branch", "replicate"]).size() == 1).all()
    expected = {"early_stop_step", "final_step", "seconds", "density",
                *(f"density_{layer}" for layer in LAYERS),
                *(f"final_{metric}" for metric in METRICS),
                *(f"early_stop_{metric}" for metric in METRICS)}
    assert expected <= set(summaries.columns)
    assert (summaries["final_step"] == 40).all()
    assert not summaries[sorted(expected)].isna().any().any()


def test_summaries_are_the_early_stop_of_the_eval_rows(evals, summaries):
    indexed = summaries.set_index(["level", "branch", "replicate"])
    for key, rows in evals.groupby(["level", "branch", "replicate"]):
        rows = rows.sort_values("step")
        best = rows.loc[rows["val_loss"].idxmin()]  # first occurrence of the minimum
        last = rows.iloc[-1]
        summary = indexed.loc[key]
        assert summary["early_stop_step"] == best["step"], key
        for metric in METRICS:
            assert summary[f"early_stop_{metric}"] == best[metric], (key, metric)
            assert summary[f"final_{metric}"] == last[metric], (key, metric)
        assert summary["density"] == rows["density"].iloc[0]
        assert (rows["density"] == summary["density"]).all()


def test_run_returns_the_summary_rows(main_run, summaries):
    # `load` drops columns empty in every row (`diverged_step` when nothing diverged)
    returned = main_run.summaries.drop(columns="kind").dropna(axis=1, how="all")
    recorded = summaries[returned.columns].reset_index(drop=True)
    pd.testing.assert_frame_equal(returned, recorded, check_dtype=False)


def test_densities_follow_the_exact_pruning_schedule(summaries):
    counts = {layer: expected_counts(WEIGHTS[layer], 0.2, LEVELS) for layer in LAYERS}
    assert counts["out"] == [1000, 800, 640]
    for _, row in summaries.iterrows():
        level = row["level"]
        for layer in LAYERS:
            # densities are float32 fractions: exact counts after rounding
            alive = row[f"density_{layer}"] * WEIGHTS[layer]
            assert round(alive) == counts[layer][level], (level, layer, alive)
            assert row[f"density_{layer}"] == pytest.approx(counts[layer][level] / WEIGHTS[layer],
                                                            rel=1e-7)
        total = sum(counts[layer][level] for layer in LAYERS)
        assert row["density"] == pytest.approx(total / TOTAL, rel=1e-6)
    assert (summaries[summaries.level == 0]["density"] == 1.0).all()


def test_saved_level_masks_match_the_summary_densities(main_run, summaries):
    ticket = summaries[summaries.branch == "ticket"].set_index(["level", "replicate"])
    previous = None
    for level in range(LEVELS + 1):
        masks = load_npz(main_run.dir / "levels" / f"level_{level:02d}.npz")
        assert set(masks) == {f"{layer}/{leaf}" for layer in LAYERS for leaf in ("kernel", "bias")}
        for key, mask in masks.items():
            assert mask.dtype == bool and mask.shape[0] == R
            if key.endswith("bias"):
                assert mask.all()
        for layer in LAYERS:
            kernel = masks[f"{layer}/kernel"]
            assert kernel.shape == (R, *{"fc1": (784, 300), "fc2": (300, 100), "out": (100, 10)}[layer])
            for r in range(R):
                expected = ticket.loc[(level, r), f"density_{layer}"] * WEIGHTS[layer]
                assert kernel[r].sum() == round(expected)
            if previous is None:
                assert kernel.all()
            else:  # pruning only removes: each level's masks lie inside the previous ones
                assert not (kernel & ~previous[f"{layer}/kernel"]).any()
        previous = masks
    assert not np.array_equal(previous["fc1/kernel"][0], previous["fc1/kernel"][1])


@functools.cache
def lenet():
    return build_model("lenet_300_100", (28, 28, 1), 10)


def test_rewind_weights_at_step_zero_are_the_initialisation(main_run):
    """Replicate r's rewind weights at k = 0: the model's init from the member's derived
    key (seed, replicate r, level 0, ticket, "init")."""
    saved = load_npz(main_run.dir / "rewind.npz")
    assert set(saved) == {f"params/{layer}/{leaf}" for layer in LAYERS
                          for leaf in ("kernel", "bias")}  # no model state: no batch norm
    for r in range(R):
        params, model_state = initial_weights(lenet(), main_run.cfg.seed, R, r)
        assert model_state == {}
        expected = flat(params, "params")
        assert saved.keys() == expected.keys()
        for key, value in saved.items():
            assert value.dtype == np.float32
            np.testing.assert_array_equal(value[r], expected[key])
    assert not np.array_equal(saved["params/fc1/kernel"][0], saved["params/fc1/kernel"][1])


def test_summary_table_and_its_printout(main_run, summaries, capsys):
    from lottery.cli import print_table
    from lottery.record import summary_table

    table = summary_table(summaries)
    assert len(table) == (LEVELS + 1) * len(BRANCHES)
    assert table["branch"].tolist()[:3] == list(BRANCHES)  # in the order they ran
    assert (table["replicates"] == R).all()
    for _, row in table.iterrows():
        rows = summaries[(summaries.level == row["level"]) & (summaries.branch == row["branch"])]
        accuracy = rows["early_stop_test_accuracy"]
        assert row["accuracy_mean"] == pytest.approx(accuracy.mean(), abs=1e-12)
        assert row["accuracy_std"] == pytest.approx(accuracy.std(ddof=1), abs=1e-12)
        assert row["density"] == pytest.approx(rows["density"].iloc[0], abs=1e-12)
    single = summary_table(summaries[summaries.replicate == 0])
    assert (single["accuracy_std"] == 0).all() and (single["replicates"] == 1).all()
    print_table(table)
    out = capsys.readouterr().out
    assert "early-stop test accuracy" in out
    printed = [[cell.strip() for cell in line.strip().strip("│").split("│")]
               for line in out.splitlines() if line.startswith("│")]
    printed = {(int(cells[0]), cells[2]): cells[1] for cells in printed if cells[0].isdigit()}
    assert sorted(printed) == sorted((level, b) for level in range(LEVELS + 1) for b in BRANCHES)
    prune = main_run.cfg.resolved["prune"]
    for (level, _), density in printed.items():
        assert density == f"{100 * remaining_fraction(prune, level):.2f}%"
    # DESIGN.md's density after n levels, (1 - p)^n: exact here, every layer's count is
    assert printed[(LEVELS, "ticket")] == f"{100 * (1 - prune['rate']) ** LEVELS:.2f}%"


def remaining_fraction(prune: dict, level: int) -> float:
    """The weights left after `level` levels of layerwise pruning at the config's rate (the
    same for every layer), by hand: each level removes round(rate * n) of a layer's n."""
    assert prune["scope"] == "layerwise" and not prune["layer_rates"] and prune["rate"] == 0.2
    left = dict(WEIGHTS)
    for _ in range(level):
        left = {layer: n - round(prune["rate"] * n) for layer, n in left.items()}
    return sum(left.values()) / TOTAL


# ---------------------------------------------------------------- rewinding to step k > 0

K = 10


@pytest.fixture(scope="module")
def rewind_runs(tmp_path_factory):
    """Late rewinding to step 10 (not a multiple of eval_every=20), one level, with 40 and
    with 60 training steps."""
    root = tmp_path_factory.mktemp("rewind")
    return {steps: helpers.spied_run(
        helpers.run_config(f"rewind.step={K}", f"train.steps={steps}", "prune.levels=1"),
        root / f"steps{steps}") for steps in (40, 60)}


def test_rewind_weights_do_not_depend_on_the_training_length(rewind_runs, main_run):
    a = load_npz(rewind_runs[40].dir / "rewind.npz")
    b = load_npz(rewind_runs[60].dir / "rewind.npz")
    init = load_npz(main_run.dir / "rewind.npz")
    assert a.keys() == b.keys() == init.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    for layer in LAYERS:  # 10 steps of Adam moved every kernel away from the init
        moved = a[f"params/{layer}/kernel"] != init[f"params/{layer}/kernel"]
        assert moved.mean() > 0.5


def test_rewind_weights_are_a_plain_loops_weights_after_k_steps(rewind_runs):
    """The rewind point (k = 10) of each ticket replicate is what a plain loop
    (tests/plain_loop.py: the model's apply, optax's Adam, masks of ones) reaches after k
    steps from the member's init on the batches of its data key, at Adam's constant rate.
    (Float tolerance: XLA fuses the engine's scanned, sharded steps differently.)"""
    run = rewind_runs[40]
    cfg = run.cfg
    assert cfg.optimizer["name"] == "adam" and not cfg.optimizer["milestones"]
    assert not cfg.optimizer["warmup"] and not cfg.optimizer["weight_decay"]
    data = load_dataset(cfg.dataset["name"], **{k: v for k, v in cfg.dataset.items()
                                                if k != "name"})
    saved = load_npz(run.dir / "rewind.npz")
    for r in range(R):
        start = initial_weights(lenet(), cfg.seed, R, r)
        key = data_key(cfg.seed, R, 0, "ticket", r)
        params, _ = plain_training(lenet(), data, start, ones_like(start[0]), key, range(K),
                                   cfg.train.batch_size, hand_schedule(cfg.optimizer["lr"]))
        expected = flat(params, "params")
        assert saved.keys() == expected.keys()
        for name, value in expected.items():
            np.testing.assert_allclose(saved[name][r], value, rtol=1e-5, atol=1e-7,
                                       err_msg=f"{name}, replicate {r}")


def test_rewound_levels_train_from_step_k(rewind_runs):
    for steps, run in rewind_runs.items():
        evals = load(run.dir, kind="eval")
        grid = list(range(20, steps + 1, 20))
        for (level, branch, replicate), got in steps_by_member(evals).items():
            assert got == ([0] + grid if level == 0 else [K] + grid), (steps, level, branch)
        summaries = load(run.dir, kind="summary")
        level1 = summaries[summaries.level == 1]
        assert len(level1) == len(BRANCHES) * R
        assert level1["early_stop_step"].isin([K] + grid).all()
        assert (level1["final_step"] == steps).all()
        assert level1["density"].iloc[0] == pytest.approx(
            sum(expected_counts(n, 0.2, 1)[1] for n in WEIGHTS.values()) / TOTAL, rel=1e-6)
        assert json.loads((run.dir / RECORD_NAME).read_text().splitlines()[0])["chunk"] == K
        assert sorted(p.name for p in (run.dir / "levels").iterdir()) == [
            f"level_0{level}{suffix}.npz" for level in (0, 1)
            for suffix in ("", "_random_prune", "_reinit")]


def test_chunking_and_rewind_saving_do_not_change_dense_training(rewind_runs, main_run):
    """Level 0 trains the same batches whatever the chunk (20 in the main run, 10 here) and
    however long the run: the dense evaluations up to step 40 are identical. (Not
    `train_loss`: it is the mean over the last chunk, so it depends on the chunk size.)"""
    reference = load(main_run.dir, kind="eval")
    reference = reference[reference.level == 0].reset_index(drop=True)
    for run in rewind_runs.values():
        evals = load(run.dir, kind="eval")
        evals = evals[(evals.level == 0) & (evals.step <= 40)].reset_index(drop=True)
        columns = EVAL_COLUMNS
        pd.testing.assert_frame_equal(evals[columns], reference[columns])


# ---------------------------------------------------------------- padding, independence


@pytest.fixture(scope="module")
def single_replicate_run(tmp_path_factory):
    """One replicate: 3 members, padded to a multiple of the device count (4 on 2 devices)."""
    return helpers.spied_run(helpers.run_config("replicates=1"),
                             tmp_path_factory.mktemp("single") / "run")


def test_padded_stack_records_only_real_members(single_replicate_run):
    run = single_replicate_run
    devices = len(jax.devices())
    assert run.trainer.stack_size == 3
    assert run.trainer.padded_size == -(-3 // devices) * devices
    evals = load(run.dir, kind="eval")
    assert len(evals) == (LEVELS + 1) * len(BRANCHES) * 3
    assert set(evals.replicate) == {0}
    assert len(load(run.dir, kind="summary")) == (LEVELS + 1) * len(BRANCHES)
    assert load_npz(run.dir / "levels" / "level_02.npz")["fc1/kernel"].shape == (1, 784, 300)
    assert run.compilations.get("jit(member_chunk)") == 1


def test_a_member_does_not_depend_on_the_members_beside_it(single_replicate_run, main_run):
    """Replicate 0 alone equals replicate 0 beside replicate 1: same init, same masks at every
    level, same metrics up to float32 rounding (the stack's layout differs)."""
    for name in ["rewind.npz"] + [f"levels/level_{level:02d}.npz" for level in range(LEVELS + 1)]:
        alone = load_npz(single_replicate_run.dir / name)
        beside = load_npz(main_run.dir / name)
        for key in alone:
            np.testing.assert_array_equal(alone[key][0], beside[key][0])
    alone = load(single_replicate_run.dir, kind="eval")
    beside = load(main_run.dir, kind="eval")
    beside = beside[beside.replicate == 0].reset_index(drop=True)
    keys = ["level", "branch", "replicate", "step", "density"]
    pd.testing.assert_frame_equal(alone[keys], beside[keys])
    for metric in METRICS:
        np.testing.assert_allclose(alone[metric], beside[metric], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- load


def test_load_concatenates_many_runs_with_a_run_column(main_run, tmp_path):
    for sub in ("a", "b/c"):
        (tmp_path / sub).mkdir(parents=True)
        shutil.copy(main_run.dir / RECORD_NAME, tmp_path / sub / RECORD_NAME)
    one = load(main_run.dir)
    many = load(tmp_path)
    assert list(many.columns) == list(one.columns)
    assert many.columns[0] == "run"
    assert sorted(set(many["run"])) == ["a", "b/c"]
    assert len(many) == 2 * len(one)
    pd.testing.assert_frame_equal(
        many[many.run == "b/c"].drop(columns="run").reset_index(drop=True),
        one.drop(columns="run"))
    assert set(one["run"]) == {"."}
    assert set(load(main_run.dir / RECORD_NAME)["run"]) == {"."}
    evals = load(tmp_path, kind="eval")
    assert set(evals["kind"]) == {"eval"}
    assert "early_stop_step" not in evals.columns and "config" not in evals.columns
    assert len(load(tmp_path, kind="summary")) == 2 * (LEVELS + 1) * len(BRANCHES) * R
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=RECORD_NAME):
        load(tmp_path / "empty")
