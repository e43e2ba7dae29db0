"""The results table (Markdown) and plot (bits per byte vs parameters) of a `lottery lm` run,
from its record; optionally re-timing every architecture in one quiet process.

    python experiments/transformer_budget/results.py experiments/transformer_budget/run \
        --out experiments/transformer_budget [--measure]

--measure: tokens/s are measured during the run, one model at a time, while the machine does
other work; this re-measures each result's architecture (float32 and int8, random weights
of the same shapes: speed does not depend on the values) in this process, the best of 3
interleaved passes, and adds those columns. Writes `results.md` and
`bits_per_byte_vs_params.png` into `--out` (default: the run directory).
"""

import argparse
import sys
from pathlib import Path

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from lottery.lm import gpt, measure, quantize  # noqa: E402
from lottery.record import load  # noqa: E402

STYLE = {"dense": ("k", "*"), "prune": ("C0", "o"), "prune_kd": ("C1", "s"),
         "scratch": ("C2", "^"), "ticket": ("C3", "D")}


def results(run: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(all summary rows, the rows of the table: dense and each budget's results, config)."""
    rows = load(run, "summary")
    config = load(run, "run")["config"][0]
    marked = rows["budget_targets"].notna() if "budget_targets" in rows else False
    table = rows[(rows["branch"] == "dense") | marked
                 | rows["branch"].isin(["scratch", "ticket"])].copy()
    return rows, table, config


def remeasure(table: pd.DataFrame, config: dict, batch: int = 32, repeats: int = 10,
              passes: int = 3) -> pd.DataFrame:
    """Each architecture's tokens/s (float32 and int8), the best of `passes` interleaved
    passes (each the median of `repeats` calls): other work on a shared machine only ever
    slows a measurement down."""
    m = config["model"]
    models = {}
    for index, row in table.iterrows():
        dense = row["branch"] == "dense"
        layers = m["layers"] if dense else int(row["layers"])
        cfg = gpt.GPTConfig(256, m["context"], m["d_model"],
                            m["head_dim"] or m["d_model"] // m["heads"],
                            tuple([m["heads"]] * layers if dense else row["heads"]),
                            tuple([m["ffn"]] * layers if dense else row["ffn"]))
        params = gpt.init(cfg, jax.random.key(0))
        models[index] = (cfg, params, quantize.quantize(params))
    table = table.copy()
    table["remeasured_tokens_per_second"] = 0.0
    table["remeasured_int8_tokens_per_second"] = 0.0
    for _ in range(passes):
        for index, (cfg, params, q) in models.items():
            for column, weights in (("remeasured_tokens_per_second", params),
                                    ("remeasured_int8_tokens_per_second", q)):
                speed = measure.tokens_per_second(cfg, weights, batch, repeats=repeats)
                table.loc[index, column] = max(table.loc[index, column], speed)
    return table


def markdown(table: pd.DataFrame) -> str:
    timed = "remeasured_tokens_per_second" in table
    head = ["model", "round", "params", "% of dense", "bytes (fp32)", "bytes (int8)",
            "test bits/byte", "int8 bits/byte", "test ppl", "int8 ppl", "next-byte acc",
            "tokens/s (run)"] + (["tokens/s fp32", "tokens/s int8"] if timed else [])
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for row in table.to_dict("records"):
        cells = [row["branch"], str(row["level"]), f"{row['params']:,.0f}",
                 f"{100 * row['density']:.1f}", f"{row['bytes']:,.0f}",
                 f"{row['quantized_bytes']:,.0f}", f"{row['bits_per_byte']:.3f}",
                 f"{row['quantized_bits_per_byte']:.3f}", f"{row['perplexity']:.3f}",
                 f"{row['quantized_perplexity']:.3f}", f"{100 * row['test_accuracy']:.1f}%",
                 f"{row['tokens_per_second']:,.0f}"]
        if timed:
            cells += [f"{row['remeasured_tokens_per_second']:,.0f}",
                      f"{row['remeasured_int8_tokens_per_second']:,.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: pd.DataFrame, table: pd.DataFrame, path: Path) -> Path:
    figure, ax = plt.subplots(figsize=(7, 4.5))
    for branch, group in rows.groupby("branch", sort=False):
        color, marker = STYLE.get(branch, ("C7", "x"))
        group = group.sort_values("params")
        ax.plot(group["params"], group["bits_per_byte"], marker=marker, color=color,
                linestyle="-" if branch.startswith("prune") else "none", label=branch)
        quantized = table[(table["branch"] == branch)]
        ax.scatter(quantized["params"], quantized["quantized_bits_per_byte"], marker=marker,
                   facecolors="none", edgecolors=color, s=60)
    ax.scatter([], [], marker="o", facecolors="none", edgecolors="k", label="int8 (hollow)")
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("test bits per byte (lower is better)")
    ax.set_title("byte-level transformer pruned to budget vs same-size controls")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--measure", action="store_true")
    args = parser.parse_args(argv)
    rows, table, config = results(args.run)
    if args.measure:
        table = remeasure(table, config)
    out = args.run if args.out is None else args.out
    (out / "results.md").write_text(markdown(table))
    plot(rows, table, out / "bits_per_byte_vs_params.png")
    print(markdown(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
