"""Training durations in steps or epochs: `5000`, `"5000it"` or `"160ep"` (OpenLTH's notation).

Epochs become steps once the training set is known: one epoch is
`len(train) // batch_size` steps (each epoch is a fresh permutation; the last partial batch
is dropped).
"""

import re

_PATTERN = re.compile(r"^\s*(\d+)\s*(ep|it)\s*$")


class DurationError(ValueError):
    """A duration that is neither a step count nor `<n>ep` / `<n>it`."""


def parse_duration(value, key: str) -> tuple[int, str]:
    """`(count, "it" | "ep")` for an int or a string like `"160ep"`; raises DurationError."""
    if isinstance(value, int) and not isinstance(value, bool):
        count, unit = value, "it"
    elif isinstance(value, str) and _PATTERN.match(value):
        number, unit = _PATTERN.match(value).groups()
        count = int(number)
    else:
        raise DurationError(f"{key}={value!r} must be a step count or a string like '160ep' "
                            "(epochs) or '500it' (steps)")
    if count < 0:
        raise DurationError(f"{key}={value!r} must not be negative")
    return count, unit


def to_steps(value, steps_per_epoch: int, key: str = "duration") -> int:
    count, unit = parse_duration(value, key)
    return count * steps_per_epoch if unit == "ep" else count
