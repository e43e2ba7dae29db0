"""`lottery lm model.path=DIR`: the structured budget loop on a pretrained model
(lottery/llm/budget.py), on the tiny transformers-written fixtures (tests/fixtures/hf/).

Expected values from other paths than the code under test: parameter counts by hand from
the sizes; the evaluation loss as the mean cross entropy of the model's logits (which
test_llm_checkpoints checks against transformers') computed here with NumPy; the first
fine-tuning step against Adam's first step by hand (-lr * sign of the gradient of a
cross entropy written here); int8 scales by their formula; the removal counts by hand.
"""

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers

from lottery import identity
from lottery.analysis.report import write_report
from lottery.llm import budget as llm_budget
from lottery.llm import compact, hf, model
from lottery.lm import budget, corpus, quantize, train
from lottery.lm import cli as lm_cli
from lottery.lm.config import ConfigError, validate
from lottery.lm.table import lm_summary, metric_of
from lottery.record import load

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
LLAMA = FIXTURES / "llama"  # d 32, 2 layers, 4 query heads in 2 groups of head_dim 8, FFN 64,
#                             vocab 300, untied, context 64
QUICK = ["data.max_bytes=60000", "data.eval_windows=6", "model.context=16",
         "finetune.batch_size=4", "prune.score_batches=1", "measure.batch=2",
         "measure.repeats=1"]


def config(*overrides, name: str = "llama"):
    return validate(lm_cli.compose([f"model.path={FIXTURES / name}", *QUICK, *overrides]))


def hand_count(name: str, layers: int, groups: int, ffn: int) -> int:
    """Parameters by hand: vocab 300, d 32, head_dim 8, 2 query heads per group (Llama,
    Qwen2); GPT-2: 4 heads of 8, 64 positions."""
    v, d = 300, 32
    if name == "gpt2":  # wte, wpe, ln_f; per layer ln_1, ln_2, c_attn, attn.c_proj, c_fc,
        #                 mlp.c_proj with their biases
        return v * d + 64 * d + 2 * d + layers * (
            4 * d + d * 3 * d + 3 * d + d * d + d + d * ffn + ffn + ffn * d + d)
    q, kv = 2 * groups * 8, groups * 8
    embeddings = (2 if name == "llama" else 1) * v * d + d  # untied head (llama), final norm
    biases = q + 2 * kv if name == "qwen2" else 0
    return embeddings + layers * (2 * d + d * (q + 2 * kv) + biases + q * d + 3 * d * ffn)


@pytest.mark.parametrize("name", ("llama", "qwen2", "gpt2"))
@pytest.mark.parametrize("counts", ((2, 64, 0), (1, 40, 0), (1, 1, 1)))
def test_parameter_counts_by_hand(name, counts):
    spec = hf.read_spec(FIXTURES / name)
    groups = counts[0] if name != "gpt2" else spec.kv_heads  # GPT-2 keeps its heads
    counts = (groups, *counts[1:])
    assert model.param_count(compact.resized(spec, *counts)) == hand_count(
        name, 2 - counts[2], groups, counts[1])


def test_a_round_removes_the_fraction_of_each_kind_and_keeps_one_of_each():
    spec = hf.read_spec(LLAMA)  # 2 groups, 64 channels, 2 layers
    every = ("heads", "ffn", "layers")
    # round(0.2 * 2) = 0 -> at least 1; round(0.2 * 64) = 13; layers: 1
    assert llm_budget.removal(spec, every, 0.2) == (1, 51, 1)
    # round(0.9 * 2) = 2 -> 1 (one group stays); round(0.9 * 64) = 58; layers: 1 stays
    assert llm_budget.removal(spec, every, 0.9) == (1, 6, 1)
    assert llm_budget.removal(spec, ("ffn",), 0.5) == (2, 32, 0)
    assert llm_budget.removal(spec, every, 0.9, scale=0.0) == (2, 64, 0)
    assert llm_budget.removal(spec, ("ffn",), 0.5, scale=0.5) == (2, 48, 0)


@pytest.mark.parametrize("name, structures", (("llama", ("heads", "ffn")),
                                              ("gpt2", ("ffn", "layers"))))
def test_a_round_crossing_a_budget_lands_on_it(name, structures):
    """Against a brute-force search with hand counts: the round's removal at the largest
    scale (of a fine grid) whose model is still over the target, then as many FFN channels
    per layer as fit under it; where even one channel per layer is over, the removal at the
    smallest scale that fits. A target the whole round does not reach: the whole round."""
    spec = hf.read_spec(FIXTURES / name)
    full = llm_budget.removal(spec, structures, 0.5)

    def count(counts):
        return hand_count(name, 2 - counts[2], counts[0], counts[1])

    trials = [llm_budget.removal(spec, structures, 0.5, s) for s in np.linspace(0, 1, 10001)]
    for target in np.linspace(count(full) + 1, count(trials[0]) - 1, 9):
        over = [t for t in trials if count(t) > target]
        groups, channels, dropped = over[-1]
        fitting = [c for c in range(1, channels + 1) if count((groups, c, dropped)) <= target]
        expected = ((groups, fitting[-1], dropped) if fitting
                    else next(t for t in trials if count(t) <= target))
        assert llm_budget.to_target(spec, structures, 0.5, target) == expected
        assert count(expected) <= target
    assert llm_budget.to_target(spec, structures, 0.5, count(full) - 1) == full


# -- the pieces the loop runs ---------------------------------------------------------------

def windows(seed: int, count: int, length: int) -> tuple:
    ids = np.random.default_rng(seed).integers(0, 300, count * length + 1).astype(np.int32)
    return corpus.windows(ids, length)


@pytest.fixture(scope="module")
def llama():
    cfg = config("budget.params_fraction=0.8")
    val, test = windows(0, 5, 16), windows(1, 3, 16)  # fewer than a batch: padded
    train_ids = np.random.default_rng(2).integers(0, 300, 4000).astype(np.int32)
    data = budget.Data(jnp.asarray(train_ids), *(jax.device_put(train.eval_split(*split))
                                                 for split in (val, test)), "random ids")
    run = llm_budget.PretrainedBudgetRun(cfg, Path("unused"), data)
    params = jax.tree.map(jnp.asarray, hf.load(LLAMA)[1])
    return SimpleNamespace(cfg=cfg, run=run, spec=run.spec, params=params, val=val,
                           test=test, train=train_ids)


def numpy_loss(spec, params, inputs, targets) -> tuple[float, float]:
    logits = np.asarray(model.apply(spec, params, jnp.asarray(inputs)), np.float64)
    logits -= logits.max(-1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_p, targets[..., None], -1)[..., 0]
    return float(nll.mean()), float((logits.argmax(-1) == targets).mean())


def test_evaluation_is_the_mean_cross_entropy_of_the_models_logits(llama):
    values = llama.run.evaluate(llama.spec, llama.params)
    for prefix, split in (("val_", llama.val), ("test_", llama.test)):
        loss, accuracy = numpy_loss(llama.spec, llama.params, *split)
        assert values[f"{prefix}loss"] == pytest.approx(loss, rel=1e-5)
        assert values[f"{prefix}accuracy"] == pytest.approx(accuracy)
    assert values["perplexity"] == pytest.approx(np.exp(values["test_loss"]))
    assert values["val_perplexity"] == pytest.approx(np.exp(values["val_loss"]))


def test_the_first_fine_tuning_step_is_adams_on_the_cross_entropy(llama):
    """Adam's first step from a fresh state moves each weight by -lr * g / (|g| + eps): by
    -lr * sign(g) where |g| >> eps (gradient clipping scales g, never its sign)."""
    phase = replace(llama.cfg.finetune, lr=1e-3, warmup=0, steps=10)
    trainer = llama.run.trainer(llama.spec, phase)
    key = jax.random.key(3)
    x, y = corpus.sample_batch(trainer.data, jax.random.fold_in(key, 0), 4, 16)

    def cross_entropy(params):
        logits = model.apply(llama.spec, params, x)
        log_p = jax.nn.log_softmax(logits, -1)
        return -jnp.take_along_axis(log_p, y[..., None], -1).mean()

    loss, grads = jax.value_and_grad(cross_entropy)(llama.params)
    new, _, trained_loss = trainer.run(llama.params, trainer.init(llama.params), None, key,
                                       0, 1)
    assert float(trained_loss) == pytest.approx(float(loss), rel=1e-5)
    for g, before, after in zip(*(jax.tree.leaves(t) for t in (grads, llama.params, new))):
        g, moved = np.asarray(g), np.asarray(after) - np.asarray(before)
        big = np.abs(g) > 1e-4
        assert big.any()
        np.testing.assert_allclose(moved[big], -1e-3 * np.sign(g[big]), rtol=1e-2)


def test_distillation_is_the_tempered_kl_from_the_checkpoints_logits(llama):
    """alpha = 1: the training loss is T^2 * KL(softmax(teacher / T) || softmax(student / T)),
    mean over tokens, by hand in NumPy, the teacher being the checkpoint and the student a
    perturbed copy of it."""
    student = jax.tree.map(lambda w: w * 1.1, llama.params)
    temperature = llama.cfg.finetune.kd_temperature
    trainer = llama.run.trainer(llama.spec, llama.cfg.finetune,
                                teacher=(llama.spec, llama.params), alpha=1.0)
    key = jax.random.key(4)
    x, _ = corpus.sample_batch(trainer.data, jax.random.fold_in(key, 0), 4, 16)

    def log_softmax(params):
        z = np.asarray(model.apply(llama.spec, params, x), np.float64) / temperature
        z -= z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    teacher, pupil = log_softmax(llama.params), log_softmax(student)
    expected = temperature ** 2 * (np.exp(teacher) * (teacher - pupil)).sum(-1).mean()
    _, _, loss = trainer.run(student, trainer.init(student), None, key, 0, 1)
    assert expected > 0.01 and float(loss) == pytest.approx(expected, rel=1e-4)


def test_int8_scales_per_output_channel_of_a_pretrained_model(llama):
    q = quantize.quantize(llama.params).params
    layer = q["model"]["layers"][0]
    kernel = np.asarray(llama.params["model"]["layers"][0]["self_attn"]["q_proj"]["kernel"])
    np.testing.assert_allclose(layer["self_attn"]["q_proj"]["kernel"].scale,
                               np.abs(kernel).max(0, keepdims=True) / 127, rtol=1e-6)
    embedding = np.asarray(llama.params["model"]["embed_tokens"]["embedding"])
    np.testing.assert_allclose(q["model"]["embed_tokens"]["embedding"].scale,
                               np.abs(embedding).max(1, keepdims=True) / 127, rtol=1e-6)
    assert not isinstance(q["model"]["norm"]["scale"], quantize.QTensor)
    for name, leaf in (("kernel", kernel), ("embedding", embedding)):
        path = (["model", "layers", 0, "self_attn", "q_proj", "kernel"] if name == "kernel"
                else ["model", "embed_tokens", "embedding"])
        t = q
        for key in path:
            t = t[key]
        error = np.abs(np.asarray(t.values, np.float32) * np.asarray(t.scale) - leaf)
        assert (error <= np.asarray(t.scale) / 2 + 1e-7).all()


# -- the loop end to end --------------------------------------------------------------------

@pytest.fixture(scope="module")
def looped(tmp_path_factory):
    """The command (`lottery lm model.path=...`, in this process): two targets, heads and
    FFN channels, distilled, two fine-tuning steps a round."""
    top = tmp_path_factory.mktemp("pretrained")
    args = [f"model.path={LLAMA}", *QUICK, "budget.params_fraction=[0.85,0.7]",
            "prune.fraction=0.5", "variants=[prune_kd]", "finetune.steps=2",
            "finetune.eval_every=1", f"save={top / 'saved'}"]
    helpers.run_hydra_command(lm_cli.main, [*args, f"hydra.run.dir={top / 'run'}"], top)
    return SimpleNamespace(cfg=validate(lm_cli.compose(args)), out=top / "run", top=top,
                           summaries=load(top / "run", kind="summary"))


def test_the_loop_stops_under_the_last_target_with_hand_counted_sizes(looped):
    rows = looped.summaries.to_dict("records")
    dense = hand_count("llama", 2, 2, 64)
    assert rows[0]["branch"] == "dense" and rows[0]["params"] == dense
    assert rows[0]["final_step"] == 0 and rows[0]["density"] == 1
    targets = [0.85 * dense, 0.7 * dense]
    met = []
    for previous, row in zip(rows, rows[1:]):
        assert row["branch"] == "prune_kd"
        groups, layers = int(row["kv_heads"]), int(row["layers"])  # (float columns)
        assert row["heads"] == [2 * groups] * layers
        assert row["params"] == hand_count("llama", layers, groups, row["ffn"][0])
        assert row["density"] == pytest.approx(row["params"] / dense)
        assert row["params"] < previous["params"]
        assert row["final_step"] == row["level"] * 2
        for target in row.get("budget_targets") or []:
            assert row["params"] <= target < previous["params"]
            met.append(target)
    assert met == pytest.approx(targets)
    assert rows[-1]["params"] <= targets[1] < rows[-2]["params"]  # stopped there


def test_the_models_that_meet_a_target_are_quantized_and_saved(looped):
    for row in looped.summaries.to_dict("records")[1:]:
        if not isinstance(row.get("budget_targets"), list):
            assert "saved" not in row or not isinstance(row["saved"], str)
            continue
        assert row["quantized_bytes"] < row["bytes"] / 3
        saved = Path(row["saved"])
        assert saved == looped.top / "saved" / "prune_kd" / f"round-{row['level']}"
        config = json.loads((saved / "config.json").read_text())
        assert (config["num_hidden_layers"], config["num_key_value_heads"],
                config["intermediate_size"]) == (row["layers"], row["kv_heads"], row["ffn"][0])
        assert (saved / "tokenizer.json").is_file()
        spec, params = hf.load(saved)
        assert model.param_count(spec) == row["params"]
        run = llm_budget.PretrainedBudgetRun(looped.cfg, looped.out)  # the run's windows
        assert run.evaluate(spec, params)["perplexity"] == pytest.approx(
            row["final_perplexity"], rel=1e-5)


def test_the_record_table_and_report_speak_perplexity(looped, capsys):
    evals = load(looped.out, kind="eval")
    assert (evals["branch"] == "dense").sum() == 1
    rounds = evals[evals["branch"] == "prune_kd"]
    assert sorted(set(rounds["step"] % 2)) == [0, 1] and rounds["perplexity"].notna().all()
    assert metric_of(looped.summaries) == "perplexity"
    table = lm_summary(looped.summaries, "final")
    assert table["perplexity"].tolist() == pytest.approx(
        looped.summaries["final_perplexity"].tolist())
    lm_cli.print_table(looped.summaries)
    printed = capsys.readouterr().out
    assert "test perplexity, lower is better" in printed and "bits/byte" not in printed
    written = {p.name for p in write_report(looped.out)}
    assert {"report.md", "perplexity_vs_density.png"} <= written
    assert "early-stop test perplexity" in (looped.out / "report.md").read_text()


def test_an_exported_byte_model_scores_as_the_byte_models_loop_scores_it(tmp_path):
    """The byte model written as a GPT-2 checkpoint (`lottery.lm.export`, a byte tokenizer:
    id = byte) and run through the pretrained loop's data and evaluation gives the byte
    loop's windows and losses on the same ASCII text: the two paths agree end to end."""
    from lottery.lm import gpt
    from lottery.lm.export import export

    source = tmp_path / "text.txt"
    words = np.random.default_rng(0).choice(["def", "return", "x", "=", "(", ")", "\n"], 9000)
    source.write_text(" ".join(words))
    common = [f"data.source={source}", "data.max_bytes=100000", "data.eval_windows=7",
              "model.layers=2", "model.d_model=32", "model.heads=4", "model.ffn=64",
              "model.context=24", "budget.params_fraction=0.9", "prune.structures=[ffn]"]
    byte_cfg = validate(lm_cli.compose(common))
    params = gpt.init(byte_cfg.dense_model, jax.random.key(0))
    folder = export(byte_cfg.dense_model, jax.device_get(params), tmp_path / "model")
    pre_cfg = validate(lm_cli.compose([*common, f"model.path={folder}"]))
    byte_run = budget.BudgetRun(byte_cfg, tmp_path / "byte")
    pre_run = llm_budget.PretrainedBudgetRun(pre_cfg, tmp_path / "pretrained")
    np.testing.assert_array_equal(byte_run.data.train, pre_run.data.train)
    for a, b in ((byte_run.data.val, pre_run.data.val), (byte_run.data.test, pre_run.data.test)):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(x, y)
    byte_values = byte_run.evaluate(byte_cfg.dense_model, params)
    pre_values = pre_run.evaluate(pre_run.spec, hf.load(folder)[1])
    for key in ("val_loss", "test_loss", "val_accuracy", "test_accuracy", "perplexity"):
        assert pre_values[key] == pytest.approx(byte_values[key], rel=1e-5)
    # GPT-2 has output biases (attn.c_proj, mlp.c_proj: d each per layer), zero here
    assert pre_run.dense_params == gpt.param_count(byte_cfg.dense_model) + 2 * 2 * 32


# -- requests it cannot take ----------------------------------------------------------------

@pytest.mark.parametrize("overrides, name, message", [
    (["model.layers=3"], "llama", r"model.layers=3 differs from the pretrained model's 2 "
                                  r"\(its config.json\); leave model.layers out"),
    ([], "gpt2", "GPT-2 cannot lose attention heads"),
    (["model.context=65"], "llama", "model.context=65 exceeds the pretrained model's context "
                                    "of 64 tokens"),
    (["prune.remove={layers:[0]}"], "llama", "prune.remove is for the byte model"),
    (["budget.params_fraction=0.1"], "llama", r"cannot be reached by pruning heads\+ffn"),
])
def test_bad_requests_are_one_line(overrides, name, message):
    with pytest.raises(ConfigError, match=message):
        config(*overrides, name=name)


def test_a_preset_may_say_the_checkpoints_own_sizes():
    cfg = config("model.layers=2", "model.d_model=32", "model.heads=4", "model.ffn=64",
                 "budget.params_fraction=0.8")
    assert (cfg.model.layers, cfg.model.d_model, cfg.dense_model.layers) == (2, 32, 2)


def test_a_folder_without_config_json_and_save_without_a_pretrained_model(tmp_path):
    with pytest.raises(ConfigError, match="has no config.json"):
        validate(lm_cli.compose([f"model.path={tmp_path}"]))
    with pytest.raises(ConfigError, match="save is for a pretrained model"):
        validate(lm_cli.compose([f"save={tmp_path}"]))


def test_a_hub_model_that_cannot_be_downloaded_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = validate(lm_cli.compose(["model.name=nobody/no-such-model"]))
    assert cfg.dense_model is None  # read when the run fetches it
    with pytest.raises(ConfigError, match=r"cannot download 'nobody/no-such-model'.*"
                                          r"hf download nobody/no-such-model"):
        llm_budget.PretrainedBudgetRun(cfg, Path("unused"))


def test_a_hub_models_budget_is_checked_once_it_is_fetched(monkeypatch, tmp_path):
    """model.name: the config cannot read the model before the run fetches it; the run then
    computes the targets (and refuses what the checkpoint cannot take) as for model.path."""
    monkeypatch.setattr(hf, "locate", lambda path, name, revision: LLAMA)
    args = ["model.name=someone/tiny-llama", *QUICK]
    cfg = validate(lm_cli.compose([*args, "budget.params_fraction=0.8"]))
    assert cfg.targets == () and cfg.dense_model is None
    run = llm_budget.PretrainedBudgetRun(cfg, tmp_path)
    assert run.cfg.targets == (0.8 * hand_count("llama", 2, 2, 64),)
    assert run.spec == hf.read_spec(LLAMA)
    too_far = validate(lm_cli.compose([*args, "budget.params_fraction=0.1"]))
    with pytest.raises(ConfigError, match="cannot be reached by pruning"):
        llm_budget.PretrainedBudgetRun(too_far, tmp_path)


def test_a_latency_budget_the_checkpoint_meets_is_refused_before_any_record(tmp_path):
    cfg = config("budget.params_fraction=null", "budget.min_tokens_per_second=1")
    assert cfg.budget_kind == "tokens_per_second" and cfg.targets == (1.0,)
    with pytest.raises(ConfigError, match="already met by the dense model"):
        llm_budget.run(cfg, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_the_byte_models_run_ids_are_unchanged_by_the_new_keys():
    """The keys added for pretrained models count only when set, so every byte-model run
    keeps the id it had before they existed."""
    resolved = validate(lm_cli.compose([])).resolved
    before = {**resolved, "model": {k: v for k, v in resolved["model"].items()
                                    if k not in ("path", "name", "revision")}}
    before.pop("save")
    assert identity.run_id(resolved) == identity.run_id(before)
    pretrained = config("budget.params_fraction=0.8").resolved
    assert identity.run_id(pretrained) != identity.run_id(
        {**pretrained, "model": {**pretrained["model"], "path": None}})
