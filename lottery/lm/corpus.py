"""A byte-level (vocabulary 256) language-modelling corpus that needs no download.

`load_corpus("stdlib")` reads the Python standard library's own source: every `*.py` under
`sysconfig.get_paths()["stdlib"]`, in sorted relative-path order, leaving out test suites
(`test`, `tests`, `idle_test` folders), `site-packages`/`dist-packages` and caches, each file
followed by `SEPARATOR`, the whole capped at `max_bytes`. The same Python installation
always gives the same bytes (the description carries the Python version and a digest).
`load_corpus(path)` reads any plain-text file instead. The split is contiguous: the last
`validation_fraction` of the bytes is the validation set, so validation text (for the
stdlib: the last files in sorted order) is never trained on.

On the device: `sample_batch` draws random windows (jittable); `windows` cuts a split into
fixed, non-overlapping windows for a deterministic validation loss (`lottery.lm.train.evaluate`).
"""

import functools
import hashlib
import math
import platform
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

MAX_BYTES = 8_000_000
SEPARATOR = b"\n\x1c\n"  # ASCII "file separator" between source files
EXCLUDED = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages",
                      "__pycache__"})


class CorpusError(Exception):
    """A corpus that cannot be read, is empty, or is too small for what is asked of it."""


@dataclass(frozen=True)
class Corpus:
    train: np.ndarray  # uint8 bytes
    validation: np.ndarray  # uint8 bytes, the text after `train`
    name: str
    description: str


@functools.cache
def stdlib_files() -> tuple[Path, ...]:
    """The standard library's source files that make the "stdlib" corpus, in corpus order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py")
             if not EXCLUDED.intersection(p.relative_to(root).parts[:-1]) and p.is_file()]
    return tuple(sorted(files, key=lambda p: p.relative_to(root).as_posix()))


def _stdlib_bytes(max_bytes: int) -> tuple[bytes, str]:
    chunks, size, count = [], 0, 0
    for path in stdlib_files():
        if size >= max_bytes:
            break
        chunk = path.read_bytes() + SEPARATOR
        chunks.append(chunk)
        size += len(chunk)
        count += 1
    return b"".join(chunks)[:max_bytes], f"{count} source files of the Python " \
        f"{platform.python_version()} standard library"


def _file_bytes(path: str, max_bytes: int) -> tuple[bytes, str]:
    file = Path(path).expanduser()
    if not file.is_file():
        why = "is a directory" if file.is_dir() else "does not exist"
        raise CorpusError(f"corpus file {str(file)!r} {why}; give a plain-text file, or "
                          "source='stdlib' for the Python standard library's source")
    try:
        with open(file, "rb") as handle:
            return handle.read(max_bytes), f"the file {file}"
    except OSError as error:
        raise CorpusError(f"corpus file {str(file)!r} cannot be read ({error.strerror}); "
                          "give a readable plain-text file") from None


def load_corpus(source: str = "stdlib", max_bytes: int = MAX_BYTES,
                validation_fraction: float = 0.05) -> Corpus:
    """The corpus of `source` ("stdlib" or a file path), at most `max_bytes`, split into the
    first `n - round(n * validation_fraction)` bytes (train) and the rest (validation)."""
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, np.integer)) \
            or max_bytes < 2:
        raise CorpusError(f"max_bytes={max_bytes!r} must be an integer of at least 2")
    if not 0 < validation_fraction < 1:
        raise CorpusError(f"validation_fraction={validation_fraction!r} must be in (0, 1)")
    if source == "stdlib":
        data, origin = _stdlib_bytes(int(max_bytes))
        name = f"python{platform.python_version()}-stdlib"
    else:
        data, origin = _file_bytes(str(source), int(max_bytes))
        name = Path(source).stem
    tokens = np.frombuffer(data, np.uint8).copy()
    n = tokens.size
    if n == 0:
        raise CorpusError(f"the corpus {source!r} is empty; give a file with text in it")
    n_val = round(n * validation_fraction)
    if n_val < 2 or n - n_val < 2:
        raise CorpusError(f"the corpus {source!r} has {n} bytes, too few to split with "
                          f"validation_fraction={validation_fraction}; give more text")
    digest = hashlib.sha256(data).hexdigest()[:12]
    description = (f"{origin}: {n:,} bytes (sha256 {digest}), {n - n_val:,} train / "
                   f"{n_val:,} validation")
    return Corpus(tokens[:n - n_val], tokens[n - n_val:], name, description)


@functools.partial(jax.jit, static_argnames=("batch", "context"))
def sample_batch(tokens, key, batch: int, context: int):
    """`batch` random windows of the 1-D byte array `tokens` (on the device): inputs and
    next-byte targets, (batch, context) int32 each. Starts are uniform over every window."""
    n = tokens.shape[0]
    if n <= context:
        raise CorpusError(f"{n} tokens cannot fill a window of context {context} + 1")
    starts = jax.random.randint(key, (batch,), 0, n - context)
    window = tokens[starts[:, None] + jnp.arange(context + 1)].astype(jnp.int32)
    return window[:, :-1], window[:, 1:]


def windows(tokens, context: int, max_windows: int | None = None):
    """The split cut into non-overlapping windows: inputs `tokens[i*T : i*T+T]`, targets one
    byte later, (N, T) int32 NumPy arrays, N = (n - 1) // T; so every byte after the first
    (up to a last partial window) is predicted once. With `max_windows`, that many evenly
    spaced windows of those (deterministic)."""
    tokens = np.asarray(tokens)
    count = (tokens.size - 1) // context
    if count < 1:
        raise CorpusError(f"{tokens.size} tokens cannot fill a window of context {context} + 1")
    index = np.arange(count)
    if max_windows is not None and max_windows < count:
        index = np.unique(np.linspace(0, count - 1, max_windows).round().astype(int))
    starts = index[:, None] * context + np.arange(context)
    return tokens[starts].astype(np.int32), tokens[starts + 1].astype(np.int32)


def bits_per_byte(mean_nll_nats):
    """Mean cross entropy per byte, in bits (the usual byte-level LM metric)."""
    return mean_nll_nats / math.log(2)


def perplexity(mean_nll_nats):
    """exp(mean cross entropy): the effective number of equally likely next bytes."""
    return np.exp(mean_nll_nats)
