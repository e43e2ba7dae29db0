"""The README's tables from the sweeps' records (experiments/llm_oneshot/run.sh writes them):

    python experiments/llm_oneshot/summarise.py OUT     (OUT as given to run.sh)

Per model, method and sparsity: perplexity, seconds (all; the rules alone, summed over
the layer rows), and the layers' reconstruction error on the calibration data relative to each layer's output energy (mean
and max over the linear layers), from the `summary` and `layer` rows."""

import sys
from pathlib import Path

import pandas as pd

from lottery.analysis.results import load
from lottery.llm.table import llm_summary


def table(sweep: Path) -> str:
    rows = load(sweep)
    summary = rows[rows["kind"] == "summary"]
    summaries = llm_summary(summary)
    sparsity = summary[summary["branch"] != "dense"].set_index("run")["sparsity"].astype(str)
    layers = rows[rows["kind"] == "layer"].assign(sparsity=lambda f: f["run"].map(sparsity))
    errors = (layers.groupby(["branch", "sparsity"])["relative_error"].agg(["mean", "max"])
              if "relative_error" in layers else pd.DataFrame(columns=["mean", "max"]))
    rules = layers.groupby(["branch", "sparsity"])["seconds"].sum()  # each run's rules
    summaries["rule_seconds"] = [rules.get((b, s), float("nan"))
                                 for b, s in zip(summaries["branch"], summaries["sparsity"])]
    lines = ["| method | sparsity | perplexity | seconds | of which rules | layer error mean | max |",
             "|---|---|---|---|---|---|---|"]
    for row in summaries.to_dict("records"):
        error = errors.loc[(row["branch"], row["sparsity"])] \
            if (row["branch"], row["sparsity"]) in errors.index else None
        cells = [row["branch"], row["sparsity"],
                 "" if row["perplexity"] != row["perplexity"] else f"{row['perplexity']:.3f}",
                 "" if row["seconds"] != row["seconds"] else f"{row['seconds']:.1f}",
                 "" if row["rule_seconds"] != row["rule_seconds"] else f"{row['rule_seconds']:.1f}",
                 "" if error is None else f"{error['mean']:.4f}",
                 "" if error is None else f"{error['max']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    for name in ("byte", "gpt2"):
        print(f"## {name}\n\n{table(out / 'multirun' / name)}\n")
