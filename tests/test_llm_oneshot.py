"""Layer-by-layer one-shot pruning of pretrained models (`lottery.llm.oneshot`) and the
`lottery llm` command.

Expected values come from other paths than the driver: the masks' counts from the
definition of each comparison group; the second block's Wanda masks from its inputs
computed in the test through the already-pruned first block; a model saved by `lottery
llm` checked against the logits transformers computed when it loaded the same files
(tests/fixtures/hf/pruned_llama/, made once with tests/fixtures/hf/reference_logits.py).
The per-rule numerics (SparseGPT against a NumPy port of fasterprune) are
tests/test_llm_rules.py's.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers

from lottery.llm import hf, model, oneshot, rules, text
from lottery.lm import corpus, gpt, train
from lottery.lm.export import export

FIXTURES = Path(__file__).parent / "fixtures" / "hf"


def calibration_windows(vocab: int = 300, samples: int = 8, length: int = 24, seed: int = 0):
    ids = np.random.default_rng(seed).integers(0, vocab, 5000).astype(np.int32)
    return text.calibration(ids, samples, length, seed)


def kernels(spec, params) -> dict:
    """{(layer, linear path): kernel} of every pruned linear layer."""
    out = {}
    for layer, block in model.blocks_of(spec, params).items():
        for linears in model.linear_inputs(spec).values():
            for path in linears:
                out[layer, path] = np.asarray(model.at(block, path)["kernel"])
    return out


def untouched(spec, before, after):
    """Every parameter but the blocks' linear kernels is unchanged."""
    def strip(params):
        flat = jax.tree_util.tree_flatten_with_path(params)[0]
        return {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat
                if "kernel" not in jax.tree_util.keystr(p) or "lm_head" in
                jax.tree_util.keystr(p)}
    a, b = strip(before), strip(after)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("method", oneshot.METHODS)
def test_every_linear_layer_loses_exactly_its_share(method):
    """On the Llama fixture (grouped-query attention: q, k, v of different widths)."""
    checkpoint = hf.Checkpoint(FIXTURES / "llama")
    spec, dense = hf.load(FIXTURES / "llama")
    for sparsity in ("0.5", "2:4"):
        pruned, rows = oneshot.prune(checkpoint, calibration_windows(), oneshot.Method(
            method, rules.parse_sparsity(sparsity), block=16), batch=4)
        untouched(spec, dense, pruned)
        assert len(rows) == spec.layers * sum(map(len, model.linear_inputs(spec).values()))
        for (layer, path), kernel in kernels(spec, pruned).items():
            zero = kernel == 0
            n_in, n_out = kernel.shape
            if sparsity == "2:4":  # exactly 2 of every 4 consecutive inputs, per output
                per_group = zero.T.reshape(n_out, n_in // 4, 4).sum(-1)
                assert (per_group == 2).all(), (layer, path)
            elif method == "magnitude":  # one comparison group: the layer
                assert zero.sum() == kernel.size // 2
            elif method == "wanda":  # one per output
                assert (zero.sum(0) == n_in // 2).all()
            else:  # one per block of 16 inputs
                blocks = zero.reshape(n_in // 16, 16, n_out).sum((1, 2))
                assert (blocks == 16 * n_out // 2).all()
        assert all(r["sparsity"] == 0.5 and r["relative_error"] > 0 for r in rows)


def test_sparsegpt_at_sparsity_zero_changes_nothing():
    checkpoint = hf.Checkpoint(FIXTURES / "qwen2")
    _, dense = hf.load(FIXTURES / "qwen2")
    pruned, rows = oneshot.prune(checkpoint, calibration_windows(),
                                 oneshot.Method("sparsegpt", rules.parse_sparsity(0.0)))
    jax.tree.map(np.testing.assert_array_equal, pruned, dense)
    assert all(r["error"] == 0 for r in rows)


def test_each_block_is_fitted_to_the_pruned_blocks_before_it():
    """Block 1's Wanda masks are those of its inputs through the *pruned* block 0, which
    differ from its inputs through the dense block 0."""
    checkpoint = hf.Checkpoint(FIXTURES / "gpt2")
    spec, dense = hf.load(FIXTURES / "gpt2")
    windows = calibration_windows()
    sparsity = rules.parse_sparsity(0.5)
    pruned, _ = oneshot.prune(checkpoint, windows, oneshot.Method("wanda", sparsity))
    x = model.embed(spec, model.outer(spec, dense), jnp.asarray(windows))
    through = {"pruned": model.block(spec, model.blocks_of(spec, pruned)[0], x),
               "dense": model.block(spec, model.blocks_of(spec, dense)[0], x)}
    kernel = model.blocks_of(spec, dense)[1]["mlp"]["c_fc"]["kernel"]
    got = model.blocks_of(spec, pruned)[1]["mlp"]["c_fc"]["kernel"] != 0
    masks = {}
    for which, inputs in through.items():
        _, captured = model.block(spec, model.blocks_of(spec, dense)[1], inputs, True)
        squares = np.square(np.asarray(captured["mlp_in"], np.float64)).sum((0, 1))
        score = np.abs(kernel) * np.sqrt(squares)[:, None]  # Wanda: per output, top half
        masks[which] = score >= np.median(score, axis=0, keepdims=True)
    np.testing.assert_array_equal(got, masks["pruned"])
    assert (masks["pruned"] != masks["dense"]).any()


def test_magnitude_needs_no_calibration_text():
    checkpoint = hf.Checkpoint(FIXTURES / "gpt2")
    pruned, rows = oneshot.prune(checkpoint, None,
                                 oneshot.Method("magnitude", rules.parse_sparsity("4:8")))
    assert "error" not in rows[0] and rows[0]["sparsity"] == 0.5
    with pytest.raises(ValueError, match="wanda needs calibration windows"):
        oneshot.prune(checkpoint, None, oneshot.Method("wanda", rules.parse_sparsity(0.5)))


def test_a_model_pruned_and_saved_by_us_gives_transformers_our_logits():
    """tests/fixtures/hf/pruned_llama/: the llama fixture pruned by `lottery llm` (SparseGPT,
    2:4) and saved; reference.npz holds the logits transformers computed from these files."""
    folder = FIXTURES / "pruned_llama"
    spec, params = hf.load(folder)
    ref = np.load(folder / "reference.npz")
    logits = np.asarray(model.apply(spec, params, jnp.asarray(ref["tokens"], jnp.int32)))
    assert np.abs(logits - ref["logits"]).max() <= 1e-4
    for kernel in kernels(spec, params).values():
        assert ((kernel == 0).T.reshape(kernel.shape[1], -1, 4).sum(-1) == 2).all()
    dense = np.load(FIXTURES / "llama" / "reference.npz")["logits"]
    assert np.abs(ref["logits"] - dense).max() > 0.1  # pruning changed the model


@pytest.fixture(scope="module")
def trained_byte_model(tmp_path_factory):
    """A 2-layer byte-level model of `lottery lm` trained 200 steps on the standard
    library's source, as a GPT-2 checkpoint, and calibration windows of its training text."""
    config = gpt.GPTConfig.uniform(2, 4, 64, context=32)
    data = corpus.load_corpus("stdlib", 300_000, 0.1)
    trainer = train.Trainer(config, train.optimizer(3e-3, 200, 20), jnp.asarray(data.train), 16)
    params = gpt.init(config, jax.random.key(0))
    params, _, _ = trainer.run(params, trainer.init(params), None, jax.random.key(1), 0, 200)
    folder = export(config, jax.device_get(params), tmp_path_factory.mktemp("byte") / "model")
    return folder, text.calibration(data.train.astype(np.int32), 32, 32, 0)


def layer_errors(folder, windows, sparsity) -> dict:
    """{(layer, linear): {method: relative reconstruction error, "spread": max / median of
    its input features' norms}}, every method on the same inputs (the dense model's
    activations)."""
    checkpoint = hf.Checkpoint(folder)
    spec = checkpoint.spec
    x = np.asarray(model.embed(spec, hf.load_outer(checkpoint), jnp.asarray(windows)))
    out = {}
    for layer in range(spec.layers):
        block = hf.load_block(checkpoint, layer)
        stats = oneshot.gather(spec, block, x, 8)
        for name, linears in model.linear_inputs(spec).items():
            norms = np.sqrt(np.asarray(stats[name].squares))
            for path in linears:
                kernel = jnp.asarray(model.at(block, path)["kernel"])
                out[layer, path] = {"spread": norms.max() / np.median(norms), "input": name}
                for method in oneshot.METHODS:
                    new, _ = oneshot.prune_linear(oneshot.Method(method, sparsity), kernel,
                                                  stats[name], jax.random.key(0))
                    out[layer, path][method] = oneshot.errors(
                        kernel, new, stats[name].gram)["relative_error"]
        x = np.asarray(model.block(spec, block, jnp.asarray(x)))
    return out


@pytest.mark.parametrize("sparsity", ["0.5", "2:4"])
def test_reconstruction_error_ordering_on_a_trained_model(trained_byte_model, sparsity):
    """SparseGPT's layer-wise error is the lowest on every linear layer. Wanda's is below
    magnitude's on the layers whose inputs are not a LayerNorm's output (the heads' outputs
    and the MLP's hidden units: their features' norms differ by more than 2x, max / median),
    Wanda's premise (|W|·‖X‖ weighs each weight by its input's norm; the paper's case is
    LLMs' outlier features). The layers fed by a LayerNorm of this small model see features
    within about 1.7x of each other, and there Wanda and magnitude come out close, in either
    order (at 50%, magnitude compared over the whole layer, Wanda per output), so no order
    is asserted for them."""
    folder, windows = trained_byte_model
    errors = layer_errors(folder, windows, rules.parse_sparsity(sparsity))
    for (layer, path), e in errors.items():
        assert e["sparsegpt"] < min(e["wanda"], e["magnitude"]), (layer, path, e)
        if e["input"] in ("attn_out", "mlp_hidden"):
            assert e["spread"] > 2 and e["wanda"] < e["magnitude"], (layer, path, e)


def run_cli(args: list[str], tmp_path):
    """The command in this process (`helpers.run_hydra_command`); its record's rows."""
    from lottery.llm import cli

    helpers.run_hydra_command(cli.main, args, tmp_path)
    records = list(tmp_path.glob("outputs/llm/*/*/record.jsonl"))
    assert len(records) == 1
    return [json.loads(line) for line in records[0].read_text().splitlines()]


def test_the_command_prunes_evaluates_records_and_saves(tmp_path):
    corpus_file = tmp_path / "text.txt"
    words = "the gardener pruned the old pear tree and the lottery of spring began".split()
    rng = np.random.default_rng(0)
    corpus_file.write_text(" ".join(rng.choice(words, 2000)))
    rows = run_cli([f"model.path={FIXTURES / 'llama'}", "prune.method=wanda",
                    "prune.sparsity=4:8", f"calibration.path={corpus_file}",
                    "calibration.samples=8", "calibration.length=32",
                    f"eval.path={corpus_file}", "eval.max_windows=4",
                    f"save={tmp_path / 'pruned'}", "save_dtype=bfloat16"], tmp_path)
    summaries = {r["branch"]: r for r in rows if r["kind"] == "summary"}
    assert set(summaries) == {"dense", "wanda"}
    assert summaries["wanda"]["sparsity"] == "4:8" and summaries["wanda"]["density"] == 0.5
    assert summaries["dense"]["windows"] == 4 and summaries["dense"]["tokens"] == 4 * 64
    layers = [r for r in rows if r["kind"] == "layer"]
    assert len(layers) == 2 * 7 and all(r["sparsity"] == 0.5 for r in layers)
    spec, params = hf.load(tmp_path / "pruned")
    assert json.loads((tmp_path / "pruned" / "config.json").read_text())["dtype"] == "bfloat16"
    evaluation = text.eval_windows(text.encode(tmp_path / "pruned", str(corpus_file)), 64, 4)
    from lottery.llm import perplexity

    again = perplexity.evaluate(spec, params, evaluation)["perplexity"]  # bf16 weights
    np.testing.assert_allclose(again, summaries["wanda"]["perplexity"], rtol=0.05)


@pytest.mark.parametrize("args, words", [
    (["prune.method=wanda"], "give model.path=DIR"),
    ([f"model.path={FIXTURES / 'gpt2'}", "prune.method=wanda"], "needs calibration text"),
    ([f"model.path={FIXTURES / 'gpt2'}", "prune.sparsity=3:2"], "neither a fraction"),
    ([f"model.path={FIXTURES / 'gpt2'}", "prune.method=obc"], "prune.method"),
    (["model.path=/nonexistent", "prune.method=magnitude"], "no config.json"),
])
def test_bad_requests_stop_with_one_line(args, words, tmp_path, monkeypatch, capsys):
    from lottery.llm import cli

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        cli.main(args)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and err[0].startswith("lottery llm: error")


def test_report_tabulates_and_plots_perplexity_by_method_and_sparsity(tmp_path):
    """Two runs of a sweep written by hand, each with the dense model's row: one table line
    per (model, method, sparsity), the dense line once (the mean of equal values), N:M after
    the fractions, and the plot."""
    from lottery.analysis.report import write_report

    def run(name, method, sparsity, ppl):
        folder = tmp_path / "sweep" / name
        folder.mkdir(parents=True)
        config = {"task": "llm", "name": "x", "prune": {"method": method, "sparsity": sparsity}}
        rows = [{"kind": "run", "name": "x", "config": config},
                {"kind": "summary", "level": 0, "branch": "dense", "replicate": 0,
                 "model": "/m/tiny", "sparsity": "0", "density": 1.0, "perplexity": 10.0},
                {"kind": "summary", "level": 0, "branch": method, "replicate": 0,
                 "model": "/m/tiny", "sparsity": sparsity, "density": 0.5,
                 "perplexity": ppl, "prune_seconds": 2.0, "rule_seconds": 0.5}]
        (folder / "record.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    run("a", "wanda", "2:4", 30.0)
    run("b", "magnitude", "0.5", 20.0)
    report, plot = write_report(tmp_path / "sweep")
    lines = [line for line in report.read_text().splitlines() if line.startswith("| tiny")]
    assert lines == ["| tiny | dense | 0 | 100.0% | 10.000 |  |  |",
                     "| tiny | magnitude | 0.5 | 50.0% | 20.000 | 2.0 | 0.5 |",
                     "| tiny | wanda | 2:4 | 50.0% | 30.000 | 2.0 | 0.5 |"]
    assert plot.name == "perplexity_vs_sparsity.png" and plot.stat().st_size > 0


def test_llm_presets_compose_and_validate():
    """Every `task: llm` preset is a valid `lottery llm` config (the model and text are the
    user's to fetch, so only the config is checked)."""
    import re

    from lottery.llm.cli import CONF_DIR, compose
    from lottery.llm.config import validate

    presets = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml")
                     if re.search(r"^task: llm\b", p.read_text(), re.MULTILINE))
    assert "wanda_llama2_7b" in presets
    for preset in presets:
        cfg = validate(compose([f"experiment={preset}"]))
        assert cfg.task == "llm" and cfg.calibration.samples == 128
