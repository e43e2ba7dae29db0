"""lottery.analysis.masks on hand-made masks and weights, and on a hand-made run directory."""

import json

import numpy as np
import pandas as pd
import pytest

from lottery.analysis import masks


def test_jaccard_identical_disjoint_and_by_hand():
    a = np.array([[1, 1, 0], [0, 1, 0]], bool)
    assert masks.jaccard(a, a) == 1.0
    assert masks.jaccard(a, ~a) == 0.0
    b = np.array([[1, 0, 0], [1, 1, 1]], bool)  # both: 2 weights; either: 5
    assert masks.jaccard(a, b) == pytest.approx(2 / 5)
    assert masks.jaccard(a.astype(np.float32), b.astype(np.int8)) == pytest.approx(2 / 5)
    assert masks.jaccard(np.zeros(4, bool), np.zeros(4, bool)) == 1.0
    with pytest.raises(ValueError):
        masks.jaccard(a, a.ravel())


def test_random_jaccard_is_the_chance_level():
    assert masks.random_jaccard(100, 100, 100) == 1.0
    assert masks.random_jaccard(100, 50, 50) == pytest.approx(0.25 / 0.75)
    rng = np.random.default_rng(0)
    n, ka, kb = 20_000, 6_000, 10_000
    draws = [masks.jaccard(rng.permutation(n) < ka, rng.permutation(n) < kb) for _ in range(5)]
    assert np.mean(draws) == pytest.approx(masks.random_jaccard(n, ka, kb), abs=0.005)


def test_mask_overlap_per_layer_and_pooled():
    a = {"fc1": np.array([1, 1, 0, 0], bool), "out": np.array([[1, 0], [0, 0]], bool)}
    b = {"fc1": np.array([0, 1, 1, 0], bool), "out": np.array([[1, 0], [0, 0]], bool)}
    frame = masks.mask_overlap(a, b).set_index("layer")
    assert list(frame.index) == ["fc1", "out", masks.ALL]
    assert frame.loc["fc1", ["size", "kept_a", "kept_b", "intersection", "union"]].tolist() == \
        [4, 2, 2, 1, 3]
    assert frame.loc["fc1", "jaccard"] == pytest.approx(1 / 3)
    assert frame.loc["out", "jaccard"] == 1.0
    assert frame.loc[masks.ALL, "jaccard"] == pytest.approx(2 / 4)  # pooled: 1+1 over 3+1
    assert frame.loc["fc1", "jaccard_random"] == pytest.approx(0.25 / 0.75)
    # chance pooled: expected intersection 4/4 + 4/16 over expected union 4*3/4 + 4*7/16
    assert frame.loc[masks.ALL, "jaccard_random"] == pytest.approx(1.25 / 4.75)
    with pytest.raises(ValueError):
        masks.mask_overlap(a, {"fc1": a["fc1"]})


def test_sign_agreement_counts_survivors_only():
    init = np.array([0.5, -0.2, 0.1, -0.3, 0.7])
    trained = np.array([0.4, 0.3, -0.1, -0.9, 0.0])
    mask = np.array([1, 1, 1, 1, 0], bool)  # the pruned last weight does not count
    assert masks.sign_agreement(init, trained, mask) == pytest.approx(2 / 4)
    assert masks.sign_agreement(init, trained, np.ones(5, bool)) == pytest.approx(2 / 5)  # 0 disagrees
    assert masks.sign_agreement(init, init, mask) == 1.0
    assert np.isnan(masks.sign_agreement(init, trained, np.zeros(5, bool)))


def test_init_statistics_and_histogram():
    init = np.array([-2.0, -1.0, 0.5, 1.0, 3.0, -0.5])
    mask = np.array([1, 0, 0, 0, 1, 0], bool)  # the two largest magnitudes survive
    stats = masks.init_statistics(init, mask)
    assert stats["weights"] == 6 and stats["survivors"] == 2
    assert stats["density"] == pytest.approx(2 / 6)
    assert stats["mean_abs_all"] == pytest.approx(8 / 6)
    assert stats["mean_abs_survivors"] == pytest.approx(2.5)
    assert stats["magnitude_ratio"] == pytest.approx(2.5 / (8 / 6))
    assert stats["std_survivors"] == pytest.approx(2.5)

    hist = masks.init_histogram(init, mask, bins=[-3, -1.5, 0, 1.5, 3])
    assert hist["all"].tolist() == [1, 2, 2, 1]
    assert hist["survivors"].tolist() == [1, 0, 0, 1]
    assert hist["bin_center"].tolist() == [-2.25, -0.75, 0.75, 2.25]
    widths = hist["bin_right"] - hist["bin_left"]
    assert (hist["all_density"] * widths).sum() == pytest.approx(1)
    assert (hist["survivors_density"] * widths).sum() == pytest.approx(1)
    assert hist["survivors_density"].iloc[0] == pytest.approx(0.5 / 1.5)
    empty = masks.init_histogram(init, np.zeros(6, bool), bins=3)
    assert empty["survivors"].sum() == 0 and (empty["survivors_density"] == 0).all()


@pytest.fixture
def hand_run(tmp_path):
    """A run directory as the engine writes it: 2 replicates, layers "a.b" (4 weights) and
    "c" (2 weights), levels 0-1, trained weights for both levels."""
    def write(path, arrays):
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **arrays)

    run = tmp_path / "run"
    init = {"a.b": np.array([[0.5, -0.4, 0.1, -0.05], [0.3, 0.2, -0.6, 0.05]]),
            "c": np.array([[1.0, -1.0], [-2.0, 0.5]])}
    level1 = {"a.b": np.array([[1, 1, 0, 0], [1, 0, 1, 0]], bool),
              "c": np.array([[1, 0], [1, 0]], bool)}
    write(run / "rewind.npz", {"params/a/b/kernel": init["a.b"], "params/a/b/bias": np.zeros((2, 1)),
                               "params/c/kernel": init["c"], "state/c/mean": np.zeros((2, 1))})
    for level, mask in ((0, {k: np.ones_like(v, bool) for k, v in level1.items()}), (1, level1)):
        write(run / "levels" / f"level_{level:02d}.npz",
              {"a/b/kernel": mask["a.b"], "a/b/bias": np.ones((2, 1), bool),
               "c/kernel": mask["c"]})
    trained = {"a.b": np.array([[0.6, 0.1, 0.2, -0.1], [-0.3, 0.2, -0.1, 0.0]]),
               "c": np.array([[2.0, 1.0], [-1.0, 0.5]])}
    for level in (0, 1):
        write(run / "levels" / f"trained_{level:02d}.npz",
              {"params/a/b/kernel": trained["a.b"] * (level1["a.b"] if level else 1),
               "params/c/kernel": trained["c"] * (level1["c"] if level else 1)})
    (run / "record.jsonl").write_text(json.dumps(
        {"kind": "run", "prunable_weights": {"a.b": 4, "c": 2}}) + "\n")
    return run, init, level1, trained


def test_run_tables(hand_run):
    path, init, level1, trained = hand_run
    run = masks.TicketRun(path)
    assert run.layers == ("a.b", "c") and run.levels == [0, 1] and run.replicates == 2
    assert run.trained_levels == [0, 1]
    np.testing.assert_array_equal(run.masks(1)["a.b"], level1["a.b"])

    levels = masks.level_overlap(run)
    pooled = levels[levels["layer"] == masks.ALL].set_index("replicate")
    assert pooled["jaccard"].tolist() == pytest.approx([3 / 6, 3 / 6])  # a subset: density

    replicates = masks.replicate_overlap(run).set_index(["level", "layer"])
    assert replicates.loc[(1, "a.b"), "jaccard"] == pytest.approx(1 / 3)
    assert replicates.loc[(1, "c"), "jaccard"] == 1.0
    assert replicates.loc[(0, masks.ALL), "jaccard"] == 1.0
    assert masks.overlap_matrix(levels).to_numpy().tolist() == [[1.0, 0.5], [0.5, 1.0]]

    assert set(masks.run_overlap(run, path)["jaccard"]) == {1.0}
    assert len(masks.run_overlap(run, run, replicates="all")) == 2 * 4 * 3

    signs = masks.sign_agreement_by_level(run).set_index(["level", "replicate", "layer"])
    # level 1, replicate 0: a.b survivors 0.5->0.6 (same), -0.4->0.1 (flip); c: 1.0->2.0
    assert signs.loc[(1, 0, "a.b"), "sign_agreement"] == pytest.approx(1 / 2)
    assert signs.loc[(1, 0, masks.ALL), ["survivors", "agree"]].tolist() == [3, 2]
    # level 0, replicate 1: a.b 0.3->-0.3 no, 0.2->0.2 yes, -0.6->-0.1 yes, 0.05->0 no; c both yes
    assert signs.loc[(0, 1, masks.ALL), "sign_agreement"] == pytest.approx(4 / 6)
    assert signs.loc[(1, 1, "a.b"), "sign_agreement"] == pytest.approx(
        masks.sign_agreement(init["a.b"][1], trained["a.b"][1], level1["a.b"][1]))

    summary = masks.init_summary(run).set_index(["level", "replicate", "layer"])
    assert summary.loc[(1, 0, "a.b"), "mean_abs_survivors"] == pytest.approx(0.45)
    assert summary.loc[(0, 0, "a.b"), "magnitude_ratio"] == pytest.approx(1)

    histograms = masks.init_distribution(run, bins=4)
    assert set(histograms["level"]) == {0, 1} and set(histograms["layer"]) == {"a.b", "c"}
    one = histograms[(histograms["level"] == 1) & (histograms["layer"] == "a.b")]
    assert one["all"].sum() == 8 and one["survivors"].sum() == 4
    # the same bins at every level
    edges = histograms.groupby(["layer", "level"])["bin_left"].apply(tuple).unstack()
    assert (edges[0] == edges[1]).all()

    runs = masks.load_runs(path.parent)
    assert list(runs) == ["run"] and masks.load_runs(path).keys() == {"."}


def test_run_without_trained_weights_or_record(hand_run):
    path = hand_run[0]
    for f in path.glob("levels/trained_*.npz"):
        f.unlink()
    (path / "record.jsonl").unlink()
    run = masks.TicketRun(path)
    assert run.layers == ("a.b", "c")  # every kernel, without the record
    assert run.trained_levels == []
    with pytest.raises(FileNotFoundError, match="save_weights"):
        masks.sign_agreement_by_level(run)
    with pytest.raises(FileNotFoundError, match="level_NN"):
        masks.TicketRun(path / "levels")
    assert isinstance(masks.level_overlap(run, pairs="consecutive"), pd.DataFrame)
    with pytest.raises(ValueError):
        masks.level_overlap(run, pairs="some")
