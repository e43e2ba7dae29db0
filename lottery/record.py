"""The run's record: JSONL rows written as they happen, mirrored to W&B, loaded with pandas.

Row kinds: `eval` (one per level, branch, replicate and evaluation step), `summary` (one per
level, branch and replicate: final values and the early-stop step, the minimum validation
loss) and `run` (the resolved config and parameter counts, first line). `record.jsonl` is
the source of truth; W&B is a mirror that may fail without losing anything: `WandbSink`
logs the rows as they are written, and after the run its entry point calls `wandb_summary`
with the figures it drew (this module draws nothing and imports nothing from analysis).
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from lottery.atomic import write_atomically
from lottery.identity import run_id as identity

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


SUMMARY_LOGGED = "wandb_summary.json"  # in the run folder: the summary run was logged


def _warn(error: Exception, what: str = "W&B disabled for this run") -> None:
    print(f"lottery: warning: {what} ({type(error).__name__}: {error}); the local record is "
          "complete", file=sys.stderr)


def _init(project: str, group: str, job_type: str, name: str, config: dict, directory: Path,
          init_timeout: float):
    import wandb

    directory.mkdir(parents=True, exist_ok=True)
    return wandb.init(project=project, group=group, job_type=job_type, name=name,
                      config=config, dir=str(directory),
                      mode=os.environ.get("WANDB_MODE", "offline"), reinit="create_new",
                      settings=wandb.Settings(init_timeout=init_timeout))


class WandbSink:
    """The rows of one run, each logged to its member's W&B run (eval rows as they are,
    summary rows under `summary/`); other kinds are not mirrored."""

    def __init__(self, project: str, group: str, config: dict, directory: Path,
                 init_timeout: float = 60.0, run_id: str | None = None):
        self.project, self.group, self.config = project, group, config
        self.run_id = run_id or identity(config)  # config: the resolved config
        self.directory = Path(directory)
        self.init_timeout = init_timeout
        self.runs: dict[tuple[str, int], object] = {}
        self.failed = False

    def _guard(self, action, *args):
        if self.failed:
            return None
        try:
            return action(*args)
        except Exception as error:  # W&B must never stop a run
            self.failed = True
            _warn(error)
            return None

    def _run(self, branch: str, replicate: int):
        key = (branch, replicate)
        if key not in self.runs:
            self.runs[key] = _init(self.project, self.group, branch,
                                   f"{self.group}-{self.run_id}-{branch}-r{replicate}",
                                   self.config, self.directory, self.init_timeout)
        return self.runs[key]

    def write(self, row: dict) -> None:
        if row.get("kind") not in ("eval", "summary"):
            return
        prefix = "" if row["kind"] == "eval" else "summary/"
        values = {prefix + k: v for k, v in row.items()
                  if isinstance(v, (int, float)) and k not in ("replicate",)}
        self._guard(lambda: self._run(row["branch"], row["replicate"]).log(values))

    def close(self) -> None:
        for run in self.runs.values():  # even after a failure: never leave a run open
            try:
                run.finish()
            except Exception:
                pass


def wandb_summary(run_dir, images: dict[str, Path] | None = None) -> None:
    """Log the summary run of the finished run in `run_dir` (see the module's docstring):
    tables from its record, which a resumed run keeps whole, and `images` ({name: PNG
    path}, drawn by the caller). Project, group, config and run id come from the record's
    `run` row. Does nothing where it was logged before or the record has no summary rows; a
    W&B failure is warned about and changes nothing else."""
    run_dir = Path(run_dir)
    record, marker = run_dir / RECORD_NAME, run_dir / SUMMARY_LOGGED
    summaries = pd.DataFrame(recorded_rows(record, "summary"))
    if marker.exists() or summaries.empty:
        return
    try:
        name = _log_summary(run_dir, summaries, images or {})
    except Exception as error:  # W&B must never stop a run
        _warn(error, "W&B summary not logged")
        return
    write_atomically(marker, lambda f: f.write(json.dumps({"name": name}).encode()))


def _log_summary(run_dir: Path, summaries: pd.DataFrame, images: dict) -> str:
    import wandb

    record = run_dir / RECORD_NAME
    head = recorded_rows(record, "run")[0]
    config = head["config"]
    logger = config.get("logger") or {}
    group = head.get("name")
    name = f"{group}-{identity(config)}-summary"
    run = _init(logger.get("project", "lottery"), group, "summary", name, config, run_dir,
                logger.get("init_timeout", 60))
    try:
        run.log({"summaries": wandb.Table(dataframe=summaries.drop(columns="kind")),
                 "levels": wandb.Table(dataframe=summary_table(summaries)),
                 "evaluations": wandb.Table(dataframe=pd.DataFrame(
                     recorded_rows(record, "eval")).drop(columns="kind")),
                 **{key: wandb.Image(str(path)) for key, path in images.items()}})
    finally:
        run.finish()
    return name


def recorded_rows(path: Path, kind: str) -> list[dict]:
    """The rows of one kind in the record file `path` (none if there is no such file)."""
    if not path.exists():
        return []
    rows = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return [row for row in rows if row.get("kind") == kind]


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


def load(path, kind: str | None = None) -> pd.DataFrame:
    """All rows of one run directory, a `record.jsonl` file, or every record under a directory.

    A `run` column holds each record's directory relative to `path`; `kind` filters rows
    (`"eval"`, `"summary"`, `"run"`).
    """
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.rglob(RECORD_NAME))
    if not files:
        raise FileNotFoundError(f"no {RECORD_NAME} in {path}")
    frames = []
    for file in files:
        rows = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
        frame = pd.DataFrame(rows)
        base = path if path.is_dir() else path.parent
        frame.insert(0, "run", str(file.parent.relative_to(base)) if path.is_dir() else ".")
        frames.append(frame)
    frame = pd.concat(frames, ignore_index=True)
    if kind is not None:
        frame = frame[frame["kind"] == kind].dropna(axis=1, how="all").reset_index(drop=True)
        for column in INTEGER_COLUMNS & set(frame.columns):
            if frame[column].notna().all():
                frame[column] = frame[column].astype(int)
    return frame


def diverged(summaries: pd.DataFrame) -> pd.Series:
    """Which summary rows are diverged members (`status: diverged`): their early-stop values
    may be the untrained network's, so tables and plots leave them out. A record from before
    the `status` column has none."""
    if "status" not in summaries.columns:
        return pd.Series(False, index=summaries.index)
    return summaries["status"].eq("diverged")


def left_out(summaries: pd.DataFrame) -> str:
    """One line naming the diverged members of `summaries` that a table leaves out of its
    means ("" when there are none), so that a reader sees what the means are not over; each
    named by level, branch and replicate, and by run when the rows come from several."""
    gone = summaries[diverged(summaries)]
    if gone.empty:
        return ""
    runs = "run" in gone.columns and summaries["run"].nunique() > 1
    names = ", ".join((f"{r.run} " if runs else "") + f"level {r.level} {r.branch} r{r.replicate}"
                      for r in gone.itertuples())
    return (f"Left out of the means: {len(gone)} diverged member{'s' * (len(gone) > 1)} "
            f"({names}).\n")


def summary_table(summaries: pd.DataFrame, accuracy: str = "early_stop") -> pd.DataFrame:
    """Test accuracy (`accuracy`: "early_stop", at the minimum validation loss, or "final")
    and the early-stop step, mean and std over replicates, per level and branch (branches in
    the order they ran). Diverged members are left out of the means (`replicates`: members
    averaged) and counted (`diverged`); a group with none left has NaN means."""
    gone = diverged(summaries)
    metric = f"{accuracy}_test_accuracy"
    grouped = summaries.assign(**{metric: summaries[metric].mask(gone),
                                  "early_stop_step": summaries["early_stop_step"].mask(gone),
                                  "ok": ~gone, "diverged": gone}
                               ).groupby(["level", "branch"], sort=False)
    table = grouped.agg(density=("density", "mean"),
                        accuracy_mean=(metric, "mean"), accuracy_std=(metric, "std"),
                        early_stop_step_mean=("early_stop_step", "mean"),
                        early_stop_step_std=("early_stop_step", "std"),
                        replicates=("ok", "sum"), diverged=("diverged", "sum")).reset_index()
    single = table["replicates"] == 1  # one replicate: no spread
    table.loc[single, ["accuracy_std", "early_stop_step_std"]] = 0.0
    return table


def markdown_table(summaries: pd.DataFrame, accuracy: str = "early_stop") -> str:
    """`summary_table` as Markdown: per level, percent remaining, then each branch's
    early-stop iteration and test accuracy (mean ± std over replicates). A cell whose means
    leave diverged members out says how many, and a line under the table names them."""
    table = summary_table(summaries, accuracy)
    branches = list(dict.fromkeys(table["branch"]))
    label = "early-stop" if accuracy == "early_stop" else accuracy
    lines = ["| level | % remaining | " + " | ".join(
        f"{b} early-stop iter | {b} {label} test acc (%)" for b in branches) + " |",
        "|---" * (2 + 2 * len(branches)) + "|"]
    for level, rows in table.groupby("level", sort=True):
        cells = [str(level), f"{100 * rows['density'].iloc[0]:.1f}"]
        for branch in branches:
            row = rows[rows["branch"] == branch].iloc[0]
            note = f" ({row.diverged} diverged)" if row.diverged else ""
            cells += (["—", "—" + note] if not row.replicates else
                      [f"{row.early_stop_step_mean:.0f} ± {row.early_stop_step_std:.0f}",
                       f"{100 * row.accuracy_mean:.2f} ± {100 * row.accuracy_std:.2f}{note}"])
        lines.append("| " + " | ".join(cells) + " |")
    note = left_out(summaries)
    return "\n".join(lines) + "\n" + ("\n" + note if note else "")
