"""Results of one run, a Hydra sweep, or several of either, as one tidy pandas DataFrame.

    from lottery.analysis import results
    summaries = results.load("multirun/lenet_mnist", kind="summary")
    results.swept(summaries)            # ["rewind.step"]: the overrides that vary
    results.early_stop(summaries)       # early-stop step and test accuracy, mean/std/min/max/count
                                        # over replicates per (rewind.step, level, branch),
                                        # diverged members left out and counted

Each row is a row of a run's `record.jsonl` (see `lottery.record`) plus a `run` column (the
run's directory relative to the loaded path) and one column per key that any run overrode on
the command line (`.hydra/overrides.yaml`: `rewind.step=20` -> column `rewind.step`), so
that a sweep's runs can be told apart and grouped by what was swept. Every run's value of
such a column is what the run used, read from its own resolved config (a config group's
chosen option, from `.hydra/hydra.yaml`, for `dataset=...`, `experiment=...`), so a run that
did not override a key holds its default there, not a missing value; integers stay integers.
`load` keeps every row, diverged members' too (`status`); the statistics (`aggregate`,
`early_stop`, and the plots made from them) leave diverged members out, and `healthy` drops
their rows.

What users pool is pooled: runs that differ only in `seed` (`POOLED`) are replicates of one
experiment, so `split` (the keys that tables and plots are split by) leaves `seed` out
unless asked for (`by=["seed"]`). Two run folders of the same run (the same run id,
`lottery.identity.run_id` of the recorded config: a copy, or a config spelled two ways) are
counted once: `load` keeps the one with more rows and names the others in
`frame.attrs["duplicates"]`.
"""

import ast
import os
from difflib import get_close_matches
from pathlib import Path

import pandas as pd
import yaml

from lottery import record
from lottery.identity import run_id
from lottery.record import RECORD_NAME, diverged

OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"
HYDRA_FILE = Path(".hydra") / "hydra.yaml"
POOLED = ("seed",)  # keys whose runs are pooled like replicates unless split by them
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


def read_choices(run_dir) -> dict:
    """The config groups' chosen options of one run (`.hydra/hydra.yaml`, runtime.choices:
    `{"dataset": "mnist", "experiment": None, ...}`), empty without the file."""
    file = Path(run_dir) / HYDRA_FILE
    if not file.is_file():
        return {}
    hydra = (yaml.safe_load(file.read_text()) or {}).get("hydra") or {}
    return {k: v for k, v in ((hydra.get("runtime") or {}).get("choices") or {}).items()
            if not k.startswith("hydra/")}


MISSING = object()


def _lookup(config: dict, key: str):
    """The value at dotted `key` of `config`, or MISSING."""
    value = config
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return MISSING
        value = value[part]
    return value


def _used(key: str, config: dict, choices: dict, overrides: dict):
    """What a run used for the override key `key`: its group's chosen option, else the value
    in its resolved config (a section by its `name`), else its own override, else None."""
    if key in choices:
        return choices[key]
    value = _lookup(config, key)
    if isinstance(value, dict):
        value = value.get("name", overrides.get(key))
    if isinstance(value, list):  # a groupby key must be hashable: `[a,b]` as written
        value = "[" + ",".join(map(str, value)) + "]"
    if value is MISSING:
        return overrides.get(key)
    return value


def _dotted(config: dict, prefix: str = "") -> list[str]:
    """Every dotted key of a nested config, sections and leaves."""
    return [name for key, value in config.items() for name in
            [f"{prefix}{key}", *(_dotted(value, f"{prefix}{key}.") if isinstance(value, dict)
                                 else [])]]


def _run_config(frame: pd.DataFrame) -> dict | None:
    """The resolved config of a record's `run` row, or None (a record without one)."""
    if "kind" not in frame.columns or "config" not in frame.columns:
        return None
    configs = frame.loc[frame["kind"] == "run", "config"]
    return configs.iloc[0] if len(configs) and isinstance(configs.iloc[0], dict) else None


def load(paths, kind: str | None = None, keys=()) -> pd.DataFrame:
    """The rows of every run under `paths` (a run directory, a sweep directory, a
    `record.jsonl`, or a list of them) as one DataFrame with `run` and override columns.

    `run` is each run's directory relative to the common parent of `paths` ("." for a
    single run); `kind` keeps only `"summary"`, `"eval"` or `"run"` rows; `keys`: config keys
    to add as columns even where no run overrode them (`["seed"]`). The override column names
    are kept in `frame.attrs["overrides"]` (see `overrides`, `swept`, `split`); run folders
    of a run already loaded are left out, as `frame.attrs["duplicates"]`: (kept, left out,
    run id) each."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise ResultsError("no paths given")
    dirs = [d.resolve() for path in paths for d in run_dirs(path)]
    roots = [Path(p).resolve() if Path(p).is_dir() else Path(p).resolve().parent for p in paths]
    base = Path(os.path.commonpath(roots))
    runs, names, kept = [], list(keys), {}
    for run_dir in dirs:
        frame = record.rows_frame(run_dir / RECORD_NAME)
        name = str(run_dir.relative_to(base)) if run_dir.is_relative_to(base) else str(run_dir)
        frame.insert(0, "run", name)
        config, given = _run_config(frame), read_overrides(run_dir)
        names += list(given)
        identity = None if config is None else run_id(config)
        runs.append((name, frame, config or {}, read_choices(run_dir), given, identity))
        if identity is not None and (identity not in kept
                                     or len(frame) > len(runs[kept[identity]][1])):
            kept[identity] = len(runs) - 1
    names = list(dict.fromkeys(names))
    for key in keys:  # a key no run has: one line naming the nearest, not a KeyError later
        if all(key not in choices and key not in given and _lookup(config, key) is MISSING
               for _, _, config, choices, given, _ in runs):
            known = sorted({k for _, _, config, choices, _, _ in runs
                            for k in [*_dotted(config), *choices]})
            close = get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ResultsError(f"{key} is not a config key of these runs{hint}")
    frames, duplicates = [], []
    for index, (name, frame, config, choices, given, identity) in enumerate(runs):
        if identity is not None and kept[identity] != index:
            duplicates.append((runs[kept[identity]][0], name, identity))
            continue
        if kind is not None:  # before the key columns: a key null in every run stays
            frame = record.of_kind(frame, kind)
        for key in names:
            frame[key] = pd.Series([_used(key, config, choices, given)] * len(frame),
                                   index=frame.index, dtype=object)
        frames.append(frame)
    frame = pd.concat(frames, ignore_index=True)
    if kind is not None and frame.empty:
        raise ResultsError(f"no {kind} rows in {', '.join(map(str, paths))}")
    for key in names:
        if key in frame.columns and frame[key].notna().all():
            frame[key] = frame[key].infer_objects()  # numbers as numbers where none is missing
    frame.attrs["overrides"] = [n for n in names if n in frame.columns]
    frame.attrs["duplicates"] = duplicates
    return frame


def text(value) -> str:
    """A value as a heading or label shows it: an integer as an integer (`1`, not `1.0`, as a
    column with a missing value holds it), a missing value as null."""
    if value is None or (isinstance(value, float) and value != value):
        return "null"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def overrides(frame: pd.DataFrame) -> list[str]:
    """The override columns of a frame made by `load` (empty for any other frame)."""
    return [c for c in frame.attrs.get("overrides", []) if c in frame.columns]


def swept(frame: pd.DataFrame) -> list[str]:
    """The override columns whose value differs between rows (a run without an override
    that another run sets counts as a different value): what a sweep varied."""
    return [c for c in overrides(frame) if frame[c].nunique(dropna=False) > 1]


def split(frame: pd.DataFrame, by=()) -> list[str]:
    """The keys that tables and plots split runs by: the swept ones, less those pooled like
    replicates (`POOLED`: seeds), plus `by` (e.g. `["seed"]`)."""
    by = list(by)
    return [c for c in swept(frame) if c not in POOLED and c not in by] + by


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
    replicates (and seeds) per swept override (`split`), level (one density each) and
    branch; `by` replaces those keys. Diverged members are left out and counted
    (`diverged`, see `aggregate`)."""
    by = [*split(summaries), "level", "branch"] if by is None else list(by)
    return aggregate(summaries, by, (f"{accuracy}_test_accuracy", "early_stop_step"))


def curves(evals: pd.DataFrame, by=None, metric: str = "test_accuracy") -> pd.DataFrame:
    """Learning curves: `metric` of the eval rows over replicates and seeds (mean, std,
    count) per swept override (`split`), level, branch and step."""
    by = [*split(evals), "level", "branch"] if by is None else list(by)
    return aggregate(evals, [*by, "step"], (metric,), ("mean", "std", "count"))
