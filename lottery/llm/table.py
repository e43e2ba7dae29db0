"""`lottery llm`'s summary rows as a table and for `lottery report`: per model, method and
sparsity, the perplexity (lower is better), the density of the blocks' linear weights, the
seconds pruning took and of them the pruning rules' (the rest: calibration passes); several
runs of the same (a sweep that evaluated the dense model
in each job) are one line, their mean."""

from pathlib import Path

import pandas as pd

ORDER = ("dense", "magnitude", "wanda", "sparsegpt")


def is_llm(summaries: pd.DataFrame) -> bool:
    """Whether summary rows are `lottery llm` rows (a sparsity each, no training; perplexity
    unless the run evaluated nothing)."""
    return "sparsity" in summaries.columns and "final_step" not in summaries.columns


def sparsity_order(value: str) -> tuple:
    """Unstructured fractions in order, then N:M patterns by their kept fraction."""
    if ":" in str(value):
        n, m = (int(part) for part in str(value).split(":"))
        return (1, 1 - n / m, m)
    return (0, float(value), 0)


def llm_summary(summaries: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, method, sparsity): mean perplexity, density, prune seconds."""
    frame = summaries.copy()
    for column in ("perplexity", "prune_seconds", "rule_seconds"):
        if column not in frame.columns:
            frame[column] = float("nan")
    frame["sparsity"] = frame["sparsity"].astype(str)
    table = (frame.groupby(["model", "branch", "sparsity"], sort=False)
             .agg(perplexity=("perplexity", "mean"), density=("density", "mean"),
                  seconds=("prune_seconds", "mean"), rule_seconds=("rule_seconds", "mean"),
                  runs=("branch", "size"))
             .reset_index())
    rank = {name: i for i, name in enumerate(ORDER)}
    table["_s"] = table["sparsity"].map(sparsity_order)
    table["_m"] = table["branch"].map(lambda b: rank.get(b, len(rank)))
    return table.sort_values(["model", "_s", "_m"]).drop(columns=["_s", "_m"])


def markdown_table(summaries: pd.DataFrame, accuracy: str | None = None) -> str:
    """The summary as Markdown (`accuracy` is ignored: there is no training to stop)."""
    def cell(value, form):
        return "" if value != value else format(value, form)

    lines = ["| model | method | sparsity | density | perplexity | seconds | of which rules |",
             "|---|---|---|---|---|---|---|"]
    for row in llm_summary(summaries).to_dict("records"):
        lines.append(f"| {Path(str(row['model'])).name} | {row['branch']} | {row['sparsity']} | "
                     f"{cell(row['density'], '.1%')} | {cell(row['perplexity'], '.3f')} | "
                     f"{cell(row['seconds'], '.1f')} | {cell(row['rule_seconds'], '.1f')} |")
    return "\n".join(lines) + "\n"
