"""The transformer prune-to-budget workflow (issue 7): distillation, structure scores against
hand computations, one pruning round's choices, the budget loop (stops at the first round
under budget) with its record, controls and int8 results, and one clear error line for each
bad `lottery lm` request (in process and through `python -m lottery.cli lm`).

Tiny models only; the end-to-end run is the `lm_tiny` preset, shortened further.
"""

import contextlib
import io
import subprocess
import sys
import zlib
from dataclasses import replace
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import helpers

from lottery.analysis.plots import summary_figures
from lottery.lm import baselines, budget, compact, corpus, gpt, prune, scores, train
from lottery.lm import cli as lm_cli
from lottery.lm.config import LMConfig, validate
from lottery.options import ConfigError
from lottery.record import load, summary_table, wandb_summary

CONFIG = gpt.GPTConfig(vocab=256, context=8, d_model=8, head_dim=4, heads=(2, 3), ffn=(6, 5))


@pytest.fixture(scope="module")
def params():
    return helpers.random_gpt_params(CONFIG, std=0.3, seed=0)


@pytest.fixture(scope="module")
def batches():
    rng = np.random.default_rng(1)
    return [(jnp.asarray(rng.integers(0, 256, (3, 8))), jnp.asarray(rng.integers(0, 256, (3, 8))))
            for _ in range(2)]


def test_kd_loss_is_zero_for_the_teacher_and_the_scaled_kl_otherwise():
    rng = np.random.default_rng(2)
    teacher = jnp.asarray(rng.standard_normal((2, 5, 7)), jnp.float32)
    for temperature in (1.0, 2.5):
        assert float(train.kd_loss(teacher, teacher, temperature)) == 0.0
    student = jnp.asarray(rng.standard_normal((2, 5, 7)), jnp.float32)
    t = 2.0
    p = np.exp(np.asarray(teacher, np.float64) / t)
    p /= p.sum(-1, keepdims=True)
    q = np.exp(np.asarray(student, np.float64) / t)
    q /= q.sum(-1, keepdims=True)
    expected = t ** 2 * np.mean(np.sum(p * (np.log(p) - np.log(q)), -1))
    assert float(train.kd_loss(student, teacher, t)) == pytest.approx(expected, rel=1e-5)


def test_objective_mixes_distillation_and_the_lm_loss(params, batches):
    x, y = batches[0]
    objective = jax.jit(train.objective, static_argnums=0)  # one program: a teacher given
    logits = jax.jit(gpt.apply, static_argnums=0)(CONFIG, params, x)
    lm = float(optax.softmax_cross_entropy_with_integer_labels(logits, y).mean())
    assert float(objective(CONFIG, params, x, y, None, logits, 1.0, 2.0)) == pytest.approx(
        0.0, abs=1e-6)  # student = teacher: only float rounding between two programs
    assert float(objective(CONFIG, params, x, y, None, logits, 0.0, 2.0)) == pytest.approx(
        lm, rel=1e-5)
    other = logits + jnp.asarray(np.random.default_rng(3).standard_normal(logits.shape))
    mixed = float(objective(CONFIG, params, x, y, None, other, 0.25, 2.0))
    assert mixed == pytest.approx(0.75 * lm + 0.25 * float(train.kd_loss(logits, other, 2.0)),
                                  rel=1e-4)


def test_weight_scores_by_hand(params):
    got = scores.scores("weight", CONFIG, params)
    for layer in range(CONFIG.layers):
        a = jax.tree.map(np.asarray, params["blocks"][layer]["attn"])
        for h in range(CONFIG.heads[layer]):
            parts = [a["wq"][:, h], a["wk"][:, h], a["wv"][:, h], a["bq"][h], a["bk"][h],
                     a["bv"][h], a["wo"][h]]
            expected = np.sqrt(sum((w.astype(np.float64) ** 2).sum() for w in parts))
            assert got["heads"][layer][h] == pytest.approx(expected, rel=1e-5)
        m = jax.tree.map(np.asarray, params["blocks"][layer]["mlp"])
        for f in range(CONFIG.ffn[layer]):
            expected = np.sqrt((m["w1"][:, f] ** 2).sum() + m["b1"][f] ** 2
                               + (m["w2"][f] ** 2).sum())
            assert got["ffn"][layer][f] == pytest.approx(expected, rel=1e-5)
        assert got["layers"][layer] == pytest.approx(np.sqrt(
            (got["heads"][layer] ** 2).sum() + (got["ffn"][layer] ** 2).sum()))


def test_taylor_scores_are_per_example_gate_gradients(params, batches):
    """Mean over examples of |d loss(example) / d gate|, each example's gradient taken on
    its own with plain per-unit gates (another path than the per-sequence gates)."""
    masks = jax.tree.map(np.array, gpt.full_masks(CONFIG))
    masks["heads"][1][2] = 0.0  # a removed head: scores are of the masked model
    got = scores.scores("taylor", CONFIG, params, masks, batches)
    grad = jax.jit(jax.grad(lambda m, x, y: gpt.loss(CONFIG, params, x, y, m)))
    total, n = None, 0
    for x, y in batches:
        for i in range(x.shape[0]):
            g = jax.tree.map(lambda v: np.abs(np.asarray(v, np.float64)),
                             grad(masks, x[i:i + 1], y[i:i + 1]))
            total = g if total is None else jax.tree.map(np.add, total, g)
            n += 1
    for kind in ("heads", "ffn"):
        for layer in range(CONFIG.layers):
            np.testing.assert_allclose(got[kind][layer], total[kind][layer] / n, rtol=2e-4,
                                       atol=1e-7)
    np.testing.assert_allclose(got["layers"], total["layers"] / n, rtol=2e-4)
    assert got["heads"][0].min() > 0


def test_wanda_scores_by_hand(params, batches):
    got = scores.scores("wanda", CONFIG, params, None, batches)
    capture = jax.jit(lambda x: gpt.apply(CONFIG, params, x, capture=True)[1])
    acts = [capture(x) for x, _ in batches]

    def norms(key, layer):  # ||X_j|| over every token of every batch
        stacked = np.concatenate([np.asarray(a[key][layer], np.float64).reshape(
            -1, *np.shape(a[key][layer])[2:]) for a in acts])
        return np.sqrt((stacked ** 2).sum(0))

    for layer in range(CONFIG.layers):
        a = jax.tree.map(np.asarray, params["blocks"][layer]["attn"])
        m = jax.tree.map(np.asarray, params["blocks"][layer]["mlp"])
        n_attn, n_heads = norms("attn_in", layer), norms("heads", layer)
        n_ffn_in, n_ffn = norms("ffn_in", layer), norms("ffn", layer)
        for h in range(CONFIG.heads[layer]):
            expected = 0.0
            for j in range(CONFIG.d_model):
                for k in range(CONFIG.head_dim):
                    expected += sum(abs(a[w][j, h, k]) for w in ("wq", "wk", "wv")) * n_attn[j]
            for k in range(CONFIG.head_dim):
                expected += np.abs(a["wo"][h, k]).sum() * n_heads[h, k]
            assert got["heads"][layer][h] == pytest.approx(expected, rel=1e-4)
        for f in range(CONFIG.ffn[layer]):
            expected = (np.abs(m["w1"][:, f]) * n_ffn_in).sum() + np.abs(m["w2"][f]).sum() \
                * n_ffn[f]
            assert got["ffn"][layer][f] == pytest.approx(expected, rel=1e-4)
        assert got["layers"][layer] == pytest.approx(got["heads"][layer].sum()
                                                     + got["ffn"][layer].sum(), rel=1e-6)


def test_unknown_score_method_and_missing_batches(params):
    with pytest.raises(scores.ScoreError, match="unknown score method 'magnitude'"):
        scores.scores("magnitude", CONFIG, params)
    with pytest.raises(scores.ScoreError, match="needs at least one batch"):
        scores.scores("taylor", CONFIG, params)


def test_a_round_removes_the_lowest_and_keeps_one_unit_per_layer():
    masks = jax.tree.map(np.array, gpt.full_masks(CONFIG))
    s = {"heads": [np.array([1.0, 2.0]), np.array([0.1, 0.2, 0.3])],
         "ffn": [np.arange(6.0), np.arange(5.0) + 10], "layers": np.array([5.0, 1.0])}
    new = prune.remove_lowest(s, masks, ("heads", "ffn"), 0.4)
    # heads: 5 alive -> 2 removed: 0.1 and 0.2 (layer 1); ffn: 11 alive -> 4: layer 0's 0..3
    assert [m.tolist() for m in new["heads"]] == [[1, 1], [0, 0, 1]]
    assert [m.tolist() for m in new["ffn"]] == [[0, 0, 0, 0, 1, 1], [1] * 5]
    compact.check_masks(CONFIG, new)
    again = prune.remove_lowest(s, new, ("heads", "ffn"), 0.9)  # never a layer's last unit
    assert [int(m.sum()) for m in again["heads"]] == [1, 1]
    assert [int(m.sum()) for m in again["ffn"]] == [1, 1]
    compact.check_masks(CONFIG, again)
    layers = prune.remove_lowest(s, masks, ("layers",), 0.9)  # at least one layer stays
    assert layers["layers"].tolist() == [1, 0]


def test_a_round_crossing_a_budget_lands_on_it():
    config = gpt.GPTConfig(256, 8, 16, 4, heads=(4, 4, 4), ffn=(64, 64, 64))
    masks = jax.tree.map(np.array, gpt.full_masks(config))
    rng = np.random.default_rng(2)
    s = {"heads": [rng.random(4) for _ in range(3)], "ffn": [rng.random(64) for _ in range(3)],
         "layers": rng.random(3)}
    count = lambda m: gpt.param_count(compact.compacted_config(config, m))  # noqa: E731
    dense, unit = gpt.param_count(config), 2 * config.d_model + 1  # one FFN unit
    full_round = count(prune.remove_lowest(s, masks, ("heads", "ffn"), 0.5))
    for target in (dense - 1, dense - 3 * unit, (dense + full_round) // 2, full_round + 1):
        landed = prune.remove_to_target(s, masks, ("heads", "ffn"), 0.5,
                                        lambda m, t=target: count(m) <= t)
        assert target - unit < count(landed) <= target, target
        compact.check_masks(config, landed)
        for kind in ("heads", "ffn"):  # what a round removes is still the lowest-scored
            scored, kept = np.concatenate(s[kind]), np.concatenate(landed[kind]) == 1
            assert kept.all() or scored[~kept].max() < scored[kept].min()
    # a target the whole round does not reach: the whole round, unchanged
    far = prune.remove_to_target(s, masks, ("heads", "ffn"), 0.5, lambda m: count(m) < 10)
    expected = prune.remove_lowest(s, masks, ("heads", "ffn"), 0.5)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(far),
                                                    jax.tree.leaves(expected)))


def test_scratch_control_matches_the_parameter_count():
    pruned = gpt.GPTConfig(256, 64, 128, 32, heads=(3, 2, 1, 2), ffn=(300, 200, 250, 180))
    target = gpt.param_count(pruned)
    matched = baselines.matching_config(pruned, target)
    assert matched.heads == (2,) * 4 and len(set(matched.ffn)) == 1
    assert abs(gpt.param_count(matched) - target) <= 4 * (2 * 128 + 1) / 2


# -- the `lottery lm` config and command ---------------------------------------------------

TINY = ["experiment=lm_tiny"]


def test_lm_presets_compose_and_validate():
    for name in ("lm_tiny", "transformer_budget"):
        cfg = validate(lm_cli.compose([f"experiment={name}"]))
        assert cfg.name == name and cfg.budget_kind == "params"
    big = validate(lm_cli.compose(["experiment=transformer_budget"]))
    dense = gpt.param_count(big.dense_model)
    assert big.targets == (0.5 * dense, 0.25 * dense)
    assert big.variants == ("prune", "prune_kd") and big.baselines == ("scratch", "ticket")


def test_the_schema_holds_the_defaults_and_the_config_keeps_hydras_names():
    """conf/lm.yaml no longer lists the defaults: the schema (lottery/lm/config.py) gives
    the values the YAML file gave, and the validated config keeps the sections' names."""
    cfg = validate(lm_cli.compose([]))
    assert cfg.resolved == {
        "logger": {"name": "none"}, "task": "lm", "name": "lm", "seed": 0,
        "data": {"source": "stdlib", "max_bytes": 4000000, "validation_fraction": 0.05,
                 "eval_windows": 128},
        "model": {"layers": 4, "d_model": 128, "heads": 4, "head_dim": None, "ffn": 512,
                  "context": 64, "path": None, "name": None, "revision": None},
        "pretrain": {"steps": 1000, "batch_size": 16, "lr": 0.003, "warmup": 100,
                     "eval_every": 250},
        "prune": {"score": "taylor", "structures": ["heads", "ffn"], "fraction": 0.2,
                  "score_batches": 4, "max_rounds": 20, "remove": None},
        "finetune": {"steps": 100, "batch_size": 16, "lr": 0.001, "warmup": 10,
                     "eval_every": 50, "kd_alpha": 0.5, "kd_temperature": 2.0},
        "budget": {"params_fraction": [0.5, 0.25], "max_params": None,
                   "min_tokens_per_second": None, "exact": True},
        "variants": ["prune", "prune_kd"], "baselines": ["scratch", "ticket"],
        "quantize": True, "save": None, "measure": {"batch": 32, "repeats": 5}}
    plain = validate({"task": "lm"})  # a plain dict takes the same defaults
    assert plain.resolved == {"task": "lm"} and replace(plain, resolved=cfg.resolved) == cfg
    tiny = validate(lm_cli.compose(TINY))
    assert (tiny.prune.score, tiny.prune.structures, tiny.prune.fraction) == (
        "taylor", ("heads", "ffn"), 0.3)
    assert (tiny.budget.exact, tiny.budget.params_fraction) == (True, (0.8, 0.65))
    assert (tiny.finetune.kd_alpha, tiny.finetune.steps, tiny.pretrain.steps) == (0.5, 10, 20)
    assert (tiny.measure.batch, tiny.measure.repeats, tiny.data.source) == (8, 2, "stdlib")
    assert tiny.model.head_dim is None and tiny.logger.name == "none"
    assert tiny.dense_model == gpt.GPTConfig(256, 32, 32, 16, (2, 2), (64, 64))
    assert tiny.budget_kind == "params"


BAD = {
    "prune.remove={heads:{0:[0,1]}}": "removes every head of layer 0",
    "budget.params_fraction=1.5": "already meets it",
    "budget.params_fraction=null budget.max_params=10000000": "larger than the model",
    "budget.params_fraction=0.01": "cannot be reached",
    "budget.max_params=1000": "set exactly one of",
    "prune.score=magnitude": "prune.score='magnitude' is unknown; choose one of taylor, wanda, "
                             "weight",
    "prune.structures=[heads,neurons]": "unknown name(s) 'neurons'",
    "prune.fraction=1.0": "prune.fraction=1.0 must be a number in (0, 1)",
    "variants=[prune,distil]": "unknown name(s) 'distil'",
    "finetune.steps=0": "finetune.steps=0 must be at least 1",
    "prune.remove={layers:[7]}": "7 is not a layer of the model",
    "no_such_key=1": "no_such_key",
    "budget.exact=maybe": "budget.exact='maybe' must be true or false",
    "quantize=maybe": "quantize='maybe' must be true or false",
    "prune.scor=x": "prune.scor is not a config key (did you mean prune.score?)",
    "+prune.scor=x": "prune.scor is not a config key (did you mean prune.score?)",
    "+budget.params_fractoin=0.5": "budget.params_fractoin is not a config key (did you mean "
                                   "budget.params_fraction?)",
}


@pytest.mark.parametrize("override", BAD)
def test_bad_requests_stop_with_one_line(override, capsys):
    with pytest.raises(SystemExit) as stop:
        lm_cli.main([*TINY, *override.split()])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lottery lm: error: ")
    assert BAD[override] in err


def test_a_typo_names_the_nearest_key(capsys):
    with pytest.raises(SystemExit) as stop:
        lm_cli.main([*TINY, "prune.scor=x"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == (
        "lottery lm: error: prune.scor is not a config key (did you mean prune.score?); the "
        "keys of prune are score, structures, fraction, score_batches, max_rounds, remove\n")


def test_a_mistyped_group_names_the_nearest(capsys):
    with pytest.raises(SystemExit) as stop:
        lm_cli.main(["experimnt=lm_tiny"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == (
        "lottery lm: error: experimnt is not a config key or group (did you mean "
        "experiment=lm_tiny?); the groups are experiment, logger (group=option), the keys "
        "task, name, seed, data, model, pretrain, prune, finetune, budget, variants, "
        "baselines, quantize, save, measure\n")


def test_a_bad_sweep_value_stops_before_any_job(monkeypatch, capsys):
    """Each value of a `-m` sweep is composed and validated on its own before Hydra starts
    the first job (which would train the good value first)."""
    monkeypatch.setattr(lm_cli, "hydra_main", lambda: pytest.fail("a job was started"))
    with pytest.raises(SystemExit) as stop:
        lm_cli.main(["-m", *TINY, "prune.fraction=0.2,1.5"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == (
        "lottery lm: error: prune.fraction=1.5 must be a number in (0, 1) (overrides: "
        "prune.fraction=1.5)\n")
    from lottery import overrides

    assert overrides.check_overrides(["-m", *TINY, "prune.fraction=0.2,0.3", "seed=0,1"],
                                     lm_cli.CONF_DIR, "lm", validate, LMConfig,
                                     "lottery lm") is None


def test_lm_and_imp_go_through_the_same_pre_check(monkeypatch):
    """One pre-check (lottery.overrides) for both commands: `lottery lm` has no copy."""
    from pathlib import Path

    import lottery.cli
    from lottery import overrides
    from lottery.config import RunConfig
    from lottery.config import validate as imp_validate

    calls = []

    class Checked(Exception):
        pass

    def spy(args, conf_dir, config_name, validate_, root, program):
        calls.append((args, config_name, validate_, root, program))
        raise Checked

    monkeypatch.setattr(overrides, "check_overrides", spy)
    with pytest.raises(Checked):
        lm_cli.main([*TINY, "seed=1"])
    with pytest.raises(Checked):
        lottery.cli.check_overrides(["dataset=synthetic"])
    assert calls == [([*TINY, "seed=1"], "lm", validate, LMConfig, "lottery lm"),
                     (["dataset=synthetic"], "config", imp_validate, RunConfig, "lottery")]
    lm_sources = Path(lm_cli.__file__).parent.glob("*.py")
    assert not [path.name for path in lm_sources
                if "def check_overrides" in path.read_text() or "def fail" in path.read_text()]


def test_a_latency_budget_the_dense_model_meets_is_refused(tmp_path):
    cfg = validate(lm_cli.compose([*TINY, "budget.params_fraction=null",
                                   "budget.min_tokens_per_second=1", "measure.repeats=1"]))
    assert cfg.budget_kind == "tokens_per_second" and cfg.targets == (1.0,)
    run = budget.BudgetRun(cfg, tmp_path)
    with pytest.raises(ConfigError, match="already met by the dense model"):
        run.check_latency(gpt.init(cfg.dense_model, jax.random.key(0)))
    assert not list(tmp_path.iterdir())  # the record is opened once the request is feasible


def test_bad_request_from_the_command_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "lottery.cli", "lm", *TINY,
                           "prune.remove={heads:{1:[0,1]}}", f"hydra.run.dir={tmp_path}"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "removes every head of layer 1" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "record.jsonl").exists()


def test_a_corpus_refused_at_load_leaves_no_run_directory(tmp_path):
    """Found inside the Hydra job (the pre-check does not read the corpus): one line, exit 2,
    and neither a record nor Hydra's stub (.hydra/, cli.log) left behind."""
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    done = subprocess.run([sys.executable, "-m", "lottery.cli", "lm", *TINY,
                           f"data.source={empty}", f"hydra.run.dir={tmp_path}/run"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr == f"lottery lm: error: the corpus '{empty}' is empty; give a file with " \
        "text in it\n"
    assert [p.name for p in tmp_path.iterdir()] == ["empty.txt"]


# -- the budget loop end to end ---------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The lm_tiny preset, shortened: both variants (distilled first, so the controls are
    its targets'; the plain `prune` one shares the dense model, the scores and the
    evaluation programs), one chunk per phase, one timing repeat; compilation is most of
    its time. Every training (dense, rounds, controls) is observed: `fits[(branch, level)]` holds
    what `BudgetRun.fit` got (params, masks, key, steps) and returned (params, eval rows)."""
    out = tmp_path_factory.mktemp("lm_tiny")
    cfg = validate(lm_cli.compose([*TINY, "pretrain.eval_every=20", "measure.repeats=1",
                                   "budget.params_fraction=[0.8,0.7]",
                                   "variants=[prune_kd,prune]"]))
    data = budget.load_data(cfg)
    fits = {}

    class Observed(budget.BudgetRun):  # a run that keeps what each fine-tuning got
        def fit(self, trainer, params, masks, key, steps, every, row, desc):
            result = super().fit(trainer, params, masks, key, steps, every, row, desc)
            masks = None if masks is None else jax.tree.map(np.array, masks)
            fits[row["branch"], row["level"]] = SimpleNamespace(
                params=params, masks=masks, key=key, steps=steps, every=every,
                trained=result[0], history=result[1])
            return result

    summaries = Observed(cfg, out, data).run()
    return SimpleNamespace(cfg=cfg, out=out, summaries=summaries, data=data, fits=fits)


@pytest.fixture(scope="module")
def tiny_run(tiny):
    return tiny.cfg, tiny.out, tiny.summaries


def test_the_loop_stops_at_the_first_round_under_budget(tiny_run):
    cfg, _, summaries = tiny_run
    for variant in cfg.variants:
        rounds = summaries[summaries["branch"] == variant].sort_values("level")
        assert rounds["level"].tolist() == list(range(1, len(rounds) + 1))
        params = rounds["params"].tolist()
        assert params[-1] <= cfg.targets[-1] < min(params[:-1], default=np.inf)
        assert all(a > b for a, b in zip(params, params[1:]))  # every round removes something
        first = next(i for i, p in enumerate(params) if p <= cfg.targets[0])
        unit = 2 * cfg.model.d_model + 1  # budget.exact: each target met within one FFN unit
        assert cfg.budget.exact and cfg.targets[0] - unit < params[first] <= cfg.targets[0]
        assert cfg.targets[-1] - unit < params[-1]
        met = rounds["budget_targets"].tolist()
        assert met[first] == [cfg.targets[0]] or first == len(params) - 1
        quantized = rounds.dropna(subset=["quantized_bits_per_byte"])
        assert quantized["level"].tolist() == sorted({rounds["level"].iloc[first],
                                                      rounds["level"].iloc[-1]})


def test_record_rows_and_summary_table(tiny_run):
    cfg, out, summaries = tiny_run
    runs, evals, rows = (load(out, kind) for kind in ("run", "eval", "summary"))
    assert len(runs) == 1 and runs["dense_params"][0] == gpt.param_count(cfg.dense_model)
    assert set(evals["branch"]) == {"dense", "prune_kd", "prune", "scratch", "ticket"}
    for column in ("val_loss", "test_loss", "val_accuracy", "test_accuracy", "bits_per_byte",
                   "density", "step"):
        assert evals[column].notna().all(), column
    pruned = evals[evals["branch"] != "dense"]
    assert pruned[["params", "bytes", "tokens_per_second"]].notna().all().all()
    assert (pruned["bytes"] == 4 * pruned["params"]).all()
    np.testing.assert_allclose(evals["bits_per_byte"], evals["test_loss"] / np.log(2))
    dense = rows[rows["branch"] == "dense"].iloc[0]
    assert dense["density"] == 1.0 and dense["quantized_bytes"] < dense["bytes"] / 3
    assert abs(dense["quantized_bits_per_byte"] - dense["bits_per_byte"]) < 0.05
    table = summary_table(rows)
    assert len(table) == len(rows) and table["accuracy_mean"].between(0, 1).all()
    # controls: the first variant's targets, same steps in all, about the same size
    prune_rows = rows[rows["branch"] == cfg.variants[0]]
    for branch in ("scratch", "ticket"):
        controls = rows[rows["branch"] == branch]
        assert sorted(controls["level"]) == sorted(
            prune_rows.dropna(subset=["budget_targets"])["level"])
        for row in controls.itertuples():
            match = prune_rows[prune_rows["level"] == row.level].iloc[0]
            assert row.final_step == match.final_step
            assert abs(row.params - match.params) <= 2 * (2 * cfg.model.d_model + 1)
            if branch == "ticket":
                assert row.params == match.params


def test_lottery_report_reads_an_lm_run(tiny_run, tmp_path):
    """report.md tabulates test bits per byte at early stop (the record's, per round and
    branch, with its training steps), and says why the dense model scores worse exactly
    when a model with more training steps beats it."""
    from lottery.analysis.report import write_report

    written = write_report(tiny_run[1], tmp_path)
    assert (tmp_path / "report.md").exists() and all(p.exists() for p in written)
    assert (tmp_path / "bits_per_byte_vs_density.png") in written
    text = (tmp_path / "report.md").read_text()
    assert "Test bits per byte (lower is better) at early stop" in text
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:6] == ["round", "branch", "steps", "params", "% dense",
                          "early-stop test bits/byte"]
    cells = {(int(row[0]), row[1]): row for row in (
        [c.strip() for c in line.strip("|").split("|")] for line in lines[1:])}
    rows = load(tiny_run[1], "summary")
    assert len(cells) == len(rows)
    for row in rows.itertuples():
        got = cells[row.level, row.branch]
        assert got[2] == str(row.early_stop_step)
        assert got[5] == f"{row.early_stop_bits_per_byte:.3f}"
    dense = rows[rows["branch"] == "dense"].iloc[0]
    beat = rows[rows["early_stop_bits_per_byte"] < dense["early_stop_bits_per_byte"]]
    assert ("Dense scores worse because it trained less" in text
            or "Dense trained less than the models that beat it" in text) == (
        not beat.empty and bool((beat["early_stop_step"] > dense["early_stop_step"]).all()))


# -- the printed table and its line about the dense model, on hand-made summary rows --------

def _summaries(dense: float, others: list[tuple]) -> "pd.DataFrame":
    """Summary rows as the record holds them: the dense model (20 steps) with test bits per
    byte `dense`, then (branch, level, steps, bits/byte, bits/byte right after removal)."""
    import pandas as pd

    rows = [{"level": 0, "branch": "dense", "final_step": 20, "early_stop_step": 20,
             "params": 1000, "density": 1.0, "bits_per_byte": dense,
             "final_bits_per_byte": dense, "early_stop_bits_per_byte": dense,
             "test_accuracy": 0.25, "final_test_accuracy": 0.25,
             "early_stop_test_accuracy": 0.25}]
    for branch, level, steps, bits, pruned in others:
        rows.append({"level": level, "branch": branch, "final_step": steps,
                     "early_stop_step": steps, "params": 1000 - 100 * level,
                     "density": 1 - 0.1 * level, "bits_per_byte": bits,
                     "final_bits_per_byte": bits, "early_stop_bits_per_byte": bits,
                     "test_accuracy": 0.25, "final_test_accuracy": 0.25,
                     "early_stop_test_accuracy": 0.25, "pruned_bits_per_byte": pruned})
    return pd.DataFrame(rows)


LONGER = [("prune", 1, 30, 5.5, 5.95), ("prune", 2, 40, 5.25, 5.6),
          ("scratch", 2, 40, 4.75, None)]  # trained longer than dense, and better


@pytest.mark.parametrize("others, note", [
    (LONGER, "Dense scores worse because it trained less: 20 steps, the models that beat it "
             "30–40; no removal lowered bits/byte, the extra steps did."),
    # round 2's removal by itself took bits/byte below round 1's 5.5: only the steps are said
    ([("prune", 1, 30, 5.5, 5.95), ("prune", 2, 40, 5.25, 5.4)],
     "Dense trained less than the models that beat it: 20 steps, against 30–40."),
    ([("prune", 1, 30, 6.1, 6.0)], ""),  # dense is the best: nothing to explain
    ([("prune", 1, 20, 5.8, 5.95)], ""),  # better with no more steps: steps do not explain it
])
def test_the_printed_table_leads_with_bits_per_byte_and_explains_a_better_pruned_model(
        others, note, capsys):
    lm_cli.print_table(_summaries(5.908, others))
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "branch" in line)
    names = [c.strip() for c in header.strip("┃ ").split("┃")]
    assert names[:8] == ["round", "branch", "steps", "params", "% dense", "bits/byte",
                         "accuracy", "int8 bits/byte"]
    dense = next(line for line in out.splitlines() if line.startswith("│") and " dense " in line)
    assert [c.strip() for c in dense.strip("│ ").split("│")][:7] == [
        "0", "dense", "20", "1,000", "100.0%", "5.908", "25.0%"]
    last = out.rstrip("\n").splitlines()[-1]
    assert (last == note) if note else last.startswith("└")


def test_the_markdown_table_of_an_lm_run(capsys):
    from lottery.lm.table import markdown_table

    text = markdown_table(_summaries(5.908, LONGER), "final")
    lines = text.splitlines()
    assert lines[0] == ("| round | branch | steps | params | % dense | final test bits/byte | "
                        "final test accuracy (%) | int8 bits/byte |")
    assert lines[2] == "| 0 | dense | 20 | 1,000 | 100.0 | 5.908 | 25.0 |  |"
    assert lines[5] == "| 2 | scratch | 40 | 800 | 80.0 | 4.750 | 25.0 |  |"
    assert lines[-1].startswith("Dense scores worse because it trained less: 20 steps")
    assert "trained less" not in markdown_table(_summaries(4.5, LONGER), "final")


# -- the plain `prune` variant, against the test's own counts, evaluation and training ------

def _hand_count(cfg, heads, ffn) -> int:
    """Parameters of the byte-level GPT with these per-layer sizes, counted from its layout:
    token (256 x d) and position (context x d) embeddings, the final LayerNorm (2d); per
    layer with heads, ln1 (2d) and per head q, k, v (d x hd + hd each) and its rows of wo
    (hd x d); per layer with FFN units, ln2 (2d) and per unit w1's column, b1 and w2's row."""
    d, hd, context = cfg.model.d_model, cfg.dense_model.head_dim, cfg.model.context
    total = 256 * d + context * d + 2 * d
    for h, f in zip(heads, ffn):
        total += (2 * d + h * (3 * (d * hd + hd) + hd * d)) if h else 0
        total += (2 * d + f * (d + 1 + d)) if f else 0
    return total


_forward = jax.jit(gpt.apply, static_argnums=0)  # one program per config


def _bits_per_byte(config, params, split, masks=None) -> float:
    """Mean next-byte cross entropy over all the windows of a split (padded batches, the
    padding dropped) at once, in bits (float64)."""
    x, y, weight = (np.asarray(a) for a in split)
    real = weight.reshape(-1) > 0
    x, y = (a.reshape(-1, a.shape[-1])[real] for a in (x, y))
    logits = np.asarray(_forward(config, params, jnp.asarray(x), masks), np.float64)
    top = logits.max(-1, keepdims=True)
    log_p = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    return float(-np.take_along_axis(log_p, y[..., None], -1).mean() / np.log(2))


def _prune_rounds(tiny):
    return tiny.summaries[tiny.summaries["branch"] == "prune"].sort_values("level")


def test_prune_records_the_sizes_of_its_compacted_model_and_lands_on_the_budget(tiny):
    cfg, rounds = tiny.cfg, _prune_rounds(tiny)
    assert cfg.dense_model.vocab == 256 and cfg.prune.structures == ("heads", "ffn")
    assert len(rounds) >= 1
    dense = _hand_count(cfg, cfg.dense_model.heads, cfg.dense_model.ffn)
    for row in rounds.itertuples():
        fit = tiny.fits["prune", row.level]
        # the recorded sizes are the round's masks' survivors (no layer removed)
        assert row.heads == [int(m.sum()) for m in fit.masks["heads"]]
        assert row.ffn == [int(m.sum()) for m in fit.masks["ffn"]]
        assert row.layers == cfg.model.layers and fit.masks["layers"].all()
        assert row.params == _hand_count(cfg, row.heads, row.ffn)
        assert row.density == pytest.approx(row.params / dense)
        small = compact.compact(cfg.dense_model, fit.trained, fit.masks)[1]  # its model
        assert sum(np.size(leaf) for leaf in jax.tree.leaves(small)) == row.params
        assert row.bytes == 4 * row.params
    params, unit = rounds["params"].tolist(), 2 * cfg.model.d_model + 1  # one FFN unit
    first = next(i for i, p in enumerate(params) if p <= cfg.targets[0])
    assert cfg.targets[0] - unit < params[first] <= cfg.targets[0]  # lands on each target
    assert cfg.targets[-1] - unit < params[-1] <= cfg.targets[-1] < min(params[:-1],
                                                                       default=np.inf)
    assert rounds["budget_targets"].iloc[first][0] == cfg.targets[0]
    assert rounds["budget_targets"].iloc[-1][-1] == cfg.targets[-1]


def test_prune_records_the_bits_per_byte_of_its_compacted_models(tiny):
    """bits/byte: the fine-tuned model, compacted, evaluated here on the test windows;
    pruned_bits_per_byte: the model right after removal (before fine-tuning)."""
    cfg, rounds = tiny.cfg, _prune_rounds(tiny)
    record = load(tiny.out, "summary").set_index(["branch", "level"])
    for row in rounds.itertuples():
        fit = tiny.fits["prune", row.level]
        after = _bits_per_byte(*compact.compact(cfg.dense_model, fit.trained, fit.masks),
                               tiny.data.test)
        before = _bits_per_byte(*compact.compact(cfg.dense_model, fit.params, fit.masks),
                                tiny.data.test)
        assert abs(after - before) > 1e-3  # fine-tuning moved it: the two are told apart
        assert row.bits_per_byte == pytest.approx(after, rel=1e-5)
        assert row.pruned_bits_per_byte == pytest.approx(before, rel=1e-5)
        assert record.loc[("prune", row.level), "bits_per_byte"] == row.bits_per_byte
        # the compacted model is the masked one (the same bits/byte, up to rounding)
        assert _bits_per_byte(cfg.dense_model, fit.trained, tiny.data.test,
                              jax.tree.map(jnp.asarray, fit.masks)) == pytest.approx(after,
                                                                                     rel=1e-5)


def test_bits_per_byte_of_hand_made_logits_padding_excluded(monkeypatch, tmp_path):
    """The evaluation a run records (`BudgetRun.evaluate`: fixed windows in padded batches
    of `train.EVAL_BATCH`, `train.evaluate`, `corpus.bits_per_byte`) on a model whose logits
    are a hand-made table, against NumPy: bits per byte = the mean over every real window's
    bytes of -log2 softmax(logits)[true byte]; accuracy over the same bytes. 70 windows make
    two batches of 64, the second 58 windows of padding (zero inputs and targets, whose
    logits are those of window 0 and would change both means if they counted)."""
    cfg = validate(lm_cli.compose(TINY))
    context, windows = cfg.model.context, 70
    rng = np.random.default_rng(7)
    logits = rng.normal(0.0, 3.0, (windows * context, 256)).astype(np.float32)
    targets = rng.integers(0, 256, windows * context)
    right = rng.random(windows * context) < 0.3  # about 30% predicted: accuracy not trivial
    targets[right] = logits[right].argmax(-1)
    # window i's inputs are the row numbers of its logits; padding reads row 0
    x = np.arange(windows * context, dtype=np.int32).reshape(windows, context)
    y = targets.astype(np.int32).reshape(windows, context)
    split = train.eval_split(x, y)
    assert split[2].shape == (2, train.EVAL_BATCH) and split[2].sum() == windows
    monkeypatch.setattr(gpt, "apply", lambda config, params, x, masks=None, **_:
                        params["logits"][x])  # the hand-made model
    data = budget.Data(None, jax.device_put(split), jax.device_put(split), "hand-made")
    got = budget.BudgetRun(cfg, tmp_path, data).evaluate(
        cfg.dense_model, {"logits": jnp.asarray(logits)})

    z = logits.astype(np.float64)
    log2_p = (z - z.max(-1, keepdims=True)) / np.log(2) - np.log2(
        np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
    bits = -log2_p[np.arange(targets.size), targets].mean()
    accuracy = np.mean(logits.argmax(-1) == targets)
    assert 0.2 < accuracy < 0.4 and bits > 1
    for split_name in ("", "val_"):
        assert got[f"{split_name}bits_per_byte"] == pytest.approx(bits, rel=1e-5)
    assert got["test_loss"] == pytest.approx(bits * np.log(2), rel=1e-5)  # nats per byte
    assert got["test_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert got["val_accuracy"] == got["test_accuracy"]


def _fine_tune(cfg, data, fit, teacher, alpha: float):
    """The test's own first fine-tuning chunk: `fit.steps` Adam steps (gradients clipped at
    global norm 1; lr warmed up linearly from 0, then cosine decay to 10%) from the round's
    params under its gates, batch i drawn with fold_in(round key, i); the objective is
    alpha * T^2 KL(teacher || student) + (1 - alpha) * the LM cross entropy.
    Returns (params, mean objective over the steps)."""
    phase, model, t = cfg.finetune, cfg.dense_model, cfg.finetune.kd_temperature
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(
        optax.warmup_cosine_decay_schedule(0.0, phase.lr, phase.warmup, phase.steps,
                                           0.1 * phase.lr)))

    def objective(params, masks, teacher, x, y, alpha):
        logits = gpt.apply(model, params, x, masks)
        lm = -jnp.take_along_axis(jax.nn.log_softmax(logits), y[..., None], -1).mean()
        soft = jax.nn.log_softmax(gpt.apply(model, teacher, x) / t)
        kl = jnp.sum(jnp.exp(soft) * (soft - jax.nn.log_softmax(logits / t)), -1).mean()
        return alpha * t ** 2 * kl + (1 - alpha) * lm

    @jax.jit
    def step(params, opt_state, masks, teacher, tokens, key, i, alpha):
        x, y = corpus.sample_batch(tokens, jax.random.fold_in(key, i), phase.batch_size,
                                   model.context)
        value, grads = jax.value_and_grad(objective)(params, masks, teacher, x, y, alpha)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    params, opt_state, values = fit.params, tx.init(fit.params), []
    masks = jax.tree.map(jnp.asarray, fit.masks)
    for i in range(fit.steps):
        params, opt_state, value = step(params, opt_state, masks, teacher, data.train,
                                        fit.key, i, alpha)
        values.append(float(value))
    return params, float(np.mean(values))


def _key(seed: int, level: int, branch: str, purpose: str):
    """The engine's derivation (lottery/seeds.py's docstring), written out: fold_in(seed,
    replicate 0, level, crc32(branch), crc32(purpose)), names as 31-bit CRC-32s."""
    key = jax.random.fold_in(jax.random.key(seed), 0)
    for part in (level, zlib.crc32(branch.encode()) & 0x7FFFFFFF,
                 zlib.crc32(purpose.encode()) & 0x7FFFFFFF):
        key = jax.random.fold_in(key, part)
    return jax.random.key_data(key)


def test_every_lm_key_is_the_engines_derived_key(tiny):
    """The dense model's initialisation and every training's data order come from the
    engine's derived keys (one replicate), each (level, branch, purpose) its own: the
    scoring batches are not the fine-tuning's first batches."""
    seed, fits = tiny.cfg.seed, tiny.fits
    init = gpt.init(tiny.cfg.dense_model, jax.random.wrap_key_data(_key(seed, 0, "dense", "init")))
    for got, want in zip(jax.tree.leaves(fits["dense", 0].params), jax.tree.leaves(init)):
        np.testing.assert_array_equal(got, want)
    for (branch, level), fit in fits.items():
        np.testing.assert_array_equal(jax.random.key_data(fit.key),
                                      _key(seed, level, branch, "data"))
    assert {branch for branch, _ in fits} == {"dense", "prune", "prune_kd", "scratch", "ticket"}


def test_a_diverged_evaluation_is_recorded_as_none_and_never_the_early_stop(tiny, tmp_path):
    run = budget.BudgetRun(tiny.cfg, tmp_path, tiny.data)
    finite = {metric: 1.0 + i for i, metric in enumerate(budget.METRICS)}
    history = [{"step": 10, **finite, "val_loss": 3.0},
               {"step": 20, **finite, "val_loss": 2.0},
               {"step": 30, **dict.fromkeys(budget.METRICS)}]  # what evaluate gives for NaN
    summary = run.summarise(history, {"level": 1, "branch": "prune"})
    assert summary["early_stop_step"] == 20 and summary["final_step"] == 30
    assert summary["early_stop_val_loss"] == 2.0 and summary["final_val_loss"] is None
    assert summary["bits_per_byte"] is None and summary["early_stop_bits_per_byte"] == 6.0
    nan = run.evaluate(tiny.cfg.dense_model, jax.tree.map(lambda p: p * np.nan,
                                                    tiny.fits["dense", 0].params))
    assert set(nan) == set(budget.METRICS) and set(nan.values()) == {None}


def test_prune_fine_tunes_on_the_lm_loss_without_the_teacher(tiny):
    """Round 1 of `prune` is the test's plain LM-loss loop; the same loop with the teacher
    gives another loss, and is what `prune_kd`'s round 1 recorded."""
    cfg = tiny.cfg
    plain, kd = tiny.fits["prune", 1], tiny.fits["prune_kd", 1]
    teacher = plain.params  # round 1 starts from the dense model, which is the teacher
    for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(kd.params)):
        np.testing.assert_array_equal(a, b)
    for fit in (plain, kd):  # one chunk: its train_loss is the mean over every step
        assert fit.steps == fit.every == cfg.finetune.steps and len(fit.history) == 1
    assert 0 < cfg.finetune.kd_alpha < 1

    params, loss = _fine_tune(cfg, tiny.data, plain, teacher, 0.0)
    assert plain.history[0]["train_loss"] == pytest.approx(loss, rel=1e-5)
    for got, want in zip(jax.tree.leaves(plain.trained), jax.tree.leaves(params)):
        np.testing.assert_allclose(got, want, atol=2e-6)
    distilled = _fine_tune(cfg, tiny.data, plain, teacher, cfg.finetune.kd_alpha)[1]
    assert abs(distilled - plain.history[0]["train_loss"]) > 0.1  # distilling shows
    # and the loop's distillation is `prune_kd`'s
    assert kd.history[0]["train_loss"] == pytest.approx(
        _fine_tune(cfg, tiny.data, kd, teacher, cfg.finetune.kd_alpha)[1], rel=1e-5)


@pytest.fixture(scope="module")
def latency_run(tmp_path_factory):
    """A tokens/s budget, with whole layers among the structures, logged to W&B (offline).
    Throughput is a stand-in that falls with the parameter count (1e9 / params), so that
    the rounds are predictable; the real measurement is `measure.tokens_per_second`, tested
    in test_lm_model. Returns (config, run directory, summaries, stderr)."""
    out = tmp_path_factory.mktemp("lm_latency")
    cfg = validate(lm_cli.compose([*TINY, "budget.params_fraction=null",
                                   "budget.min_tokens_per_second=[45000,75000]",
                                   "prune.structures=[layers,heads,ffn]", "variants=[prune]",
                                   "baselines=[scratch]", "quantize=false", "logger=wandb",
                                   "pretrain.eval_every=20", "measure.repeats=1"]))
    class StandIn(budget.BudgetRun):
        def speed(self, config, params):
            return 1e9 / gpt.param_count(config)

    stderr = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(stderr):
        patch.setenv("WANDB_MODE", "offline")
        summaries = StandIn(cfg, out).run()
        # the group's summary run, as `lottery lm` logs it after the run
        wandb_summary(out, summary_figures(summaries, out, cfg.name))
    return cfg, out, summaries, stderr.getvalue()


def test_a_latency_budget_stops_at_the_first_fast_enough_round(latency_run):
    cfg, out, summaries, _ = latency_run
    assert cfg.budget_kind == "tokens_per_second" and cfg.targets == (45000.0, 75000.0)
    rounds = summaries[summaries["branch"] == "prune"].sort_values("level")
    speed = rounds["tokens_per_second"].tolist()
    assert speed[-1] >= cfg.targets[-1] > max(speed[:-1])  # stops at the first one that meets
    first = next(i for i, v in enumerate(speed) if v >= cfg.targets[0])
    assert rounds["budget_targets"].iloc[first] == [cfg.targets[0]]
    # controls for each target met, as fast as the pruned model (same size)
    scratch = summaries[summaries["branch"] == "scratch"]
    assert sorted(scratch["level"]) == sorted({rounds["level"].iloc[first],
                                               rounds["level"].iloc[-1]})


def test_layer_removal_end_to_end(latency_run):
    cfg, out, summaries, _ = latency_run
    rounds = summaries[summaries["branch"] == "prune"].sort_values("level")
    # two layers; round 1 removes the lower-scored one (30% of 2, at least one), and at least
    # one layer always stays; the recorded sizes describe the compacted model exactly
    assert rounds["layers"].tolist() == [1] * len(rounds)
    for row in rounds.itertuples():
        assert len(row.heads) == len(row.ffn) == row.layers
        config = gpt.GPTConfig(256, cfg.model.context, cfg.model.d_model,
                               cfg.dense_model.head_dim, tuple(row.heads), tuple(row.ffn))
        assert gpt.param_count(config) == row.params
    evals = load(out, "eval")
    assert set(evals["level"][evals["branch"] == "prune"]) == set(rounds["level"])
    scratch = summaries[summaries["branch"] == "scratch"]
    assert (scratch["layers"] == 1).all()  # the control has the pruned model's depth


def test_rounds_go_to_wandb_like_imp_levels(latency_run):
    """`logger=wandb` (offline): one W&B run per branch and the group's summary run, under
    the run directory, and no W&B warning (the summary's tables and plot take LM rows)."""
    _, out, summaries, stderr = latency_run
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 4  # dense, prune, scratch, and the summary
    assert "W&B disabled" not in stderr and "lottery lm: done" in stderr
    assert "W&B summary not logged" not in stderr and (out / "accuracy_vs_density.png").exists()
