"""Pretrained checkpoints in the Hugging Face layout: our GPT-2 and Llama-family modules give
the reference implementation's logits, and what we save is what transformers writes.

The expected values are the reference's: tests/fixtures/hf/ holds tiny random models that
transformers (PyTorch) wrote, with its logits on fixed tokens and its tokenizer's ids on a
fixed text (tests/fixtures/hf/make_fixtures.py; CI needs neither torch nor network).
  gpt2   GPT-2, tied head, fused c_attn (Conv1D weights)
  llama  grouped-query attention (4 query / 2 key-value heads), untied head, llama3 RoPE
         scaling with 24 tokens > its original context of 16, three safetensors shards
  qwen2  q/k/v biases, grouped-query attention, tied head
"""

import json
import re
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

from lottery.llm import hf, model, text
from lottery.llm.spec import SpecError, from_config, rope_frequencies

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
MODELS = ("gpt2", "llama", "qwen2")


def reference(name: str):
    return np.load(FIXTURES / name / "reference.npz")


def stored_tensors(folder: Path) -> dict:
    """{name: (dtype, shape, values)} of every tensor in a folder's safetensors files."""
    out = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(file, "numpy") as f:
            for key in f.keys():
                value = f.get_tensor(key)
                out[key] = (str(value.dtype), value.shape, value)
    return out


@pytest.mark.parametrize("name", MODELS)
def test_logits_equal_the_reference_implementation(name):
    spec, params = hf.load(FIXTURES / name)
    ref = reference(name)
    logits = np.asarray(model.apply(spec, params, jnp.asarray(ref["tokens"], jnp.int32)))
    assert logits.shape == ref["logits"].shape
    assert np.abs(logits - ref["logits"]).max() <= 1e-4
    assert ref["logits"].std() > 1  # far from uniform: a wrong weight would show


@pytest.mark.parametrize("name", MODELS)
def test_block_by_block_gives_the_same_logits(name):
    """The pieces one-shot pruning runs (embed, each block with its own weights read alone
    from the file, head) compute the reference's logits too."""
    checkpoint = hf.Checkpoint(FIXTURES / name)
    spec, ref = checkpoint.spec, reference(name)
    outer = hf.load_outer(checkpoint)
    x = model.embed(spec, outer, jnp.asarray(ref["tokens"], jnp.int32))
    for layer in range(spec.layers):
        x = model.block(spec, hf.load_block(checkpoint, layer), x)
    logits = np.asarray(model.head(spec, outer, x))
    assert np.abs(logits - ref["logits"]).max() <= 1e-4


def test_the_fixtures_cover_what_they_claim():
    specs = {name: hf.read_spec(FIXTURES / name) for name in MODELS}
    llama, qwen, gpt2 = specs["llama"], specs["qwen2"], specs["gpt2"]
    assert llama.kv_heads < llama.heads and not llama.tied
    assert llama.scaling()["rope_type"] == "llama3"
    assert (FIXTURES / "llama" / hf.INDEX).is_file()
    assert len(list((FIXTURES / "llama").glob("*.safetensors"))) > 1
    assert qwen.qkv_bias and not qwen.out_bias and qwen.tied and qwen.kv_heads < qwen.heads
    assert gpt2.family == "gpt2" and gpt2.tied
    assert reference("llama")["tokens"].shape[1] > llama.scaling()[
        "original_max_position_embeddings"]


@pytest.mark.parametrize("name", MODELS)
def test_the_tokenizer_gives_the_reference_ids(name):
    ref = reference(name)
    ids = text.tokenizer(FIXTURES / name).encode(str(ref["text"])).ids
    np.testing.assert_array_equal(ids, ref["text_ids"])


@pytest.mark.parametrize("name", MODELS)
def test_saved_files_are_what_transformers_wrote(name, tmp_path):
    """Saving the loaded model writes the reference's tensor names, shapes, dtypes and
    values, its config.json (same keys and values) and its tokenizer files."""
    spec, params = hf.load(FIXTURES / name)
    out = hf.save(tmp_path / name, spec, params, source=FIXTURES / name)
    ours, theirs = stored_tensors(out), stored_tensors(FIXTURES / name)
    assert set(ours) == set(theirs)
    for key, (dtype, shape, values) in theirs.items():
        assert ours[key][:2] == (dtype, shape), key
        np.testing.assert_array_equal(ours[key][2], values, err_msg=key)
    config, original = (json.loads((folder / "config.json").read_text())
                        for folder in (out, FIXTURES / name))
    assert config == original
    assert (out / "tokenizer.json").read_bytes() == (FIXTURES / name /
                                                     "tokenizer.json").read_bytes()
    again_spec, again = hf.load(out)
    tokens = jnp.asarray(reference(name)["tokens"], jnp.int32)
    np.testing.assert_array_equal(model.apply(again_spec, again, tokens),
                                  model.apply(spec, params, tokens))


def test_sharded_saving_writes_an_index_and_loads_back(tmp_path):
    spec, params = hf.load(FIXTURES / "llama")
    out = hf.save(tmp_path / "sharded", spec, params, shard_bytes=40_000)
    index = json.loads((out / hf.INDEX).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files == sorted(p.name for p in out.glob("*.safetensors"))
    assert index["metadata"]["total_size"] == sum((out / f).stat().st_size for f in files)
    assert set(index["weight_map"]) == set(stored_tensors(FIXTURES / "llama"))
    _, again = hf.load(out)
    tokens = jnp.asarray(reference("llama")["tokens"], jnp.int32)
    assert np.abs(np.asarray(model.apply(spec, again, tokens))
                  - reference("llama")["logits"]).max() <= 1e-4


def test_bfloat16_saving_rounds_each_weight_once(tmp_path):
    import ml_dtypes

    spec, params = hf.load(FIXTURES / "qwen2")
    out = hf.save(tmp_path / "bf16", spec, params, dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"  # as written
    stored = stored_tensors(out)
    weight = stored["model.layers.0.mlp.down_proj.weight"]
    assert weight[0] == "bfloat16"
    expected = params["model"]["layers"][0]["mlp"]["down_proj"]["kernel"].T
    np.testing.assert_array_equal(weight[2], expected.astype(ml_dtypes.bfloat16))
    _, again = hf.load(out)  # read back as float32
    assert again["model"]["norm"]["scale"].dtype == np.float32


def test_gpt2_files_without_the_transformer_prefix_load(tmp_path):
    """The original GPT-2 release names its tensors `h.0.attn.c_attn.weight`, `wte.weight`."""
    from safetensors.numpy import save_file

    folder = tmp_path / "bare"
    shutil.copytree(FIXTURES / "gpt2", folder)
    tensors = {k.removeprefix("transformer."): v[2]
               for k, v in stored_tensors(FIXTURES / "gpt2").items()}
    assert "h.0.attn.c_attn.weight" in tensors
    (folder / "model.safetensors").unlink()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    spec, params = hf.load(folder)
    ref = reference("gpt2")
    logits = np.asarray(model.apply(spec, params, jnp.asarray(ref["tokens"], jnp.int32)))
    assert np.abs(logits - ref["logits"]).max() <= 1e-4


def llama_config(**changes) -> dict:
    config = json.loads((FIXTURES / "llama" / "config.json").read_text())
    config.update(changes)
    return config


def test_rope_scaling_types_follow_transformers_formulas():
    """By hand from transformers' modeling_rope_utils: linear divides every frequency by
    the factor; llama3 divides long wavelengths, keeps short ones, blends between; dynamic
    changes nothing within the context and raises the base beyond it."""
    base = rope_frequencies(from_config(llama_config(rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0})), 16)
    dim = 8
    np.testing.assert_allclose(base, 1 / 10000 ** (np.arange(0, dim, 2) / dim), rtol=1e-6)
    linear = from_config(llama_config(rope_parameters={"rope_type": "linear", "factor": 4.0}))
    np.testing.assert_allclose(rope_frequencies(linear, 16), base / 4, rtol=1e-6)
    llama3 = from_config(llama_config())  # factor 8, low 1, high 4, original context 16
    wavelength = 2 * np.pi / base  # 6.28, 62.8, 628, 6283; bounds 16/4 = 4 and 16/1 = 16
    assert 4 < wavelength[0] < 16 and all(wavelength[1:] > 16)
    got = rope_frequencies(llama3, 24)
    smooth = (16 / wavelength[0] - 1) / (4 - 1)  # the medium one: blended
    np.testing.assert_allclose(got[0], (1 - smooth) * base[0] / 8 + smooth * base[0],
                               rtol=1e-6)
    np.testing.assert_allclose(got[0], 0.57606, rtol=1e-4)  # transformers' own inv_freq
    np.testing.assert_allclose(got[1:], base[1:] / 8, rtol=1e-6)  # long: divided
    short = from_config(llama_config(rope_parameters={**llama_config()["rope_parameters"],
                                                      "high_freq_factor": 2.0}))
    np.testing.assert_allclose(rope_frequencies(short, 24)[0], base[0], rtol=1e-6)  # < 8
    dynamic = from_config(llama_config(rope_parameters={"rope_type": "dynamic", "factor": 2.0}))
    np.testing.assert_allclose(rope_frequencies(dynamic, 64), base, rtol=1e-6)
    longer_base = 10000 * (2 * 128 / 64 - 1) ** (dim / (dim - 2))
    np.testing.assert_allclose(rope_frequencies(dynamic, 128),
                               1 / longer_base ** (np.arange(0, dim, 2) / dim), rtol=1e-5)


def test_the_transformers_4_rope_layout_reads_the_same():
    """transformers 4 wrote `rope_theta` at the top and `rope_scaling` (with `type` or
    `rope_type`); transformers 5 writes both inside `rope_parameters`."""
    new = from_config(llama_config())
    parameters = llama_config()["rope_parameters"]
    old = {k: v for k, v in llama_config().items() if k != "rope_parameters"}
    scaling = {("type" if k == "rope_type" else k): v for k, v in parameters.items()
               if k != "rope_theta"}
    old = from_config({**old, "rope_theta": 10000.0, "rope_scaling": scaling})
    assert (old.rope_theta, old.rope_scaling) == (new.rope_theta, new.rope_scaling)
    assert new.scaling()["factor"] == 8.0


@pytest.mark.parametrize("config, words", [
    (llama_config(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "'yarn' is not"),
    (llama_config(hidden_act="gelu"), "hidden_act 'gelu'"),
    (llama_config(model_type="mamba"), "model_type 'mamba' is not implemented"),
    ({**json.loads((FIXTURES / "gpt2" / "config.json").read_text()),
      "scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
])
def test_options_not_implemented_are_refused_by_name(config, words):
    with pytest.raises(SpecError, match=words):
        from_config(config)


def test_unreadable_folders_say_what_to_do(tmp_path):
    with pytest.raises(hf.CheckpointError, match="no config.json"):
        hf.locate(str(tmp_path))
    folder = tmp_path / "weights_missing"
    folder.mkdir()
    shutil.copy(FIXTURES / "gpt2" / "config.json", folder)
    with pytest.raises(hf.CheckpointError, match="no model.safetensors"):
        hf.Checkpoint(folder)
    wrong = tmp_path / "wrong_config"
    shutil.copytree(FIXTURES / "gpt2", wrong)
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "n_inner": 64}))
    with pytest.raises(hf.CheckpointError, match=r"mlp\.c_fc\.(weight|bias) has shape"):
        hf.load(wrong)


def test_an_unreachable_hub_names_the_local_alternative(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # no connection is tried
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(hf.CheckpointError, match="model.path=DIR"):
        hf.locate(name="meta-llama/Llama-2-7b-hf")


def test_a_sequence_longer_than_the_context_is_refused():
    """GPT-2's position table would give NaN logits past its 64 positions."""
    spec, params = hf.load(FIXTURES / "gpt2")
    with pytest.raises(ValueError, match="65 tokens exceed the model's context of 64"):
        model.apply(spec, params, jnp.zeros((1, 65), jnp.int32))
    with pytest.raises(ValueError, match="exceed the model's context"):
        model.embed(spec, model.outer(spec, params), jnp.zeros((1, 65), jnp.int32))


@pytest.mark.parametrize("name, tensor", [("qwen2", "model.embed_tokens.weight"),
                                          ("llama", "lm_head.weight")])
def test_a_shape_mismatch_names_the_shapes_as_the_file_stores_them(name, tensor, tmp_path):
    """One vocabulary entry too many in config.json: the (tied) embedding, stored as we
    hold it, and the untied head, stored transposed, are both named in the file's layout,
    (vocab, d) (the message once reversed the untransposed one)."""
    wrong = tmp_path / "wrong_vocab"
    shutil.copytree(FIXTURES / name, wrong)
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "vocab_size": 301}))
    with pytest.raises(hf.CheckpointError, match=re.escape(
            f"{tensor} has shape (300, 32) in the file, config.json implies (301, 32)")):
        hf.load(wrong)
