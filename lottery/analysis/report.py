"""`lottery report DIR`: the standard plots and a Markdown summary of a run or a sweep.

    lottery report outputs/lenet_mnist/<run id>                   # one run
    lottery report multirun/lenet_mnist                           # the runs of -m sweeps

Writes into DIR (or `--out`): `report.md` (per combination of a sweep's swept values, the
summary table of `lottery.record.markdown_table`: per level and branch, early-stop step and
test accuracy, mean ± std over replicates and seeds: a `seed=0,1` sweep of 2 replicates is
one table of 4 networks per cell, `--by seed` splits it; run folders of one run, the same run
id, counted once and named in one line), `accuracy_vs_density.png`, `early_stop_vs_density.png`,
`learning_curves.png` and, when the sweep varies `rewind.step`, `rewind_sweep.png`. For a
`lottery lm` run, test bits per byte is the main metric: the table is
`lottery.lm.table.markdown_table` (per round and branch: training steps, parameters, test
bits per byte, then next-byte accuracy and the int8 model's bits per byte; under it, when
models pruned from the dense one beat it, the line saying why), and the plots are
`bits_per_byte_vs_density.png`, `early_stop_vs_density.png` and the learning curves of bits
per byte. For `lottery llm` runs (one-shot pruning of a pretrained model) the table is
`lottery.llm.table.markdown_table` (per model, method and sparsity: density, perplexity,
seconds) and the plot `perplexity_vs_sparsity.png`. A missing directory or one without a record stops with one line on stderr and
exit status 2. Members whose training diverged are left out of every table and plot;
report.md says how many and which.
"""

import argparse
import sys
from pathlib import Path

import pandas as pd

from lottery.analysis import plots, results
from lottery.llm import table as llm_table
from lottery.lm import table as lm_table
from lottery.record import diverged, markdown_table

REWIND = "rewind.step"


def _fail(message: str) -> int:
    print(f"lottery: error: {message}", file=sys.stderr)
    return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lottery report",
        description="Plots and a Markdown summary (report.md) of a run or a Hydra sweep.")
    parser.add_argument("path", type=Path, help="a run directory or a multirun sweep directory")
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write report.md and the PNGs (default: PATH)")
    parser.add_argument("--branch", default="ticket",
                        help="branch whose learning curves are plotted (default: ticket)")
    parser.add_argument("--level", type=int, default=None,
                        help="level of the rewind-step sweep plot (default: the sparsest "
                             "level every run reached)")
    parser.add_argument("--accuracy", choices=("early_stop", "final"), default="early_stop",
                        help="test accuracy (an LM run: bits per byte) at early stop (default) "
                             "or at the end of training")
    parser.add_argument("--by", action="append", default=[], metavar="KEY",
                        help="also split the tables and plots by this config key (repeatable); "
                             "seeds are pooled like replicates unless --by seed")
    return parser


def markdown_tables(summaries: pd.DataFrame, accuracy: str = "early_stop", by=()) -> str:
    """`lottery.record.markdown_table` once per combination of the split keys
    (`results.split`: the swept overrides but the seed, plus `by`), under a heading naming
    it (one table for a single run); `lottery lm` runs' table is `lottery.lm.table`'s."""
    table = lm_table.markdown_table if lm_table.is_lm(summaries) else markdown_table
    return "\n".join((f"## {name}\n\n" if name else "") + table(rows, accuracy)
                     for name, rows in plots._panels(summaries, results.split(summaries, by)))


def _values(frame: pd.DataFrame, column: str) -> str:
    return ", ".join(map(results.text, frame[column].drop_duplicates()))


def _header(path: Path, summaries: pd.DataFrame, accuracy: str, by=()) -> str:
    """What was loaded: the runs (and run folders counted once), what the sweep varied,
    what was pooled, and the overrides common to all."""
    columns = results.split(summaries, by)
    pooled = [c for c in results.swept(summaries) if c not in columns]
    fixed = [c for c in results.overrides(summaries)
             if c not in columns and c not in pooled]
    first = summaries.iloc[0]
    when = ("early stop (minimum validation loss)" if accuracy == "early_stop"
            else "the end of training")
    gone = int(diverged(summaries).sum())
    counts = summaries.groupby([*columns, "level", "branch"], dropna=False).size()
    metric = ("Test accuracy" if not lm_table.is_lm(summaries) else
              "Test bits per byte (lower is better)"
              if lm_table.metric_of(summaries) == "bits_per_byte" else
              "Test perplexity per token (lower is better)")
    n = (f"{counts.min()}" if counts.min() == counts.max()
         else f"{counts.min()} to {counts.max()}")
    of = "".join(f", {summaries[c].nunique(dropna=False)} values of `{c}` pooled"
                 for c in pooled)
    lines = [f"# Report: {path}\n",
             (f"{summaries['run'].nunique()} run(s), {len(summaries)} trained networks"
              + (f", {gone} of them diverged: left out of the tables and plots, and named "
                 "under each table" if gone else "")
              + f". {metric} at {when}; mean ± std over {n} replicates per level and "
                "branch" + of + (" (diverged ones left out)" if gone else "") + ".\n")]
    duplicates = summaries.attrs.get("duplicates", [])
    if duplicates:
        lines.append("Counted once: " + "; ".join(
            f"`{left}` is the same run as `{kept}` (run {identity})"
            for kept, left, identity in duplicates) + ", so it is left out.\n")
    if columns:
        lines.append("Swept: " + ", ".join(f"`{c}` ({_values(summaries, c)})" for c in columns)
                     + ".\n")
    if pooled:
        lines.append("Pooled: " + ", ".join(f"`{c}` ({_values(summaries, c)})" for c in pooled)
                     + ": its runs are replicates of one experiment (" + " ".join(
                         f"`--by {c}`" for c in pooled) + " splits them).\n")
    if fixed:
        lines.append("Overrides: " + " ".join(f"`{c}={results.text(first[c])}`"
                                              for c in fixed) + "\n")
    return "\n".join(lines) + "\n"


def write_report(path: Path, out: Path | None = None, branch: str = "ticket",
                 level: int | None = None, accuracy: str = "early_stop", by=()) -> list[Path]:
    """Write report.md and the PNGs of the run or sweep at `path` into `out` (default:
    `path`), split by the swept keys but the seed, and by `by`; returns the files written."""
    out = Path(path) if out is None else Path(out)
    out.mkdir(parents=True, exist_ok=True)
    by = list(by)
    summaries = results.load(path, kind="summary", keys=by)
    columns = results.split(summaries, by)
    lm = lm_table.is_lm(summaries)
    if llm_table.is_llm(summaries):  # one-shot pruning: no training, no learning curves
        return _llm_report(path, out, summaries)
    metric = lm_table.metric_of(summaries) if lm else "test_accuracy"
    words = metric.replace("_", " ")
    written = [
        plots.plot_metric_vs_density(
            summaries, out / f"{metric}_vs_density.png", f"{accuracy}_{metric}",
            f"test {words} at early stop" if accuracy == "early_stop"
            else f"{accuracy} test {words}", columns) if lm else
        plots.plot_accuracy_vs_density(summaries, out / "accuracy_vs_density.png", columns,
                                       accuracy),
        plots.plot_early_stop_vs_density(summaries, out / "early_stop_vs_density.png", columns),
    ]
    evals = results.healthy(results.load(path, kind="eval", keys=by), summaries)
    if branch in set(evals["branch"]):
        written.append(plots.plot_learning_curves(
            evals, out / "learning_curves.png", branch, results.split(evals, by), metric))
    if REWIND in columns:
        others = [c for c in columns if c != REWIND]
        written.append(plots.plot_rewind_sweep(summaries, out / "rewind_sweep.png", level,
                                               others, accuracy))
    return _written(out, path, summaries, written, accuracy, by)


def _llm_report(path: Path, out: Path, summaries) -> list[Path]:
    """A `lottery llm` run or sweep: one table (model, method and sparsity are its rows,
    not panels) and the perplexity plot."""
    plot = plots.plot_perplexity_vs_sparsity(summaries, out / "perplexity_vs_sparsity.png")
    models = summaries[summaries["branch"] != "dense"]
    report = out / "report.md"
    report.write_text(
        f"# Report: {path}\n\n{summaries['run'].nunique()} run(s), {len(models)} pruned "
        "model(s). Perplexity (lower is better) on the evaluation windows; one line per "
        "model, method and sparsity (the mean where several runs evaluated the same); "
        "density: the kept fraction of the blocks' linear weights; seconds: pruning, "
        "calibration passes included.\n\n" + llm_table.markdown_table(summaries)
        + f"\n## Plots\n\n![perplexity vs sparsity]({plot.name})\n")
    return [report, plot]


def _written(out: Path, path: Path, summaries, written: list[Path], accuracy, by) -> list[Path]:
    """report.md (header, tables, the plots' images) beside the plots; all the files."""
    images = "\n".join(f"![{file.stem.replace('_', ' ')}]({file.name})" for file in written)
    report = out / "report.md"
    report.write_text(_header(path, summaries, accuracy, by)
                      + markdown_tables(summaries, accuracy, by)
                      + "\n## Plots\n\n" + images + "\n")
    return [report, *written]


def main(argv: list[str] | None = None) -> int:
    """`lottery report PATH [options]`; `argv` is the arguments after `report`. Returns the
    exit status: 0, or 2 with one line on stderr when PATH holds no run record."""
    args = _parser().parse_args(sys.argv[2:] if argv is None else argv)
    if not args.path.is_dir():
        return _fail(f"no such directory: {args.path}")
    try:
        written = write_report(args.path, args.out, args.branch, args.level, args.accuracy,
                               args.by)
    except ValueError as error:  # no record or no summary rows; --level beyond the levels
        return _fail(str(error))
    for file in written:
        print(f"lottery: wrote {file}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
