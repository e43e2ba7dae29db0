"""Tables and plots of the pruning-at-initialisation sanity checks (Frankle et al. 2021) from
the records of `experiment=pai_mnist1d` (README.md beside this file has the commands).

    python experiments/frankle_2021_pai/summarise.py [RUN_DIR]

Writes `results.md` (test accuracy at early stop per density and branch, mean ± std over
replicates, one table per method) and `sanity_checks.png` (one panel per method) beside
this file.
"""

import sys
from pathlib import Path

from lottery.analysis.plots import plot_accuracy_panels
from lottery.record import load, markdown_table

HERE = Path(__file__).resolve().parent
METHODS = {"magnitude": "magnitude at init", "snip": "SNIP", "grasp": "GraSP",
           "synflow": "SynFlow", "random": "random", "imp": "IMP (magnitude, trained, iterative)"}


def main() -> None:
    run = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "run"
    panels = {title: load(run / name, kind="summary") for name, title in METHODS.items()
              if (run / name / "record.jsonl").exists()}
    panels = {title: summaries for title, summaries in panels.items() if len(summaries)}
    text = "".join(f"## {title}\n\n{markdown_table(summaries)}\n"
                   for title, summaries in panels.items())
    (HERE / "results.md").write_text(
        "Test accuracy (%) at early stop (minimum validation loss), mean ± std over 3 "
        "replicates; level 0 is the dense network.\n\n" + text)
    plot_accuracy_panels(panels, HERE / "sanity_checks.png",
                         "MNIST-1D MLP: pruning at init vs its sanity checks, and IMP")
    print(text)


if __name__ == "__main__":
    main()
