"""Text for pretrained models: the model's tokenizer, calibration windows, evaluation windows.

The tokenizer is the folder's `tokenizer.json`, run by the `tokenizers` library with its
own post-processor (a Llama tokenizer adds its begin-of-text token, GPT-2's adds none), as
`transformers`' `tokenizer(text)` does. Text comes from a file (read as UTF-8) or a
`datasets` dataset name (`wikitext:wikitext-2-raw-v1:test`: name, config, split; its rows
joined by blank lines, as the Wanda and SparseGPT evaluation code joins WikiText).

- `calibration`: `samples` windows of `length` tokens at random starts (seeded), as the
  papers draw C4 calibration samples (Wanda's and SparseGPT's `get_c4`, from one text here).
- `eval_windows`: the text cut into consecutive non-overlapping windows of `length` tokens,
  the tail dropped (their `eval_ppl`: `nsamples = numel // seqlen`).
"""

from pathlib import Path

import numpy as np


class TextError(ValueError):
    """Text or a tokenizer that cannot be read, or too little text for what is asked."""


def tokenizer(folder: Path):
    """The `tokenizers.Tokenizer` of a model folder."""
    from tokenizers import Tokenizer

    file = Path(folder) / "tokenizer.json"
    if not file.is_file():
        raise TextError(f"{folder} has no tokenizer.json; save the model's fast tokenizer "
                        "there (transformers: AutoTokenizer.from_pretrained(...)"
                        ".save_pretrained(DIR))")
    return Tokenizer.from_file(str(file))


def read_text(source: str) -> str:
    """A text file's contents, or a `datasets` split (`name:config:split`)."""
    path = Path(source).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8", errors="replace")
    if ":" not in source:
        raise TextError(f"{source!r} is not a file; give a text file or a datasets split "
                        "as name:config:split (e.g. wikitext:wikitext-2-raw-v1:test)")
    try:
        import datasets
    except ImportError:
        raise TextError(f"{source!r} names a datasets split, but the `datasets` package is "
                        "not installed (pip install datasets), or give a text file") from None
    name, config, split = (source.split(":") + [None, None])[:3]
    try:
        rows = datasets.load_dataset(name, config, split=split or "test")
    except Exception as error:  # noqa: BLE001  (offline or unknown: one line)
        raise TextError(f"cannot load {source!r} with datasets ({type(error).__name__}); "
                        "save the text to a file elsewhere and give its path") from None
    return "\n\n".join(rows["text"])


def encode(folder: Path, source: str) -> np.ndarray:
    """The token ids (int32) of `source`'s text with the folder's tokenizer."""
    ids = np.asarray(tokenizer(folder).encode(read_text(source)).ids, np.int32)
    if ids.size == 0:
        raise TextError(f"{source!r} has no text")
    return ids


def calibration(ids: np.ndarray, samples: int, length: int, seed: int = 0) -> np.ndarray:
    """(samples, length) windows at uniformly random starts (seeded)."""
    if ids.size < length + 1:
        raise TextError(f"{ids.size} tokens cannot fill a calibration window of {length}; "
                        "give more text or a shorter calibration.length")
    starts = np.random.default_rng(seed).integers(0, ids.size - length, samples)
    return ids[starts[:, None] + np.arange(length)]


def eval_windows(ids: np.ndarray, length: int, limit: int | None = None) -> np.ndarray:
    """(N, length) consecutive non-overlapping windows, N = len(ids) // length (at most
    `limit`, the first ones)."""
    count = ids.size // length
    if count < 1:
        raise TextError(f"{ids.size} tokens cannot fill one evaluation window of {length}; "
                        "give more text or a shorter eval.length")
    if limit is not None:
        count = min(count, limit)
    return ids[:count * length].reshape(count, length)
