"""Table and plot of the Frankle & Carbin (2019) LeNet-300-100 reproduction from its record.

    python experiments/frankle_carbin_2019/summarise.py [RUN_DIR]

Writes `results.md` (early-stop iteration and test accuracy per density and branch, mean ±
std over replicates) and `tickets_vs_controls.png` beside this file.
"""

import sys
from pathlib import Path

from lottery.analysis.plots import plot_tickets_vs_controls
from lottery.record import load, summary_table

HERE = Path(__file__).resolve().parent


def main() -> None:
    run = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "run"
    summaries = load(run, kind="summary")
    table = summary_table(summaries)
    branches = list(dict.fromkeys(table["branch"]))
    lines = ["| level | % remaining | " + " | ".join(
        f"{b} early-stop iter | {b} test acc (%)" for b in branches) + " |",
        "|---" * (2 + 2 * len(branches)) + "|"]
    for level, rows in table.groupby("level", sort=True):
        cells = [str(level), f"{100 * rows['density'].iloc[0]:.1f}"]
        for branch in branches:
            row = rows[rows["branch"] == branch].iloc[0]
            cells += [f"{row.early_stop_step_mean:.0f} ± {row.early_stop_step_std:.0f}",
                      f"{100 * row.accuracy_mean:.2f} ± {100 * row.accuracy_std:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    replicates = int(table["replicates"].min())
    text = (f"Mean ± std over {replicates} replicates; early stop = minimum validation loss.\n\n"
            + "\n".join(lines) + "\n")
    (HERE / "results.md").write_text(text)
    plot_tickets_vs_controls(summaries, HERE / "tickets_vs_controls.png",
                             "LeNet-300-100 on MNIST: IMP tickets vs controls")
    print(text)


if __name__ == "__main__":
    main()
