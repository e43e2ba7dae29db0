"""The record's rows: JSONL lines written as they happen, read back one way, loaded with pandas.

Row kinds: `eval` (one per level, branch, replicate and evaluation step), `summary` (one per
level, branch and replicate: final values and the early-stop step, the minimum validation
loss), `instability` (one per level and replicate of the instability branch),
`mask_update` (one per level, member and mask update of RigL or SET) and `run` (the
resolved config and parameter counts, first line). `record.jsonl` is the source of truth;
W&B is a mirror that may fail without losing anything. Every reader of a record goes through
`read_rows`.
"""

import json
from pathlib import Path

import numpy as np
import pandas as pd

RECORD_NAME = "record.jsonl"
INTEGER_COLUMNS = {"rewind_step", "level", "replicate", "step", "final_step", "early_stop_step"}


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot record {type(value).__name__}")


class JsonlSink:
    """Appends each row as one JSON line and flushes it, so a killed run loses no row.

    `keep` bytes of an existing record are kept and the rest cut off (a resumed run drops
    the rows written after its checkpoint, so no row is ever recorded twice)."""

    def __init__(self, path: Path, keep: int = 0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "ab")
        self._file.truncate(keep)
        self._file.seek(keep)

    @property
    def offset(self) -> int:
        """Bytes written so far: where a resumed run cuts the record."""
        return self._file.tell()

    def write(self, row: dict) -> None:
        self._file.write((json.dumps(row, default=_plain) + "\n").encode())
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class Record:
    """Fans each row out to its sinks."""

    def __init__(self, sinks):
        self.sinks = list(sinks)

    def write(self, row: dict) -> None:
        for sink in self.sinks:
            sink.write(row)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def read_rows(path):
    """The rows of the record file `path`, in order, one dict each (blank lines skipped)."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def recorded_rows(path: Path, kind: str) -> list[dict]:
    """The rows of one kind in the record file `path` (none if there is no such file)."""
    if not Path(path).exists():
        return []
    return [row for row in read_rows(path) if row.get("kind") == kind]


def _natural(path: Path) -> list:
    """Sort key that puts sweep job 10 after job 9 (numbered job directories, 0, 1, ..., 10)
    and never compares a number with a name (run ids are hex: some are all digits)."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in path.parts]


def run_dirs(path) -> list[Path]:
    """Every directory at or under `path` that holds a `record.jsonl` (the run itself, or the
    jobs of a Hydra multirun sweep, numbered ones in job order); for a record file, its
    directory. Empty where there is none."""
    path = Path(path)
    if path.is_file():
        return [path.parent]
    return sorted((file.parent for file in path.rglob(RECORD_NAME)), key=_natural)


def rows_frame(path) -> pd.DataFrame:
    """Every row of the record file `path` as a DataFrame (a column per key of any row)."""
    return pd.DataFrame(list(read_rows(path)))


def of_kind(frame: pd.DataFrame, kind: str) -> pd.DataFrame:
    """The rows of one kind, without the columns only other kinds fill, integer columns as
    int where no row lacks them."""
    if "kind" not in frame.columns:  # only empty records
        return frame.iloc[0:0]
    frame = frame[frame["kind"] == kind].dropna(axis=1, how="all").reset_index(drop=True)
    for column in INTEGER_COLUMNS & set(frame.columns):
        if frame[column].notna().all():
            frame[column] = frame[column].astype(int)
    return frame


def load(path, kind: str | None = None) -> pd.DataFrame:
    """All rows of one run directory, a `record.jsonl` file, or every record under a directory.

    A `run` column holds each record's directory relative to `path`; `kind` filters rows
    (`"eval"`, `"summary"`, `"run"`, `"instability"`).
    """
    path = Path(path)
    dirs = run_dirs(path)
    if not dirs:
        raise FileNotFoundError(f"no {RECORD_NAME} in {path}")
    frames = []
    for directory in dirs:
        frame = rows_frame(path if path.is_file() else directory / RECORD_NAME)
        frame.insert(0, "run", str(directory.relative_to(path)) if path.is_dir() else ".")
        frames.append(frame)
    frame = pd.concat(frames, ignore_index=True)
    return frame if kind is None else of_kind(frame, kind)
