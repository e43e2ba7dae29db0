"""Text for pretrained models: windows, perplexity, and the byte-level model as GPT-2.

Expected values: hand-cut windows; perplexity from the reference implementation's logits
(tests/fixtures/hf, written by transformers) with NumPy, by the formula of Wanda's
`eval_ppl_wikitext` (lib/eval.py: nll = loss · seqlen per window, ppl = exp(Σ nll / (N ·
seqlen))); the byte model's logits from `lottery.lm.gpt`, a separate implementation.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lottery.llm import hf, model, perplexity, text
from lottery.lm import gpt
from lottery.lm.export import byte_tokenizer, export

FIXTURES = Path(__file__).parent / "fixtures" / "hf"


def test_evaluation_windows_are_consecutive_and_drop_the_tail():
    ids = np.arange(11)
    np.testing.assert_array_equal(text.eval_windows(ids, 3), [[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    np.testing.assert_array_equal(text.eval_windows(ids, 3, limit=2), [[0, 1, 2], [3, 4, 5]])
    with pytest.raises(text.TextError, match="cannot fill one evaluation window of 12"):
        text.eval_windows(ids, 12)


def test_calibration_windows_are_seeded_slices_of_the_text():
    ids = np.arange(1000) * 7
    windows = text.calibration(ids, 16, 20, seed=3)
    assert windows.shape == (16, 20)
    starts = windows[:, 0] // 7
    np.testing.assert_array_equal(windows, ids[starts[:, None] + np.arange(20)])
    assert len(set(starts)) > 10  # spread over the text
    np.testing.assert_array_equal(windows, text.calibration(ids, 16, 20, seed=3))
    assert not np.array_equal(windows, text.calibration(ids, 16, 20, seed=4))
    with pytest.raises(text.TextError, match="calibration window of 1000"):
        text.calibration(ids, 1, 1000)


def test_perplexity_is_the_mean_window_loss_of_the_reference_logits():
    spec, params = hf.load(FIXTURES / "llama")
    ref = np.load(FIXTURES / "llama" / "reference.npz")
    windows, logits = ref["tokens"], ref["logits"].astype(np.float64)
    seqlen = windows.shape[1]
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs[:, :-1], windows[:, 1:, None], -1)[..., 0]
    expected = np.exp((nll.mean(1) * seqlen).sum() / (len(windows) * seqlen))
    got = perplexity.evaluate(spec, params, windows, batch=3)  # a padded last batch
    assert got["windows"] == 2 and got["tokens"] == 48
    np.testing.assert_allclose(got["perplexity"], expected, rtol=1e-5)


def test_text_sources_say_what_to_give(tmp_path):
    file = tmp_path / "a.txt"
    file.write_text("héllo")
    assert text.read_text(str(file)) == "héllo"
    with pytest.raises(text.TextError, match="not a file"):
        text.read_text(str(tmp_path / "missing.txt"))
    with pytest.raises(text.TextError, match="no tokenizer.json"):
        text.tokenizer(tmp_path)


def test_the_byte_tokenizer_gives_the_utf8_bytes():
    sample = "déjà vu\n\tüber 100% – ok\x00\xff"
    ids = byte_tokenizer().encode(sample).ids
    assert ids == list(sample.encode("utf-8"))
    assert byte_tokenizer().decode(ids) == sample


def test_a_byte_level_lm_model_exports_to_gpt2_exactly(tmp_path):
    config = gpt.GPTConfig.uniform(2, 4, 32, context=16)
    params = gpt.init(config, jax.random.key(0))  # then made far from uniform:
    noise = jax.random.normal(jax.random.key(1), (gpt.param_count(config),))
    leaves, tree = jax.tree.flatten(params)
    sizes = np.cumsum([0] + [x.size for x in leaves])
    params = jax.tree.unflatten(tree, [x + 0.3 * noise[a:b].reshape(x.shape)
                                       for x, a, b in zip(leaves, sizes[:-1], sizes[1:])])
    folder = export(config, params, tmp_path / "bytes")
    spec, loaded = hf.load(folder)
    assert (spec.family, spec.vocab, spec.ffn, spec.tied) == ("gpt2", 256, 128, True)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16)), jnp.int32)
    expected = np.asarray(gpt.apply(config, params, tokens))
    assert expected.std() > 1
    np.testing.assert_allclose(model.apply(spec, loaded, tokens), expected, atol=1e-4)
    assert text.tokenizer(folder).encode("ab").ids == [97, 98]
    compacted = gpt.GPTConfig(256, 16, 32, 8, (4, 2), (128, 128))
    with pytest.raises(ValueError, match="every layer the same size"):
        export(compacted, gpt.init(compacted, jax.random.key(0)), tmp_path / "no")


def test_json_lines_files_give_their_documents_text(tmp_path):
    """C4's shards are gzipped JSON lines with a "text" field per document."""
    import gzip
    import json

    docs = [{"text": "first doc", "url": "a"}, {"text": "second\nline", "url": "b"},
            {"text": "third", "url": "c"}]
    file = tmp_path / "c4-train.00000-of-01024.json.gz"
    with gzip.open(file, "wt", encoding="utf-8") as out:
        out.write("".join(json.dumps(d) + "\n" for d in docs) + "\n")
    assert text.read_text(str(file)) == "first doc\n\nsecond\nline\n\nthird"
    assert text.read_text(str(file), max_chars=12) == "first doc\n\ns"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(text.TextError, match="bad.jsonl:2 is not a JSON object"):
        text.read_text(str(bad))
