"""The table of the Frankle & Carbin (2019) LeNet-300-100 reproduction from its record (the
plots come from `lottery report`: see README.md).

    python experiments/frankle_carbin_2019/summarise.py [RUN_DIR]

Writes `results.md` (early-stop iteration and test accuracy per density and branch, mean ±
std over replicates) beside this file.
"""

import sys
from pathlib import Path

from lottery.record import load, markdown_table, summary_table

HERE = Path(__file__).resolve().parent


def main() -> None:
    run = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "run"
    summaries = load(run, kind="summary")
    replicates = int(summary_table(summaries)["replicates"].min())
    text = (f"Mean ± std over {replicates} replicates; early stop = minimum validation loss.\n\n"
            + markdown_table(summaries))
    (HERE / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
