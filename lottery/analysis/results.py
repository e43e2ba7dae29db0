"""Results of one run, a Hydra sweep, or several of either, as one tidy pandas DataFrame.

    from lottery.analysis import results
    summaries = results.load("multirun/default", kind="summary")
    results.swept(summaries)            # ["rewind.step"]: the overrides that vary
    results.early_stop(summaries)       # early-stop step and test accuracy, mean/std/min/max/count
                                        # over replicates per (rewind.step, level, branch),
                                        # diverged members left out and counted

Each row is a row of a run's `record.jsonl` (see `lottery.record`) plus a `run` column (the
run's directory relative to the loaded path) and one column per Hydra override of that run,
read from its `.hydra/overrides.yaml` (`rewind.step=20` -> column `rewind.step`, value 20),
so that a sweep's runs can be told apart and grouped by what was swept. `load` keeps every
row, diverged members' too (`status`); the statistics (`aggregate`, `early_stop`, and the
plots made from them) leave diverged members out, and `healthy` drops their rows.
"""

import ast
import os
from pathlib import Path

import pandas as pd
import yaml

from lottery import record
from lottery.record import RECORD_NAME, diverged

OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"
STATS = ("mean", "std", "min", "max", "count")
EARLY_STOP_METRICS = ("early_stop_test_accuracy", "early_stop_step")
MEMBER = ("run", "level", "branch", "replicate")


class ResultsError(ValueError):
    """A path holds no run record (or no rows of the kind asked for)."""


def run_dirs(path) -> list[Path]:
    """Every directory at or under `path` that holds a `record.jsonl`: the run itself, or
    the jobs of a Hydra multirun sweep (named by run id; numbered ones in job order)."""
    path = Path(path)
    if not path.exists():
        raise ResultsError(f"no such directory: {path}")
    dirs = record.run_dirs(path)
    if not dirs:
        raise ResultsError(f"no {RECORD_NAME} in {path}")
    return dirs


def parse_value(text: str):
    """An override's value as Python: numbers as numbers (`20`, `1e-3`), `true`/`null` as
    YAML reads them, anything else (names, lists, sweeps) as the text itself, so that every
    value can be a groupby key."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
    return value if value is None or isinstance(value, (bool, int, float, str)) else text


def read_overrides(run_dir) -> dict:
    """The command-line overrides of one run (`.hydra/overrides.yaml`) as {key: value}.

    `+key=v` and `++key=v` count as `key`; deletions (`~key`) and `hydra.*` keys are left
    out; a run without the file (not started by Hydra) has no overrides."""
    file = Path(run_dir) / OVERRIDES_FILE
    if not file.is_file():
        return {}
    overrides = {}
    for line in yaml.safe_load(file.read_text()) or []:
        line = str(line)
        if line.startswith("~") or "=" not in line:
            continue
        key, value = line.lstrip("+").split("=", 1)
        if not key.startswith("hydra."):
            overrides[key] = parse_value(value)
    return overrides


def load(paths, kind: str | None = None) -> pd.DataFrame:
    """The rows of every run under `paths` (a run directory, a sweep directory, a
    `record.jsonl`, or a list of them) as one DataFrame with `run` and override columns.

    `run` is each run's directory relative to the common parent of `paths` ("." for a
    single run); `kind` keeps only `"summary"`, `"eval"` or `"run"` rows. The override
    column names are kept in `frame.attrs["overrides"]` (see `overrides`, `swept`)."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise ResultsError("no paths given")
    dirs = [d.resolve() for path in paths for d in run_dirs(path)]
    roots = [Path(p).resolve() if Path(p).is_dir() else Path(p).resolve().parent for p in paths]
    base = Path(os.path.commonpath(roots))
    frames, names = [], []
    for run_dir in dirs:
        frame = record.rows_frame(run_dir / RECORD_NAME)
        frame.insert(0, "run", str(run_dir.relative_to(base)) if run_dir.is_relative_to(base)
                     else str(run_dir))
        for key, value in read_overrides(run_dir).items():
            frame[key] = value
            names.append(key)
        frames.append(frame)
    frame = pd.concat(frames, ignore_index=True)
    if kind is not None:
        frame = record.of_kind(frame, kind)
        if frame.empty:
            raise ResultsError(f"no {kind} rows in {', '.join(map(str, paths))}")
    frame.attrs["overrides"] = [n for n in dict.fromkeys(names) if n in frame.columns]
    return frame


def overrides(frame: pd.DataFrame) -> list[str]:
    """The override columns of a frame made by `load` (empty for any other frame)."""
    return [c for c in frame.attrs.get("overrides", []) if c in frame.columns]


def swept(frame: pd.DataFrame) -> list[str]:
    """The override columns whose value differs between rows (a run without an override
    that another run sets counts as a different value): what a sweep varied."""
    return [c for c in overrides(frame) if frame[c].nunique(dropna=False) > 1]


def aggregate(frame: pd.DataFrame, by, metrics=EARLY_STOP_METRICS,
              stats=STATS) -> pd.DataFrame:
    """`metrics` summarised over the rows of each group of `by` (usually over replicates):
    one column `<metric>_<stat>` per metric and statistic, plus the group's mean `density`
    when there is one and it is not a key; groups in the order they first appear. Summary
    rows of diverged members (whose early stop may be the untrained network's) are left out
    of the statistics (`count` counts the others) and counted in a `diverged` column."""
    by, gone = list(by), diverged(frame)
    frame = frame.assign(**{m: frame[m].mask(gone) for m in metrics}, diverged=gone)
    grouped = frame.groupby(by, sort=False, dropna=False)
    table = grouped[list(metrics)].agg(list(stats))
    table.columns = [f"{metric}_{stat}" for metric, stat in table.columns]
    if "density" in frame.columns and "density" not in by:
        table.insert(0, "density", grouped["density"].mean())
    if "status" in frame.columns:
        table["diverged"] = grouped["diverged"].sum().to_numpy()  # same groups, same order
    return table.reset_index()


def healthy(frame: pd.DataFrame, summaries: pd.DataFrame | None = None) -> pd.DataFrame:
    """`frame` without the rows of diverged members: summary rows by their own `status`,
    other rows (evaluations, which have none) by their member's summary row in
    `summaries`, so that learning curves average the same members as the tables."""
    summaries = frame if summaries is None else summaries
    key = [c for c in MEMBER if c in frame.columns]
    gone = pd.MultiIndex.from_frame(summaries.loc[diverged(summaries), key])
    return frame[~pd.MultiIndex.from_frame(frame[key]).isin(gone)]


def early_stop(summaries: pd.DataFrame, by=None, accuracy: str = "early_stop") -> pd.DataFrame:
    """The early-stop step and test accuracy (at early stop, or `accuracy="final"`) over
    replicates per swept override, level (one density each) and branch; `by` replaces
    those keys. Diverged members are left out and counted (`diverged`, see `aggregate`)."""
    by = [*swept(summaries), "level", "branch"] if by is None else list(by)
    return aggregate(summaries, by, (f"{accuracy}_test_accuracy", "early_stop_step"))


def curves(evals: pd.DataFrame, by=None, metric: str = "test_accuracy") -> pd.DataFrame:
    """Learning curves: `metric` of the eval rows over replicates (mean, std, count) per
    swept override, level, branch and step."""
    by = [*swept(evals), "level", "branch"] if by is None else list(by)
    return aggregate(evals, [*by, "step"], (metric,), ("mean", "std", "count"))
