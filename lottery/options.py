"""Checking a config value: `ConfigError`, one line that names the key and how to fix it.

A leaf that the config (`lottery.config`) and every method that owns options (schedules,
rewind modes, scores: their `check` classmethods) use, so that a bad value reads the same
wherever it is checked.
"""

from lottery.durations import DurationError, parse_duration


class ConfigError(Exception):
    """A config value that cannot run; the message names the key and how to fix it. Where
    one setting is at fault and one override mends it, `key` names the setting and `fix`
    the override (also in the message): the command line's pre-check then says when a
    preset, not the user, set `key` (`lottery.overrides`)."""

    def __init__(self, message: str, key: str | None = None, fix: str | None = None):
        super().__init__(message)
        self.key, self.fix = key, fix


def override(key: str, value) -> str:
    """`key=value` as one would type it on the command line: `branches=[ticket,reinit]`."""
    if isinstance(value, (list, tuple)):
        value = f"[{','.join(str(v) for v in value)}]"
    return f"{key}={'null' if value is None else value}"


def integer(value, key: str, low: int, why: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}={value!r} must be an integer{why}")
    if value < low:
        raise ConfigError(f"{key}={value} must be at least {low}{why}")
    return value


def optional_text(value, key: str, what: str = "a string") -> str | None:
    """A non-empty string, or None."""
    if value is not None and (not isinstance(value, str) or not value):
        raise ConfigError(f"{key}={value!r} must be {what} (or null)")
    return value


def boolean(value, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be true or false")
    return value


def fraction(value, key: str, why: str = "") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}={value!r} must be a number in [0, 1){why}")
    if not 0 <= value < 1:
        raise ConfigError(f"{key}={value} must be in [0, 1){why}")
    return float(value)


def number(value, key: str, low: float, high: float, ends: str = "()", why: str = "") -> float:
    """A number between `low` and `high`; `ends` says which ends are allowed: "[" or "]"
    (closed), "(" or ")" (open)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = ((value >= low if ends[0] == "[" else value > low)
              and (value <= high if ends[1] == "]" else value < high))
    if not ok:
        raise ConfigError(f"{key}={value!r} must be a number in {ends[0]}{low}, {high}{ends[1]}"
                          f"{why}")
    return float(value)


def positive(value, key: str, why: str = "") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{key}={value!r} must be a positive number{why}")
    return value


def choice(value, key: str, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{key}={value!r} is unknown; choose one of {', '.join(sorted(choices))}")
    return value


def names(value, key: str, choices, empty: bool = False) -> tuple[str, ...]:
    """A list of names from `choices` (a registry or a tuple), each kept once in the order
    given; one name alone stands for a list of it; `empty`: no name at all is allowed."""
    values = [] if value is None else [value] if isinstance(value, str) else value
    if not isinstance(values, (list, tuple)):
        raise ConfigError(f"{key}={value!r} must be a list of names from {', '.join(choices)}")
    bad = [v for v in values if not isinstance(v, str) or v not in choices]
    if bad:
        raise ConfigError(f"{key}: unknown name(s) {', '.join(map(repr, bad))}; choose from "
                          f"{', '.join(choices)}")
    if not values and not empty:
        raise ConfigError(f"{key} is empty; choose from {', '.join(choices)}")
    return tuple(dict.fromkeys(values))


def duration(value, key: str, low: int):
    """A duration (steps, or "<n>ep" / "<n>it") of at least `low`, returned as given."""
    try:
        count, _ = parse_duration(value, key)
    except DurationError as error:
        raise ConfigError(str(error)) from None
    if count < low:
        raise ConfigError(f"{key}={value!r} must be at least {low}")
    return value
