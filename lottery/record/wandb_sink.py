"""Weights & Biases, a mirror of the record: it logs what it is given and draws nothing.

`WandbSink` mirrors the rows as they are written: one W&B run per (branch, replicate),
group = experiment, job_type = branch. After the run, its entry point calls
`wandb_summary(run_dir, images)`: one more run of the group (job_type `summary`) that holds
the record as `wandb.Table`s (`summaries`: one row per level, branch and replicate, diverged
ones included with their `status`; `levels`: `summary_table`, mean and std over the
replicates that did not diverge, per level and branch; `evaluations`) and the figures the
entry point drew (`images`: {name: PNG path}). It is logged once per run folder: a finished
run started again does not log it again.

Runs are named `{group}-{run_id}-{branch}-r{replicate}` and `{group}-{run_id}-summary`,
`run_id` being the run's identity (`lottery.identity.run_id` of its config, also the name
of its output directory), so that runs of a sweep never share a name.

Offline unless `$WANDB_MODE` says otherwise. W&B's own terminal output is off (a run is
seven or more W&B runs, each of which printed a header, a sync hint and its history: some
150 lines that buried the run's own); `wandb_summary` says instead, in one line, where the
runs are and, offline, the `wandb sync` command that uploads them. Any W&B failure is
warned about once and turns the sink off; the JSONL record is unaffected.
"""

import json
import os
import shlex
import sys
from pathlib import Path

import pandas as pd

from lottery.atomic import write_atomically
from lottery.identity import run_id as identity
from lottery.record.rows import RECORD_NAME, recorded_rows
from lottery.record.tables import summary_table
from lottery.terminal import plural, say, shown

SUMMARY_LOGGED = "wandb_summary.json"  # in the run folder: the summary run was logged
OFFLINE = ("offline", "dryrun")  # the $WANDB_MODEs that keep runs on disk for `wandb sync`


def _warn(error: Exception, what: str = "W&B disabled for this run") -> None:
    print(f"lottery: warning: {what} ({type(error).__name__}: {error}); the local record is "
          "complete", file=sys.stderr)


def _init(project: str, group: str, job_type: str, name: str, config: dict, directory: Path,
          init_timeout: float):
    import wandb

    directory.mkdir(parents=True, exist_ok=True)
    # silent: none of W&B's own lines (its failures still raise, and are warned about);
    # console off: each member's run would capture the same shared terminal
    return wandb.init(project=project, group=group, job_type=job_type, name=name,
                      config=config, dir=str(directory), mode=_mode(), reinit="create_new",
                      settings=wandb.Settings(init_timeout=init_timeout, silent=True,
                                              console="off"))


def _mode() -> str:
    return os.environ.get("WANDB_MODE", "offline")


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
    `run` row. Logs nothing where it was logged before or the record has no summary rows; a
    W&B failure is warned about and changes nothing else. Then says where the run folder's
    W&B runs are (`where_runs_are`), above any progress bar."""
    run_dir = Path(run_dir)
    record, marker = run_dir / RECORD_NAME, run_dir / SUMMARY_LOGGED
    summaries = pd.DataFrame(recorded_rows(record, "summary"))
    if not marker.exists() and not summaries.empty:
        try:
            logged = _log_summary(run_dir, summaries, images or {})
        except Exception as error:  # W&B must never stop a run
            _warn(error, "W&B summary not logged")
        else:
            write_atomically(marker, lambda f: f.write(json.dumps(logged).encode()))
    line = where_runs_are(run_dir)
    if line:
        say(line)


def where_runs_are(run_dir) -> str | None:
    """One line on the W&B runs in `run_dir` (None where there are none): offline, their
    folder and the `wandb sync` command that uploads them; online, the project's address
    (as the summary run gave it) and the group."""
    run_dir, mode = Path(run_dir), _mode()
    folder = run_dir / "wandb"
    if mode == "disabled":
        return None
    if mode in OFFLINE:
        runs = list(folder.glob("offline-run-*"))
        where = shlex.quote(shown(folder))
        return (f"W&B: {plural(len(runs), 'offline run')} in {where}; upload with: "
                f"wandb sync {where}/offline-run-*") if runs else None
    runs = [path for path in folder.glob("run-*") if path.is_dir()]
    head = (recorded_rows(run_dir / RECORD_NAME, "run") or [{}])[0]
    marker = run_dir / SUMMARY_LOGGED
    url = json.loads(marker.read_text()).get("url") if marker.exists() else None
    project = url or (head.get("config", {}).get("logger") or {}).get("project", "lottery")
    return (f"W&B: {plural(len(runs), 'run')} online in project {project}, group "
            f"{head.get('name')}") if runs else None


def _log_summary(run_dir: Path, summaries: pd.DataFrame, images: dict) -> dict:
    """Log the summary run; its name and, online, the project's address."""
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
        url = None if _mode() in (*OFFLINE, "disabled") else run.project_url
    finally:
        run.finish()
    return {"name": name, "url": url}
