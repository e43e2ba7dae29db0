"""A run's checkpoints: atomic, checksummed, and the newest good one found on resume.

A checkpoint is `checkpoints/NNNNNN.npz` (the arrays of named pytrees, uncompressed) and its
manifest `NNNNNN.json` (metadata, the run's id and the npz's sha256), each written to a
temporary file, flushed to disk and renamed into place, the manifest last: a checkpoint
without its manifest was cut off while being written and is ignored. On resume the newest
checkpoint whose npz matches its checksum is used; a corrupt one is reported and skipped.
The last `KEEP` checkpoints are kept. When the run ends, `finish` replaces them all by
`finished.json`, so a finished run costs no checkpoint space and a rerun does nothing.

Plain npz and JSON rather than a checkpointing library: the trees are small and
host-gathered, and the checksum, atomicity and fall-back rules are the point. orbax-checkpoint
(installed with flax) writes atomically too, but verifies no content: a byte flipped in a
saved array restores silently as a wrong number, so it would need this sha256 manifest (over
its folder of eleven files per checkpoint) and this fall-back loop on top of it.
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

from lottery import faults
from lottery.atomic import sha256, write_atomically
from lottery.distributed import to_devices, to_host, writes

KEEP = 2
FINISHED = "finished.json"


@dataclass(frozen=True)
class Checkpoint:
    """One loaded checkpoint: its metadata and flat arrays (`tree` rebuilds a named tree)."""

    meta: dict
    arrays: dict

    def tree(self, name: str, like):
        """The saved tree `name`, with the structure, dtypes and placement of `like`."""
        leaves, treedef = jax.tree.flatten(like)
        saved = [self.arrays[f"{name}/{i}"] for i in range(len(leaves))]
        if any(a.shape != np.shape(b) for a, b in zip(saved, leaves)):
            raise ValueError(f"checkpoint tree {name!r} does not match the run's shapes")
        return jax.tree.unflatten(treedef, [
            to_devices(np.asarray(a, b.dtype), b.sharding) if isinstance(b, jax.Array)
            else a for a, b in zip(saved, leaves)])


class CheckpointStore:
    """The checkpoints of the run `run_id` in `directory`."""

    def __init__(self, directory: Path, run_id: str):
        self.directory = Path(directory)
        self.run_id = run_id

    def _manifests(self) -> list[Path]:
        return sorted(self.directory.glob("[0-9]" * 6 + ".json"), reverse=True)

    def save(self, meta: dict, trees: dict) -> None:
        """Write the next checkpoint: `meta` (JSON-able) and the named pytrees `trees`. Every
        process of a run calls it (the trees come to the host together); process 0 writes."""
        arrays = {f"{name}/{i}": np.asarray(leaf) for name, tree in to_host(trees).items()
                  for i, leaf in enumerate(jax.tree.leaves(tree))}
        if not writes():
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        manifests = self._manifests()
        number = int(manifests[0].stem) + 1 if manifests else 0
        data = self.directory / f"{number:06d}.npz"
        write_atomically(data, lambda f: np.savez(f, **arrays))
        faults.reached("checkpoint")  # a crash here leaves an npz without its manifest
        manifest = {"run_id": self.run_id, "sha256": sha256(data), **meta}
        write_atomically(data.with_suffix(".json"),
                         lambda f: f.write(json.dumps(manifest).encode()))
        for old in self._manifests()[KEEP:]:
            old.with_suffix(".npz").unlink(missing_ok=True)
            old.unlink()

    def latest(self, warn=lambda message: print(message, file=sys.stderr)) -> Checkpoint | None:
        """The newest checkpoint that is whole and matches its checksum, or None."""
        for manifest in self._manifests():
            data = manifest.with_suffix(".npz")
            try:
                meta = json.loads(manifest.read_text())
                if meta.get("run_id") != self.run_id:
                    raise ValueError(f"it belongs to run {meta.get('run_id')}, not {self.run_id}")
                if not data.exists() or sha256(data) != meta["sha256"]:
                    raise ValueError("its data is missing or fails its sha256 check")
                with np.load(data) as saved:
                    arrays = {key: saved[key] for key in saved.files}
            except (ValueError, KeyError, OSError) as error:
                warn(f"lottery: warning: skipping checkpoint {manifest.name}: {error}")
                continue
            return Checkpoint(meta, arrays)
        return None

    def finished(self) -> dict | None:
        """The finished marker's content if this run finished, else None."""
        path = self.directory / FINISHED
        if not path.exists():
            return None
        return json.loads(path.read_text())

    def finish(self, meta: dict) -> None:
        """Mark the run finished and drop its checkpoints (process 0)."""
        if not writes():
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        write_atomically(self.directory / FINISHED,
                         lambda f: f.write(json.dumps({"run_id": self.run_id, **meta}).encode()))
        for path in self.directory.iterdir():
            if path.name != FINISHED:
                path.unlink()

    def clear(self) -> None:
        """Drop every checkpoint (a run restarting from scratch; process 0)."""
        if not writes():
            return
        if self.directory.exists():
            for path in self.directory.iterdir():
                path.unlink()
