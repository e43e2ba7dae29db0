"""Ticket masks and weights of a run: how much the masks overlap (between levels, between
replicates, between two runs), where the survivors' initial values lie, and whether training
keeps their signs.

A run directory holds `levels/level_NN.npz` (each level's ticket masks, keys 'layer/leaf',
axis 0 = replicate), `rewind.npz` (the rewind weights, 'params/layer/leaf': the
initialisation when `rewind.step=0`) and, with `train.save_weights=true`,
`levels/trained_NN.npz` (each level's trained ticket, 'params/layer/leaf'). Only the
prunable kernels are read. Every table is a tidy pandas DataFrame, one row per
(level, replicate, layer, ...); `layer == "all"` rows pool the layers.

    from lottery.analysis import masks
    run = masks.TicketRun("outputs/lenet_mnist/2026-01-01_00-00-00")
    masks.replicate_overlap(run)          # Jaccard index of kept weights, replicate pairs
    masks.init_distribution(run)          # histograms of survivors' vs all initial values
    masks.sign_agreement_by_level(run)    # needs train.save_weights=true
"""

import itertools
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from lottery.record import (RECORD_NAME, load_arrays, read_rows, rewind_file, saved_levels,
                            trained_file)

ALL = "all"  # the `layer` of rows pooling every layer

OVERLAP_COLUMNS = ["layer", "size", "kept_a", "kept_b", "intersection", "union", "jaccard",
                   "jaccard_random"]


# ---- on arrays ---------------------------------------------------------------------------

def jaccard(a, b) -> float:
    """Jaccard index |a ∧ b| / |a ∨ b| of the kept weights of two masks of one shape (1.0 for
    two empty masks: the same set)."""
    a, b = _bool(a), _bool(b)
    if a.shape != b.shape:
        raise ValueError(f"masks of different shapes {a.shape} and {b.shape}")
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


def random_jaccard(size: int, kept_a: int, kept_b: int) -> float:
    """Expected Jaccard index of two independent random masks of `size` weights keeping
    `kept_a` and `kept_b` of them (ratio of the expected intersection and union): the
    overlap that chance alone gives at these densities."""
    if size == 0:
        return 1.0
    p, q = kept_a / size, kept_b / size
    union = p + q - p * q
    return 1.0 if union == 0 else p * q / union


def mask_overlap(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """Overlap of two masks given per layer (`{layer: bool array}`, the same layers and
    shapes): one row per layer and one `layer == "all"` row pooling them, with the numbers
    of weights (`size`), kept weights, intersection, union, Jaccard index and its chance
    level `jaccard_random` (independent random masks of the same per-layer densities)."""
    if set(a) != set(b):
        raise ValueError(f"masks of different layers: {sorted(a)} and {sorted(b)}")
    rows = []
    for layer in a:
        x, y = _bool(a[layer]), _bool(b[layer])
        if x.shape != y.shape:
            raise ValueError(f"layer {layer}: shapes {x.shape} and {y.shape} differ")
        rows.append({"layer": layer, "size": x.size, "kept_a": np.count_nonzero(x),
                     "kept_b": np.count_nonzero(y), "intersection": np.count_nonzero(x & y),
                     "union": np.count_nonzero(x | y)})
    frame = pd.DataFrame(rows, columns=OVERLAP_COLUMNS[:6])
    frame["jaccard"] = np.where(frame["union"] > 0,
                                frame["intersection"] / frame["union"].where(frame["union"] > 0),
                                1.0)
    frame["jaccard_random"] = [random_jaccard(*r) for r in
                               frame[["size", "kept_a", "kept_b"]].itertuples(index=False)]
    n = frame["size"].to_numpy(float)
    p, q = frame["kept_a"] / n.clip(1), frame["kept_b"] / n.clip(1)
    expected_union = float(np.sum(n * (p + q - p * q)))
    total = frame[["size", "kept_a", "kept_b", "intersection", "union"]].sum()
    pooled = {"layer": ALL, **total.to_dict(),
              "jaccard": total["intersection"] / total["union"] if total["union"] else 1.0,
              "jaccard_random": float(np.sum(n * p * q)) / expected_union
              if expected_union else 1.0}
    frame = pd.concat([frame, pd.DataFrame([pooled])], ignore_index=True)
    for column in ("size", "kept_a", "kept_b", "intersection", "union"):
        frame[column] = frame[column].astype(np.int64)
    return frame[OVERLAP_COLUMNS]


def init_statistics(init, mask) -> dict:
    """The survivors' initial values against all initial values of one layer: counts, mean
    and standard deviation of the magnitudes, and `magnitude_ratio` = survivors' mean
    magnitude / all weights' (above 1: the ticket kept large initial weights)."""
    init, mask = np.asarray(init, np.float64), _bool(mask)
    if init.shape != mask.shape:
        raise ValueError(f"values {init.shape} and mask {mask.shape} differ in shape")
    magnitude = np.abs(init)
    kept = magnitude[mask]
    mean_all = float(magnitude.mean()) if magnitude.size else float("nan")
    mean_kept = float(kept.mean()) if kept.size else float("nan")
    return {"weights": int(init.size), "survivors": int(kept.size),
            "density": kept.size / init.size if init.size else float("nan"),
            "mean_abs_all": mean_all, "mean_abs_survivors": mean_kept,
            "std_all": float(init.std()) if init.size else float("nan"),
            "std_survivors": float(init[mask].std()) if kept.size else float("nan"),
            "magnitude_ratio": mean_kept / mean_all if mean_all else float("nan")}


def init_histogram(init, mask, bins=40, range=None) -> pd.DataFrame:
    """Histogram of all initial values and of the survivors' (where `mask` is true), on the
    same bins (`bins`: a count over `range`, default the values' range, or the edges):
    `bin_left`, `bin_right`, `bin_center`, counts `all` and `survivors`, and each as a
    density (`all_density`, `survivors_density`, integrating to 1)."""
    init, mask = np.asarray(init, np.float64), _bool(mask)
    if init.shape != mask.shape:
        raise ValueError(f"values {init.shape} and mask {mask.shape} differ in shape")
    counts_all, edges = np.histogram(init, bins=bins, range=range)
    counts_kept, _ = np.histogram(init[mask], bins=edges)
    widths = np.diff(edges)
    frame = pd.DataFrame({"bin_left": edges[:-1], "bin_right": edges[1:],
                          "bin_center": (edges[:-1] + edges[1:]) / 2,
                          "all": counts_all.astype(np.int64),
                          "survivors": counts_kept.astype(np.int64)})
    for column in ("all", "survivors"):
        total = frame[column].sum()
        frame[f"{column}_density"] = frame[column] / (total * widths) if total else 0.0
    return frame


def sign_agreement(init, trained, mask) -> float:
    """Fraction of the survivors (`mask` true) whose trained weight has the sign of its
    initial one (a weight trained to exactly 0 disagrees); NaN without survivors."""
    init, trained, mask = np.asarray(init), np.asarray(trained), _bool(mask)
    if not init.shape == trained.shape == mask.shape:
        raise ValueError(f"shapes {init.shape}, {trained.shape} and {mask.shape} differ")
    survivors = np.count_nonzero(mask)
    if survivors == 0:
        return float("nan")
    return np.count_nonzero(np.sign(init[mask]) == np.sign(trained[mask])) / survivors


# ---- on runs -----------------------------------------------------------------------------

class TicketRun:
    """The ticket masks and weights a run saved, read on demand.

    `layers`: the prunable layers (dotted paths, as in `prunable_weights` of the record's
    `run` row; default all of them — a layer the run never prunes has a full mask and
    overlaps perfectly); `levels`: the levels whose masks were saved; `replicates`."""

    def __init__(self, path, layers=None):
        self.path = Path(path)
        if self.path.name == RECORD_NAME:
            self.path = self.path.parent
        self._files = saved_levels(self.path)
        if not self._files:
            raise FileNotFoundError(f"no levels/level_NN.npz in {self.path}: not a run directory")
        self.levels = list(self._files)
        self.layers = tuple(layers) if layers is not None else self._prunable_layers()
        first = _key(self.layers[0])
        self.replicates = load_arrays(self._files[self.levels[0]], [first])[first].shape[0]
        self._masks = {}

    def __repr__(self) -> str:
        return (f"TicketRun({str(self.path)!r}: levels {self.levels}, {self.replicates} "
                f"replicates, layers {list(self.layers)})")

    def _prunable_layers(self) -> tuple[str, ...]:
        record = self.path / RECORD_NAME
        if record.exists():
            for row in read_rows(record):
                if row.get("kind") == "run" and row.get("prunable_weights"):
                    return tuple(row["prunable_weights"])
        keys = load_arrays(self._files[self.levels[0]])  # no record: every kernel
        return tuple(k[:-len("/kernel")].replace("/", ".") for k in keys if k.endswith("/kernel"))

    def masks(self, level: int) -> dict[str, np.ndarray]:
        """The ticket masks of `level`: {layer: bool array (replicates, ...)}."""
        if level not in self._masks:
            if level not in self._files:
                raise KeyError(f"level {level} not saved in {self.path} (levels {self.levels})")
            self._masks[level] = _read(self._files[level], self.layers, "", bool)
        return self._masks[level]

    def rewind(self) -> dict[str, np.ndarray]:
        """The rewind weights (the initialisation when rewind.step=0): {layer: (replicates, ...)}."""
        return _read(rewind_file(self.path), self.layers, "params/")

    @property
    def trained_levels(self) -> list[int]:
        """The levels whose trained ticket was saved (`train.save_weights=true`)."""
        return [level for level in self.levels if trained_file(self.path, level).exists()]

    def trained(self, level: int) -> dict[str, np.ndarray]:
        """The trained ticket weights of `level`: {layer: (replicates, ...)}."""
        path = trained_file(self.path, level)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: trained weights are saved only "
                                    "by runs with train.save_weights=true")
        return _read(path, self.layers, "params/")


def level_overlap(run, pairs: str = "all") -> pd.DataFrame:
    """Jaccard index between the ticket masks of two levels of one replicate: columns
    `level_a`, `level_b`, `replicate`, then `mask_overlap`'s. `pairs`: "all" (every
    level_a < level_b), "consecutive" (level, next level) or "first" (the first level
    against each later one)."""
    run = _as_run(run)
    levels = run.levels
    chosen = {"all": list(itertools.combinations(levels, 2)),
              "consecutive": list(itertools.pairwise(levels)),
              "first": [(levels[0], level) for level in levels[1:]]}
    if pairs not in chosen:
        raise ValueError(f"pairs={pairs!r}: choose all, consecutive or first")
    frames = []
    for a, b in chosen[pairs]:
        for r in range(run.replicates):
            frames.append(_overlap({"level_a": a, "level_b": b, "replicate": r},
                                   run.masks(a), run.masks(b), r, r))
    return _concat(frames, ["level_a", "level_b", "replicate"])


def replicate_overlap(run) -> pd.DataFrame:
    """Jaccard index between the ticket masks of two replicates at each level: columns
    `level`, `replicate_a`, `replicate_b`, then `mask_overlap`'s."""
    run = _as_run(run)
    frames = []
    for level in run.levels:
        masks = run.masks(level)
        for a, b in itertools.combinations(range(run.replicates), 2):
            frames.append(_overlap({"level": level, "replicate_a": a, "replicate_b": b},
                                   masks, masks, a, b))
    return _concat(frames, ["level", "replicate_a", "replicate_b"])


def run_overlap(run_a, run_b, replicates: str = "matched") -> pd.DataFrame:
    """Jaccard index between the ticket masks of two runs (e.g. two pruning methods) at each
    level both saved: columns `level`, `replicate_a`, `replicate_b`, then `mask_overlap`'s.
    `replicates`: "matched" (replicate r of one run against replicate r of the other: the
    same initialisation when both runs have the same seed) or "all" (every pair)."""
    run_a, run_b = _as_run(run_a), _as_run(run_b)
    layers = [layer for layer in run_a.layers if layer in run_b.layers]
    if not layers:
        raise ValueError(f"the runs share no prunable layer ({run_a.layers} vs {run_b.layers})")
    if replicates == "matched":
        pairs = [(r, r) for r in range(min(run_a.replicates, run_b.replicates))]
    elif replicates == "all":
        pairs = list(itertools.product(range(run_a.replicates), range(run_b.replicates)))
    else:
        raise ValueError(f"replicates={replicates!r}: choose matched or all")
    frames = []
    for level in (level for level in run_a.levels if level in run_b.levels):
        a = {layer: run_a.masks(level)[layer] for layer in layers}
        b = {layer: run_b.masks(level)[layer] for layer in layers}
        for ra, rb in pairs:
            frames.append(_overlap({"level": level, "replicate_a": ra, "replicate_b": rb},
                                   a, b, ra, rb))
    return _concat(frames, ["level", "replicate_a", "replicate_b"])


def overlap_matrix(overlaps: pd.DataFrame, layer: str = ALL) -> pd.DataFrame:
    """`level_overlap(run, "all")` as a symmetric level x level matrix of the mean Jaccard
    index over replicates (1 on the diagonal), for a heatmap."""
    rows = overlaps[overlaps["layer"] == layer]
    mean = rows.groupby(["level_a", "level_b"])["jaccard"].mean()
    levels = sorted(set(rows["level_a"]) | set(rows["level_b"]))
    matrix = pd.DataFrame(np.eye(len(levels)), index=pd.Index(levels, name="level"),
                          columns=pd.Index(levels, name="level"))
    for (a, b), value in mean.items():
        matrix.loc[a, b] = matrix.loc[b, a] = value
    return matrix


def init_summary(run, levels=None) -> pd.DataFrame:
    """The survivors' initial (rewind) values against all the layer's initial values, per
    level, replicate and layer: columns `level`, `replicate`, `layer`, then
    `init_statistics`'s (survivors, density, mean and std of magnitudes, magnitude_ratio)."""
    run = _as_run(run)
    init = run.rewind()
    rows = []
    for level in levels if levels is not None else run.levels:
        masks = run.masks(level)
        for r in range(run.replicates):
            for layer in run.layers:
                rows.append({"level": level, "replicate": r, "layer": layer,
                             **init_statistics(init[layer][r], masks[layer][r])})
    return pd.DataFrame(rows)


def init_distribution(run, levels=None, bins: int = 40) -> pd.DataFrame:
    """Histograms of the initial (rewind) values of all weights and of the level's survivors,
    per level and layer, pooled over replicates, on bins fixed per layer (so that levels
    compare): columns `level`, `layer`, then `init_histogram`'s."""
    run = _as_run(run)
    init = run.rewind()
    frames = []
    for layer in run.layers:
        values = init[layer]
        edges = np.histogram_bin_edges(values, bins=bins)
        for level in levels if levels is not None else run.levels:
            frame = init_histogram(values, run.masks(level)[layer], bins=edges)
            frame.insert(0, "layer", layer)
            frame.insert(0, "level", level)
            frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def sign_agreement_by_level(run, levels=None) -> pd.DataFrame:
    """Per level (with saved trained weights), replicate and layer (and `layer == "all"`
    pooled), the fraction of survivors whose trained weight kept its initial (rewind)
    sign: columns `level`, `replicate`, `layer`, `survivors`, `agree`, `sign_agreement`.
    Level 0 is the dense network: its row is the baseline for all weights."""
    run = _as_run(run)
    levels = run.trained_levels if levels is None else list(levels)
    if not levels:
        raise FileNotFoundError(f"no levels/trained_NN.npz in {run.path}: run with "
                                "train.save_weights=true to save the trained tickets")
    init = run.rewind()
    rows = []
    for level in levels:
        trained, masks = run.trained(level), run.masks(level)
        for r in range(run.replicates):
            agree_all = survivors_all = 0
            for layer in run.layers:
                mask = _bool(masks[layer][r])
                survivors = np.count_nonzero(mask)
                agree = np.count_nonzero(np.sign(init[layer][r][mask])
                                         == np.sign(trained[layer][r][mask]))
                rows.append({"level": level, "replicate": r, "layer": layer,
                             "survivors": survivors, "agree": agree})
                agree_all, survivors_all = agree_all + agree, survivors_all + survivors
            rows.append({"level": level, "replicate": r, "layer": ALL,
                         "survivors": survivors_all, "agree": agree_all})
    frame = pd.DataFrame(rows)
    frame["sign_agreement"] = frame["agree"] / frame["survivors"].where(frame["survivors"] > 0)
    return frame


def load_runs(path) -> dict[str, TicketRun]:
    """Every run directory (one with `levels/level_NN.npz`) at or under `path`, by its path
    relative to `path` ("." for `path` itself; as `lottery.record.load`'s `run` column)."""
    path = Path(path)
    runs = {}
    for levels in sorted(path.rglob("levels")):
        directory = levels.parent
        if levels.is_dir() and saved_levels(directory):
            runs[str(directory.relative_to(path)) if directory != path else "."] = \
                TicketRun(directory)
    if not runs:
        raise FileNotFoundError(f"no run with levels/level_NN.npz under {path}")
    return runs


# ---- helpers -----------------------------------------------------------------------------

def _bool(mask) -> np.ndarray:
    return np.asarray(mask).astype(bool, copy=False)


def _key(layer: str) -> str:
    return layer.replace(".", "/") + "/kernel"


def _read(path: Path, layers, prefix: str, dtype=None) -> dict[str, np.ndarray]:
    arrays = load_arrays(path, [prefix + _key(layer) for layer in layers], dtype)
    return {layer: arrays[prefix + _key(layer)] for layer in layers}


def _as_run(run) -> TicketRun:
    return run if isinstance(run, TicketRun) else TicketRun(run)


def _overlap(labels: dict, a, b, ra: int, rb: int) -> pd.DataFrame:
    frame = mask_overlap({layer: m[ra] for layer, m in a.items()},
                         {layer: m[rb] for layer, m in b.items()})
    for i, (name, value) in enumerate(labels.items()):
        frame.insert(i, name, value)
    return frame


def _concat(frames, labels) -> pd.DataFrame:
    if not frames:
        return pd.DataFrame(columns=labels + OVERLAP_COLUMNS)
    return pd.concat(frames, ignore_index=True)
