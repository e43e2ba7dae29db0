"""Failures inside a run: a member whose loss becomes NaN stops with a recorded `diverged`
status while the others go on unchanged; out of memory is one line saying what to change.
(W&B failures: tests/test_wandb.py; killed runs: tests/test_resume.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from lottery import imp
from lottery.config import ConfigError
from lottery.record import load, summary_table

# TINY: 6 members (ticket, reinit, random_prune) x 2 replicates, chunks of 20 steps, 2 per
# level. Once level 1 has started (and recorded its step-0 evaluation), ticket replicate 0
# and reinit replicate 1 get NaN weights: their step-20 evaluation finds them diverged.
POISONED_LEVEL, POISONED = 1, (("ticket", 0), ("reinit", 1))


@pytest.fixture(scope="module")
def poisoned_run(tmp_path_factory):
    """The level loop driven here, poisoning two members' weights with NaN once level
    POISONED_LEVEL has started."""
    members = [(b, r) for b in helpers.BRANCHES for r in range(2)]
    index = jnp.array([members.index(m) for m in POISONED])
    out = tmp_path_factory.mktemp("poisoned") / "run"
    setup = helpers.setup(helpers.run_config())
    experiment = imp.Experiment(setup, out, log=lambda line: None)
    for number in range(setup.cfg.prune.levels + 1):
        level = experiment.start_level(number)
        if number == POISONED_LEVEL:
            params = jax.tree.map(lambda x: x.at[index].set(jnp.nan), level.state.params)
            level.state = level.state._replace(params=params)
        experiment.train_level(level)
        experiment.finish_level(level)
    experiment.close()
    return out, load(out, kind="summary")


def test_diverged_members_are_recorded_as_such(poisoned_run):
    summaries = load(poisoned_run[0], kind="summary").set_index(["level", "branch", "replicate"])
    level1 = summaries.loc[1]
    for member in POISONED:
        assert level1.loc[member, "status"] == "diverged"
        assert level1.loc[member, "diverged_step"] == 20
        assert np.isnan(level1.loc[member, "final_test_accuracy"])
        assert level1.loc[member, "early_stop_step"] == 0  # the last finite evaluation
    others = [m for m in level1.index if m not in POISONED]
    assert (level1.loc[others, "status"] == "ok").all()
    assert (summaries.loc[(0, slice(None), slice(None)), "status"] == "ok").all()


def test_a_diverged_member_stops_being_recorded(poisoned_run):
    evals = load(poisoned_run[0], kind="eval")
    for branch, replicate in POISONED:
        rows = evals[(evals.level == 1) & (evals.branch == branch) & (evals.replicate == replicate)]
        assert rows["step"].tolist() == [0, 20]  # the evaluation that found it, then nothing
        assert rows["val_loss"].isna().tolist() == [False, True]


def test_a_diverged_ticket_ends_its_replicate(poisoned_run):
    """Level 2 would prune replicate 0's NaN ticket: all its members are diverged from the
    start, unrecorded; replicate 1 goes on."""
    out, _ = poisoned_run
    summaries = load(out, kind="summary")
    level2 = summaries[summaries.level == 2]
    assert (level2[level2.replicate == 0]["status"] == "diverged").all()
    assert (level2[level2.replicate == 1]["status"] == "ok").all()
    evals = load(out, kind="eval")
    assert not len(evals[(evals.level == 2) & (evals.replicate == 0)])


def test_the_other_members_are_unchanged(poisoned_run, main_run):
    """Members never interact: every healthy member's rows equal the clean run's."""
    poisoned, clean = (load(d, kind="eval").set_index(["level", "branch", "replicate", "step"])
                       for d in (poisoned_run[0], main_run.dir))
    lost = {(1, b, r) for b, r in POISONED} | {(2, b, 0) for b in helpers.BRANCHES}
    healthy = [i for i in clean.index if i[:3] not in lost]
    assert healthy == [i for i in poisoned.index if i[:3] not in lost]
    before = [(1, b, r, 0) for b, r in POISONED]  # the poisoned members before the poison
    columns = list(helpers.METRICS) + ["density"]
    rows = healthy + before
    assert poisoned.loc[rows, columns].equals(clean.loc[rows, columns])


def test_run_returns_every_summary_with_its_status(poisoned_run):
    _, returned = poisoned_run
    assert len(returned) == 3 * 6
    assert (returned["status"] == "diverged").sum() == 2 + 3


def test_the_final_table_leaves_the_diverged_members_out(poisoned_run):
    """The table printed at the end of the run: at level 1 each poisoned branch averages its
    one healthy replicate only; at level 2 every branch has lost replicate 0."""
    _, returned = poisoned_run
    table = summary_table(returned).set_index(["level", "branch"])
    rows = returned.set_index(["level", "branch", "replicate"])
    for branch, replicate in POISONED:
        healthy = rows.loc[(1, branch, 1 - replicate), "early_stop_test_accuracy"]
        assert table.loc[(1, branch), "accuracy_mean"] == healthy
        assert table.loc[(1, branch), ["replicates", "diverged"]].tolist() == [1, 1]
    assert table.loc[(1, "random_prune"), ["replicates", "diverged"]].tolist() == [2, 0]
    assert (table.loc[2, "replicates"] == 1).all() and (table.loc[2, "diverged"] == 1).all()
    assert table.loc[0, "diverged"].eq(0).all()


def test_out_of_memory_is_one_line_saying_what_to_change():
    with pytest.raises(ConfigError) as error, imp.out_of_memory_hint(helpers.run_config()):
        raise jax.errors.JaxRuntimeError(
            "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 81604378624 bytes.")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("out of memory training 6 members (3 branches x 2 replicates, "
                              "3 per device on 2 cpu device(s)): use fewer replicates per device")


def test_other_runtime_errors_are_not_disguised():
    with (pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"),
          imp.out_of_memory_hint(helpers.run_config())):
        raise jax.errors.JaxRuntimeError("INTERNAL: something else")
