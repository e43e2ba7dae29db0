"""Tables and plots of the MNIST-1D lottery-ticket reproduction (Greydanus & Kobak) from its
record.

    python experiments/greydanus_mnist1d/summarise.py [RUN_DIR]

Writes `results.md` (test accuracy at the end of training and at early stop, with the
early-stop iteration, per density and branch, mean ± std over replicates) and
`tickets_vs_controls.png` (final test accuracy) beside this file.
"""

import sys
from pathlib import Path

from lottery.analysis.plots import plot_tickets_vs_controls
from lottery.record import load, markdown_table, summary_table

HERE = Path(__file__).resolve().parent


def main() -> None:
    run = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "run"
    summaries = load(run, kind="summary")
    replicates = int(summary_table(summaries)["replicates"].min())
    text = (f"Mean ± std over {replicates} replicates.\n\n"
            "## Test accuracy at the end of training (step 1501)\n\n"
            + markdown_table(summaries, accuracy="final")
            + "\n## Test accuracy at early stop (minimum validation loss)\n\n"
            + markdown_table(summaries))
    (HERE / "results.md").write_text(text)
    plot_tickets_vs_controls(summaries, HERE / "tickets_vs_controls.png",
                             "MNIST-1D MLP: IMP tickets vs controls", accuracy="final")
    print(text)


if __name__ == "__main__":
    main()
