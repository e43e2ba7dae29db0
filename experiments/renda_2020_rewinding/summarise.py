"""Tables and plots of weight rewinding vs learning-rate rewinding vs fine-tuning (Renda et
al. 2020) from the records of `experiment=renda_lenet_mnist` (README.md beside this file).

    python experiments/renda_2020_rewinding/summarise.py [RUN_DIR]

Writes `results.md` (early-stop iteration and test accuracy per density, one column pair
per retraining mode, mean ± std over replicates) and `rewinding_vs_finetuning.png` beside
this file.
"""

import sys
from pathlib import Path

import pandas as pd

from lottery.analysis.plots import plot_tickets_vs_controls
from lottery.record import load, markdown_table

HERE = Path(__file__).resolve().parent
MODES = {"weights": "weight rewinding", "lr": "LR rewinding", "finetune": "fine-tuning"}


def main() -> None:
    run = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "run"
    # one "branch" per retraining mode (each run trains the ticket only)
    summaries = pd.concat([load(run / mode, kind="summary").assign(branch=label)
                           for mode, label in MODES.items() if (run / mode).exists()])
    replicates = summaries.groupby(["level", "branch"]).size().min()
    text = (f"Mean ± std over {replicates} replicates; level 0 is the dense network.\n\n"
            + markdown_table(summaries))
    (HERE / "results.md").write_text(text)
    plot_tickets_vs_controls(summaries, HERE / "rewinding_vs_finetuning.png",
                             "LeNet-300-100 / MNIST: retraining after each pruning level")
    print(text)


if __name__ == "__main__":
    main()
