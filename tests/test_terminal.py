"""What a user sees on a terminal: log lines never share a row with the progress bar, no
bar is left at the end, no bar at all where stderr is not a terminal, and the run's log
lines are also in its job log (<run dir>/cli.log).

The screen is rebuilt from the raw output by a few lines written here (`screen`): carriage
return, newline and overwriting, as a terminal does, ANSI control sequences dropped."""

import io
import os
import pty
import re
import select
import subprocess
import sys
import time

from lottery.lm import budget
from lottery.terminal import progress, say

CSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def screen(output: str) -> list[str]:
    """The rows a terminal shows for `output` (no wrapping: the bar fits the width)."""
    rows, row, col = [], [], 0
    for char in CSI.sub("", output):
        if char == "\n":
            rows.append("".join(row).rstrip())
            row, col = [], 0
        elif char == "\r":
            col = 0
        else:
            if col < len(row):
                row[col] = char
            else:
                row.append(char)
            col += 1
    rows.append("".join(row).rstrip())
    return [r for r in rows if r]


class Terminal(io.StringIO):
    """A stream that says it is a terminal, as stderr is in a shell."""

    def isatty(self):
        return True


def test_lines_are_written_above_the_bar_and_the_bar_goes(monkeypatch):
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    bar = progress(100, "level 0/1 (100.00%)")
    bar.update(30)
    say("level 0: a line", file=term)
    budget.log("round 1: another")  # `lottery lm`'s lines, on stderr
    bar.update(70)
    bar.close()
    assert "step/s" in term.getvalue()  # the bar was drawn
    assert screen(term.getvalue()) == ["level 0: a line", "lottery lm: round 1: another"]


def test_no_bar_where_stderr_is_not_a_terminal(monkeypatch):
    plain = io.StringIO()
    monkeypatch.setattr(sys, "stderr", plain)
    with progress(100, "dense") as bar:
        bar.update(100)
    assert plain.getvalue() == ""


def run_in_terminal(args: list[str], cwd, columns: int = 160, timeout: float = 300) -> str:
    """`python -m lottery.cli ARGS` with stdout and stderr on a pseudo-terminal of `columns`
    columns; everything it wrote."""
    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    env = {**os.environ, "COLUMNS": str(columns)}
    process = subprocess.Popen([sys.executable, "-m", "lottery.cli", *args], cwd=cwd, env=env,
                               stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not select.select([master], [], [], 1)[0]:
                if process.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the process closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
        process.wait(timeout=60)
    assert process.returncode == 0, b"".join(chunks).decode(errors="replace")
    return b"".join(chunks).decode(errors="replace")


# LeNet-300-100 on 8x8 synthetic images (what a terminal shows does not depend on the size;
# 28x28 ones cost seconds of training and saving)
TINY_RUN = ["dataset=synthetic", "dataset.shape=[8,8,1]", "dataset.train_size=600",
            "dataset.validation_size=100", "dataset.test_size=100", "train.steps=40",
            "train.eval_every=20", "train.batch_size=20", "prune.levels=1", "replicates=1"]


def test_a_run_on_a_terminal(tmp_path):
    output = run_in_terminal([*TINY_RUN, "hydra.run.dir=run"], tmp_path)
    rows = screen(output)
    assert "step/s" in output  # the bar was drawn on the way, its density as the lines say it
    assert "level 1/1 (80.00%)" in output
    assert not [row for row in rows if "step/s" in row], rows  # and is gone: no stale bar
    levels = [row for row in rows if re.match(r"level \d", row)]
    # one row each, nothing of the bar before them; 1 level at rate 0.2 of every layer
    # (19,200, 30,000 and 1,000 weights): 80.00% remaining
    assert [row.split(",")[0] for row in levels] == ["level 0: 100.00% remaining",
                                                     "level 1: 80.00% remaining"], rows
    # the first row says the essentials (50,200 = 64*300 + 300*100 + 100*10 weights), the
    # last where the results are and what to run next
    assert re.fullmatch(r"lenet_300_100 on synthetic, 50,200 prunable weights; "
                        r"iterative layerwise magnitude pruning, rewind to step 0; "
                        r"3 members on (1 cpu|2 cpus) -> run",
                        rows[0]), rows[0]
    assert rows[-1] == "lottery: results in run; next: lottery report run"
    log = (tmp_path / "run" / "cli.log").read_text().splitlines()
    assert [line.split(" - ", 1)[1].split(",")[0] for line in log if "] - level " in line] == [
        "level 0: 100.00% remaining", "level 1: 80.00% remaining"]
    assert all(re.match(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\]\[lottery\]\[INFO\] - ", line)
               for line in log), log


def test_a_level_line_rounds_a_mean_as_the_final_table():
    """Two replicates' float32 accuracies whose float32 mean prints 91.57% while the mean of
    the recorded numbers (Python floats, which the final table averages) is 91.565...%,
    printed 91.56%: the level line must say what the table says."""
    from types import SimpleNamespace

    import numpy as np
    import pandas as pd

    from lottery.imp import Experiment
    from lottery.record import summary_table
    from lottery.state import Layout

    accuracies = np.array([0.9277, 0.9036], np.float32)
    by_hand = f"{100 * (float(accuracies[0]) + float(accuracies[1])) / 2:.2f}"
    assert by_hand == "91.56" and f"{100 * accuracies.mean():.2f}" == "91.57"
    rows = pd.DataFrame({"level": 1, "branch": "ticket", "replicate": [0, 1], "density": 0.8,
                         "early_stop_test_accuracy": [float(a) for a in accuracies],
                         "early_stop_step": 20, "status": "ok"})
    assert f"{100 * summary_table(rows).accuracy_mean.iloc[0]:.2f}" == by_hand
    lines = []
    experiment = SimpleNamespace(setup=SimpleNamespace(layout=Layout(("ticket",), 2)),
                                 log=lines.append)
    level = SimpleNamespace(number=1, history=SimpleNamespace(diverged=np.array([-1, -1])))
    Experiment.log_level(experiment, level, {"early_stop_test_accuracy": accuracies}, 1.0,
                         np.array([0.8, 0.8], np.float32), [])
    assert f"ticket {by_hand}%" in lines[0], lines
