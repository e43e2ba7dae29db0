"""The summary rows of `lottery lm` runs as the tables a reader sees: the table `lottery lm`
prints at the end (lottery/lm/cli.py) and the one `lottery report` writes for an LM run.

Test bits per byte (the mean next-byte cross entropy in bits, `corpus.bits_per_byte`; lower
is better) is the main metric (a pretrained model's: per-token perplexity, `metric_of`);
next-byte accuracy is secondary (an undertrained model predicts the most frequent byte
everywhere, so every model's accuracy can be the same while their bits per byte differ). Beside each value, the training steps its model had since initialisation.

`dense_note` explains the result a short schedule gives, where the dense model scores worse
than the models pruned from it: they continue training from the dense one (each round
fine-tunes `finetune.steps` more), and the controls train for as many steps, so they had more
training. The line is written only when the numbers say so.

No JAX here: `lottery report` imports this module.
"""

import numpy as np
import pandas as pd

from lottery.record import diverged

WHICH = ("final", "early_stop")


def is_lm(summaries: pd.DataFrame) -> bool:
    """Whether summary rows are `lottery lm` rows (they carry bits per byte, or a pretrained
    model's perplexity, at the end of each training)."""
    return "final_bits_per_byte" in summaries.columns or "final_perplexity" in summaries.columns


def metric_of(summaries: pd.DataFrame) -> str:
    """The main metric of `lottery lm` rows: "bits_per_byte" (the byte model), or
    "perplexity" (per token, a pretrained model's: its tokenizer's tokens are no bytes)."""
    return "bits_per_byte" if "final_bits_per_byte" in summaries.columns else "perplexity"


LABELS = {"bits_per_byte": "bits/byte", "perplexity": "perplexity"}


def lm_summary(summaries: pd.DataFrame, which: str = "final") -> pd.DataFrame:
    """Per round (`level`) and branch, in the order they ran, over replicates (pooled runs):
    `steps` (training steps since initialisation at the reported value: `final_step` or
    `early_stop_step`), `params`, `density`, test `bits_per_byte` (mean) and
    `bits_per_byte_std` (NaN for one replicate), test `accuracy`, `quantized_bits_per_byte`
    (int8; only at the rounds that met a budget), `pruned_bits_per_byte` (right after the
    round's removal, before fine-tuning), `final_bits_per_byte` (of the model the next
    round's removal starts from) and `replicates` (members averaged: diverged ones are left
    out). A pretrained model's rows: the same with `perplexity` for `bits_per_byte`
    (`metric_of`; the table's `attrs["metric"]` says which)."""
    m = metric_of(summaries)
    if which not in WHICH:
        raise ValueError(f"which={which!r}: one of {', '.join(WHICH)}")
    gone = diverged(summaries)
    columns = {"steps": f"{which}_step", "params": "params", "density": "density",
               m: f"{which}_{m}", "accuracy": f"{which}_test_accuracy",
               f"quantized_{m}": f"quantized_{m}", f"pruned_{m}": f"pruned_{m}",
               f"final_{m}": f"final_{m}"}
    frame = pd.DataFrame({"level": summaries["level"], "branch": summaries["branch"]})
    for name, column in columns.items():
        values = (pd.to_numeric(summaries[column], errors="coerce") if column in summaries
                  else pd.Series(np.nan, index=summaries.index))
        frame[name] = values.mask(gone) if name not in ("params", "density") else values
    frame["replicate_ok"] = ~gone & frame[m].notna()
    grouped = frame.groupby(["level", "branch"], sort=False)
    table = grouped.agg(**{name: (name, "mean") for name in columns},
                        **{f"{m}_std": (m, "std")},
                        replicates=("replicate_ok", "sum")).reset_index()
    table["replicates"] = table["replicates"].astype(int)
    table.attrs["metric"] = m
    return table


def dense_note(table: pd.DataFrame) -> str:
    """One line saying why the dense model scores worse than other models of the run (in
    bits per byte) when all of those trained more steps than it did: because it trained
    less, where no pruning round's removal lowered bits per byte by itself (so the
    fine-tuning steps did), else only the step counts. "" when no model beats it, or when
    one that beats it trained no more steps (the step counts do not explain it).
    `table`: `lm_summary`'s (a pretrained model's: in perplexity)."""
    m = table.attrs.get("metric", "bits_per_byte")
    dense = table[table["branch"] == "dense"]
    if dense.empty or np.isnan(dense[m].iloc[0]):
        return ""
    bits, steps = dense[m].iloc[0], dense["steps"].iloc[0]
    better = table[(table["branch"] != "dense") & (table[m] < bits)]
    if better.empty or not (better["steps"] > steps).all():
        return ""
    low, high = better["steps"].min(), better["steps"].max()
    span = f"{low:,.0f}" if low == high else f"{low:,.0f}–{high:,.0f}"
    if removal_never_helped(table):  # then the extra steps are what made the difference
        return (f"Dense scores worse because it trained less: {steps:,.0f} steps, the models "
                f"that beat it {span}; no removal lowered {LABELS[m]}, the extra steps did.")
    return f"Dense trained less than the models that beat it: {steps:,.0f} steps, against {span}."


def removal_never_helped(table: pd.DataFrame) -> bool:
    """Whether every pruning round's removal, by itself, left bits per byte no lower than
    the model it was cut from had at the end of its training (the previous round's, or the
    dense model's for round 1); False when the table holds no such comparison."""
    m = table.attrs.get("metric", "bits_per_byte")
    dense = table[table["branch"] == "dense"]
    rounds = table[table[f"pruned_{m}"].notna() & (table["level"] > 0)]
    if dense.empty or rounds.empty:
        return False
    before = {(branch, level): bits for branch, level, bits
              in table[["branch", "level", f"final_{m}"]].itertuples(index=False)}
    for row in rounds.itertuples():
        previous = (dense[f"final_{m}"].iloc[0] if row.level == 1
                    else before.get((row.branch, row.level - 1), np.nan))
        if not getattr(row, f"pruned_{m}") >= previous:  # NaN (unknown) counts as not shown
            return False
    return True


def _value(mean, std=np.nan, form: str = ".3f") -> str:
    if mean is None or np.isnan(mean):
        return ""
    return format(mean, form) + ("" if np.isnan(std) else f" ± {std:{form}}")


def markdown_table(summaries: pd.DataFrame, which: str = "early_stop") -> str:
    """`lm_summary` as Markdown, one line per round and branch, and `dense_note` under it
    when it has something to say."""
    table = lm_summary(summaries, which)
    m = table.attrs["metric"]
    label = "early-stop" if which == "early_stop" else which
    lines = [f"| round | branch | steps | params | % dense | {label} test {LABELS[m]} | "
             f"{label} test accuracy (%) | int8 {LABELS[m]} |", "|---" * 8 + "|"]
    for row in table.to_dict("records"):
        lines.append("| " + " | ".join([
            str(row["level"]), row["branch"], _value(row["steps"], form=",.0f"),
            _value(row["params"], form=",.0f"), _value(100 * row["density"], form=".1f"),
            _value(row[m], row[f"{m}_std"]),
            _value(100 * row["accuracy"], form=".1f"), _value(row[f"quantized_{m}"])])
            + " |")
    note = dense_note(table)
    return "\n".join(lines) + "\n" + (f"\n{note}\n" if note else "")
