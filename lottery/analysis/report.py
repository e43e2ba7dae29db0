"""`lottery report DIR`: the standard plots and a Markdown summary of a run or a sweep.

    lottery report outputs/lenet_mnist/5c0ffee123                 # one run
    lottery report multirun/default                               # Hydra -m sweeps' runs

Writes into DIR (or `--out`): `report.md` (per override combination of a sweep, the summary
table of `lottery.record.markdown_table`: per level and branch, early-stop step and test
accuracy, mean ± std over replicates), `accuracy_vs_density.png`, `early_stop_vs_density.png`,
`learning_curves.png` and, when the sweep varies `rewind.step`, `rewind_sweep.png`. A missing
directory or one without a record stops with one line on stderr and exit status 2. Members
whose training diverged are left out of every table and plot; report.md says how many and
which.
"""

import argparse
import sys
from pathlib import Path

import pandas as pd

from lottery.analysis import plots, results
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
                        help="test accuracy at early stop (default) or at the end of training")
    return parser


def markdown_tables(summaries: pd.DataFrame, accuracy: str = "early_stop") -> str:
    """`lottery.record.markdown_table` once per combination of the swept overrides, under a
    heading naming it (one table for a single run)."""
    return "\n".join((f"## {name}\n\n" if name else "") + markdown_table(rows, accuracy)
                     for name, rows in plots._panels(summaries, results.swept(summaries)))


def _header(path: Path, summaries: pd.DataFrame, accuracy: str) -> str:
    """What was loaded: the runs, what the sweep varied and the overrides common to all."""
    columns = results.swept(summaries)
    fixed = [c for c in results.overrides(summaries) if c not in columns]
    first = summaries.iloc[0]
    when = ("early stop (minimum validation loss)" if accuracy == "early_stop"
            else "the end of training")
    gone = int(diverged(summaries).sum())
    counts = summaries.groupby([*columns, "level", "branch"], dropna=False).size()
    n = (f"{counts.min()}" if counts.min() == counts.max()
         else f"{counts.min()} to {counts.max()}")
    lines = [f"# Report: {path}\n",
             (f"{summaries['run'].nunique()} run(s), {len(summaries)} trained networks"
              + (f", {gone} of them diverged: left out of the tables and plots, and named "
                 "under each table" if gone else "")
              + f". Test accuracy at {when}; mean ± std over {n} replicates per level and "
                "branch" + (" (diverged ones left out)" if gone else "") + ".\n")]
    if columns:
        lines.append("Swept: " + ", ".join(
            f"`{c}` ({', '.join(map(str, summaries[c].drop_duplicates()))})" for c in columns)
            + ".\n")
    if fixed:
        lines.append("Overrides: " + " ".join(f"`{c}={first[c]}`" for c in fixed) + "\n")
    return "\n".join(lines) + "\n"


def write_report(path: Path, out: Path | None = None, branch: str = "ticket",
                 level: int | None = None, accuracy: str = "early_stop") -> list[Path]:
    """Write report.md and the PNGs of the run or sweep at `path` into `out` (default:
    `path`); returns the files written."""
    out = Path(path) if out is None else Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summaries = results.load(path, kind="summary")
    columns = results.swept(summaries)
    written = [
        plots.plot_accuracy_vs_density(summaries, out / "accuracy_vs_density.png", columns,
                                       accuracy),
        plots.plot_early_stop_vs_density(summaries, out / "early_stop_vs_density.png", columns),
    ]
    evals = results.healthy(results.load(path, kind="eval"), summaries)
    if branch in set(evals["branch"]):
        written.append(plots.plot_learning_curves(evals, out / "learning_curves.png", branch,
                                                  results.swept(evals)))
    if REWIND in columns:
        others = [c for c in columns if c != REWIND]
        written.append(plots.plot_rewind_sweep(summaries, out / "rewind_sweep.png", level,
                                               others, accuracy))
    images = "\n".join(f"![{file.stem.replace('_', ' ')}]({file.name})" for file in written)
    report = out / "report.md"
    report.write_text(_header(path, summaries, accuracy) + markdown_tables(summaries, accuracy)
                      + "\n## Plots\n\n" + images + "\n")
    return [report, *written]


def main(argv: list[str] | None = None) -> int:
    """`lottery report PATH [options]`; `argv` is the arguments after `report`. Returns the
    exit status: 0, or 2 with one line on stderr when PATH holds no run record."""
    args = _parser().parse_args(sys.argv[2:] if argv is None else argv)
    if not args.path.is_dir():
        return _fail(f"no such directory: {args.path}")
    try:
        written = write_report(args.path, args.out, args.branch, args.level, args.accuracy)
    except ValueError as error:  # no record or no summary rows; --level beyond the levels
        return _fail(str(error))
    for file in written:
        print(f"lottery: wrote {file}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
