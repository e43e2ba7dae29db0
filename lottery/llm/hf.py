"""The Hugging Face model folder: the one owner of its format, read and written.

A folder holds `config.json` (the architecture: `lottery.llm.spec`), the weights as
safetensors (`model.safetensors`, or shards listed by `model.safetensors.index.json`) and
the tokenizer (`tokenizer.json` and its companions, copied as they are). `locate` finds a
folder by local path or downloads a hub name (`huggingface_hub`, which caches it); where the
hub cannot be reached it says what to do instead.

Parameter names: a parameter's path in our params tree is its checkpoint name, but for the
leaf (`kernel`, `embedding`, `scale` -> `weight`; `bias` stays). Kernels are (in, out), the
framework's layout: `nn.Linear` weights (out, in) are transposed both ways, GPT-2's
`Conv1D` weights are (in, out) already. GPT-2 files written by the original release lack
the `transformer.` prefix; both spellings load. Buffers (`attn.bias`, `rotary_emb.inv_freq`)
and a tied head's copy are ignored. Weights are read lazily, one tensor at a time
(`Checkpoint.tensor`), so a model can be loaded block by block; they are computed in
float32 and written back in the checkpoint's dtype unless told otherwise.
"""

import json
import os
import shutil
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from lottery.llm import model
from lottery.llm.spec import ModelSpec, SpecError, from_config, to_config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "generation_config.json")
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
SHARD_BYTES = 2 * 1024 ** 3  # transformers' default shard size is 5 GB; 2 GB keeps RAM low


class CheckpointError(ValueError):
    """A model folder or hub name that cannot be read, with what to do about it."""


def locate(path: str | None = None, name: str | None = None, revision: str | None = None
           ) -> Path:
    """The model folder: `path` as given, or hub model `name` downloaded (config, weights,
    tokenizer only) into the Hugging Face cache."""
    if path:
        folder = Path(path).expanduser()
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"{folder} has no config.json; give a model folder in the "
                                  "Hugging Face layout (config.json, *.safetensors, "
                                  "tokenizer.json)")
        return folder
    if not name:
        raise CheckpointError("give model.path=DIR (a local model folder) or model.name=ID "
                              "(a Hugging Face hub name)")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(name, revision=revision,
                                      allow_patterns=["*.json", "*.safetensors",
                                                      "tokenizer.model", "*.txt"]))
    except Exception as error:  # noqa: BLE001  (offline, gated, unknown: one line each)
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        raise CheckpointError(
            f"cannot download {name!r} from the Hugging Face hub ({reason}). On a machine "
            f"that reaches the hub run `hf download {name} --local-dir DIR` (gated models "
            "need `hf auth login` first), copy DIR here and pass model.path=DIR") from None


def read_spec(folder: Path) -> ModelSpec:
    try:
        return from_config(json.loads((Path(folder) / "config.json").read_text()))
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read {folder}/config.json: {error}") from None
    except SpecError as error:
        raise CheckpointError(f"{folder}: {error}") from None


def hf_name(spec: ModelSpec, path: tuple) -> tuple[str, bool]:
    """The checkpoint name of a params path and whether its tensor is stored transposed."""
    *module, leaf = (str(p) for p in path)
    name = ".".join(module) + (".bias" if leaf == "bias" else ".weight")
    transposed = leaf == "kernel" and (spec.family != "gpt2" or module[-1] == "lm_head")
    return name, transposed


class Checkpoint:
    """A model folder's weights, read one tensor at a time (memory-mapped safetensors)."""

    def __init__(self, folder: Path):
        self.folder, self.spec = Path(folder), read_spec(folder)
        index = self.folder / INDEX
        if index.is_file():
            shards = json.loads(index.read_text())["weight_map"]
        elif (self.folder / SINGLE).is_file():
            with safe_open(self.folder / SINGLE, "numpy") as f:
                shards = {key: SINGLE for key in f.keys()}
        else:
            found = sorted(p.name for p in self.folder.iterdir())
            raise CheckpointError(f"{self.folder} has no {SINGLE} or {INDEX} (found: "
                                  f"{', '.join(found) or 'nothing'}); only safetensors "
                                  "weights are read (convert .bin files with transformers "
                                  "first)")
        self.where = shards  # tensor name -> file
        self._open = {}

    def _file(self, name: str):
        file = self.where[name]
        if file not in self._open:
            self._open[file] = safe_open(self.folder / file, "numpy")
        return self._open[file]

    def stored(self, name: str) -> str | None:
        """`name` as this file spells it (GPT-2 with or without `transformer.`), or None."""
        if name in self.where:
            return name
        bare = name.removeprefix("transformer.")
        return bare if bare in self.where else None

    def tensor(self, path: tuple, shape: tuple | None = None) -> np.ndarray:
        """The float32 array of params `path`, in our layout; `shape` (ours) is checked."""
        name, transposed = hf_name(self.spec, path)
        stored = self.stored(name)
        if stored is None:
            raise CheckpointError(f"{self.folder}: tensor {name} is missing from the "
                                  "checkpoint; is config.json the one of these weights?")
        value = self._file(stored).get_tensor(stored)
        expected = None if shape is None else tuple(shape[::-1] if transposed else shape)
        if expected is not None and value.shape != expected:
            raise CheckpointError(f"{self.folder}: {name} has shape {value.shape} in the "
                                  f"file, config.json implies {expected}")
        value = value.astype(np.float32)
        return value.T if transposed else value

    def params(self, tree: dict) -> dict:
        """`tree` (a params subtree of `model.shapes(spec)`, same paths) filled from the file,
        shapes checked."""
        return jax.tree_util.tree_map_with_path(
            lambda p, leaf: self.tensor(_keys(p), leaf.shape), tree)


def _keys(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)


def load(folder: Path) -> tuple[ModelSpec, dict]:
    """(spec, params) of a whole model, float32 NumPy arrays."""
    checkpoint = Checkpoint(folder)
    return checkpoint.spec, checkpoint.params(model.shapes(checkpoint.spec))


def load_block(checkpoint: Checkpoint, layer: int) -> dict:
    a, b = model.block_path(checkpoint.spec)
    tree = model.shapes(checkpoint.spec)[a][b][layer]
    prefixed = checkpoint.params({a: {b: {layer: tree}}})
    return prefixed[a][b][layer]


def load_outer(checkpoint: Checkpoint) -> dict:
    return checkpoint.params(model.outer(checkpoint.spec, model.shapes(checkpoint.spec)))


class Writer:
    """Writes a model folder tensor by tensor: shards of at most `shard_bytes`, then
    `model.safetensors.index.json` (or one `model.safetensors`), config.json and the
    tokenizer files of `source`. Tensors are stored in transformers' layout and names."""

    def __init__(self, folder: Path, spec: ModelSpec, dtype: str | None = None,
                 source: Path | None = None, shard_bytes: int = SHARD_BYTES):
        self.folder, self.spec = Path(folder), spec
        self.dtype = dtype or spec.dtype
        if self.dtype not in DTYPES:
            raise CheckpointError(f"cannot save in {self.dtype!r}; choose one of "
                                  f"{', '.join(DTYPES)}")
        self.source, self.shard_bytes = source, shard_bytes
        self.folder.mkdir(parents=True, exist_ok=True)
        self.pending, self.pending_bytes, self.files = {}, 0, []  # files: [(name, keys)]

    def add(self, tree: dict, prefix: tuple = ()) -> None:
        """Every leaf of `tree` (a params subtree at `prefix`)."""
        for path, value in jax.tree_util.tree_flatten_with_path(tree)[0]:
            name, transposed = hf_name(self.spec, prefix + _keys(path))
            value = np.asarray(value, np.float32)
            value = np.ascontiguousarray(value.T if transposed else value)
            self.pending[name] = value.astype(DTYPES[self.dtype])
            self.pending_bytes += self.pending[name].nbytes
            if self.pending_bytes >= self.shard_bytes:
                self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        name = f"part-{len(self.files):05d}.safetensors"
        save_file(self.pending, self.folder / name, metadata={"format": "pt"})
        self.files.append((name, tuple(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> Path:
        self._flush()
        if len(self.files) == 1:
            os.replace(self.folder / self.files[0][0], self.folder / SINGLE)
        else:
            count, weight_map = len(self.files), {}
            for i, (name, keys) in enumerate(self.files):
                final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
                os.replace(self.folder / name, self.folder / final)
                weight_map.update({key: final for key in keys})
            total = sum((self.folder / f).stat().st_size for f in set(weight_map.values()))
            (self.folder / INDEX).write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        config = to_config(self.spec, self.dtype)
        (self.folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if self.source is not None:
            for file in TOKENIZER_FILES:
                if (Path(self.source) / file).is_file():
                    shutil.copyfile(Path(self.source) / file, self.folder / file)
        return self.folder


def save(folder: Path, spec: ModelSpec, params: dict, source: Path | None = None,
         dtype: str | None = None, shard_bytes: int = SHARD_BYTES) -> Path:
    """A whole model written as transformers writes it (see `Writer`)."""
    writer = Writer(folder, spec, dtype, source, shard_bytes)
    writer.add(params)
    return writer.close()
