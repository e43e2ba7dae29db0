"""Crash injection, for testing that a killed run resumes exactly.

`LOTTERY_CRASH_AT=point:n` kills this process with SIGKILL (nothing flushed, no handlers
run, as a pre-empted job dies) the n-th time the run reaches `point`: `chunk` (after a
training chunk, before its results are recorded), `level` (after a level's checkpoint) or
`checkpoint` (inside a checkpoint write, the data written but not its manifest).
"""

import os
import signal
from collections import Counter

_reached: Counter = Counter()


def reached(point: str) -> None:
    setting = os.environ.get("LOTTERY_CRASH_AT")
    if not setting:
        return
    name, _, count = setting.partition(":")
    _reached[point] += 1
    if name == point and _reached[point] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
