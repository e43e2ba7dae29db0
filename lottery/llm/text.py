"""Text for pretrained models: the model's tokenizer, calibration windows, evaluation windows.

The tokenizer is the folder's `tokenizer.json`, run by the `tokenizers` library with its
own post-processor (a Llama tokenizer adds its begin-of-text token, GPT-2's adds none), as
`transformers`' `tokenizer(text)` does. Text comes from a plain-text file (UTF-8), a JSON
lines file (`.jsonl`, `.json`, either gzipped: each line's "text", as C4's shards
`en/c4-train.00000-of-01024.json.gz` hold their documents), or a `datasets` split
(`wikitext:wikitext-2-raw-v1:test`: name, config, split); documents and rows are joined by
blank lines, as the Wanda and SparseGPT evaluation code joins WikiText's. `max_chars` reads
only the first characters (calibration draws from the first 50 million: C4's shard has
~300 million, the papers draw from all of it).

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


CALIBRATION_CHARS = 50_000_000
JSON_LINES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")


def _json_lines(path: Path, max_chars: int | None) -> str:
    import gzip
    import json

    opener = gzip.open if path.name.endswith(".gz") else open
    documents, size = [], 0
    with opener(path, "rt", encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                documents.append(json.loads(line)["text"])
            except (ValueError, KeyError, TypeError):
                raise TextError(f"{path}:{number} is not a JSON object with a \"text\" field "
                                "(JSON lines files hold one document per line)") from None
            size += len(documents[-1]) + 2
            if max_chars is not None and size >= max_chars:
                break
    return "\n\n".join(documents)


def read_text(source: str, max_chars: int | None = None) -> str:
    """The text of a file (plain or JSON lines) or of a `datasets` split (`name:config:split`),
    at most `max_chars` characters."""
    path = Path(source).expanduser()
    if path.is_file() and path.name.endswith(JSON_LINES):
        return _json_lines(path, max_chars)[:max_chars]
    if path.is_file():
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read(-1 if max_chars is None else max_chars)
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
    return "\n\n".join(rows["text"])[:max_chars]


def encode(folder: Path, source: str, max_chars: int | None = None) -> np.ndarray:
    """The token ids (int32) of `source`'s text (its first `max_chars` characters) with the
    folder's tokenizer."""
    ids = np.asarray(tokenizer(folder).encode(read_text(source, max_chars)).ids, np.int32)
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
