"""What a run shows on the terminal: its log lines, written through the progress bar so
that the two never share a row, and the bar, shown on a terminal only and gone at the end.

    say("level 1: ...")               # above the bar (tqdm.write: clears it, writes, redraws)
                                      # and to the logger "lottery": under Hydra, the run's
                                      # job log <run dir>/cli.log (conf/config.yaml, lm.yaml)
    with progress(total, "dense") as bar:
        bar.update(steps)             # no bar where stderr is not a terminal
    percent(0.8) == "80.00%"          # densities and accuracies: log lines, bar and tables
    plural(2, "device") == "2 devices"
    finished(out_dir)                 # the last line: where the results are, what to run next
"""

import logging
import shlex
from pathlib import Path

from tqdm import tqdm

LOGGER = logging.getLogger("lottery")


def say(line: str, file=None) -> None:
    """Print `line` (on `file`, default stdout) above any progress bar, and log it."""
    tqdm.write(line, file=file)
    LOGGER.info(line)


def progress(total: int, desc: str | None = None, visible: bool = True, **options) -> tqdm:
    """A progress bar in steps on stderr, shown only where stderr is a terminal
    (`disable=None`) and `visible`, and cleared when it closes (`leave=False`): no stale bar."""
    return tqdm(total=total, desc=desc, unit="step", disable=None if visible else True,
                leave=False,
                dynamic_ncols=True, **options)


def percent(fraction: float) -> str:
    """A density or an accuracy as the log lines and tables print it: 2 decimals."""
    return f"{100 * fraction:.2f}%"


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """`count` and `noun` (one) or `nouns` (default: `noun` + "s")."""
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"


def shown(path) -> str:
    """`path` as a user would type it: relative to the working directory where it is in it."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve())) or "."
    except ValueError:
        return str(path)


def finished(run_dir, report_dir=None, program: str = "lottery") -> None:
    """The run's last line: where its results are and the command that reports them
    (`report_dir`: a sweep's folder, which reports all its runs; default `run_dir`)."""
    say(f"{program}: results in {shown(run_dir)}; next: lottery report "
        f"{shlex.quote(shown(report_dir or run_dir))}")
