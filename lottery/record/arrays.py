"""The run folder's array files: masks and weights of every level, as compressed npz.

    levels/level_NN.npz           the ticket's masks at level NN (bool)
    levels/level_NN_<branch>.npz  every other branch's masks (reinit, random_prune, ...)
    rewind.npz                    the rewind weights ('params/...', 'state/...'): the
                                  initialisation when rewind.step=0
    levels/trained_NN.npz         the trained ticket at level NN (train.save_weights=true)

Keys are a tree's path joined by '/' ('fc1/kernel', 'params/fc1/kernel'); axis 0 of every
array is the replicate. Written atomically (`lottery.atomic`): a killed run never leaves a
partial file.
"""

import re
from pathlib import Path

import jax
import numpy as np

from lottery.atomic import write_atomically

LEVELS = "levels"
REWIND = "rewind.npz"
TICKET = "ticket"
_LEVEL = re.compile(r"^level_(\d+)\.npz$")


def level_file(run_dir, level: int, branch: str = TICKET) -> Path:
    """Where the masks of `branch` at `level` are saved (the ticket's without a suffix)."""
    suffix = "" if branch == TICKET else f"_{branch}"
    return Path(run_dir) / LEVELS / f"level_{level:02d}{suffix}.npz"


def trained_file(run_dir, level: int) -> Path:
    """Where the trained ticket of `level` is saved."""
    return Path(run_dir) / LEVELS / f"trained_{level:02d}.npz"


def rewind_file(run_dir) -> Path:
    """Where the rewind weights are saved."""
    return Path(run_dir) / REWIND


def saved_levels(run_dir) -> dict[int, Path]:
    """The ticket's mask files in `run_dir`, by level (in order; empty where there are none)."""
    folder = Path(run_dir) / LEVELS
    if not folder.is_dir():
        return {}
    found = ((match, file) for file in folder.iterdir() if (match := _LEVEL.match(file.name)))
    return dict(sorted((int(match.group(1)), file) for match, file in found))


def save_arrays(path: Path, tree, dtype=None) -> None:
    """Save a stacked tree of arrays as `path` (npz, keys 'layer/leaf'; axis 0 = replicate),
    atomically: a killed run never leaves a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {"/".join(str(k.key) for k in keys): np.asarray(leaf, dtype)
            for keys, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
    write_atomically(path, lambda f: np.savez_compressed(f, **flat))


def load_arrays(path, keys=None, dtype=None) -> dict[str, np.ndarray]:
    """The arrays `keys` (default: all) of the npz file `path` as {key: array}, as `dtype`
    when given. A missing file or key raises FileNotFoundError or KeyError naming it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    with np.load(path) as archive:
        keys = archive.files if keys is None else list(keys)
        missing = [key for key in keys if key not in archive.files]
        if missing:
            raise KeyError(f"{path} lacks {', '.join(missing)}")
        return {key: np.asarray(archive[key], dtype) for key in keys}
