"""The summary of a record: per level and branch, mean and std over replicates, as a
DataFrame (`summary_table`) and as the one Markdown table (`markdown_table`) that
`lottery report` and the experiments' results.md print. Diverged members (`status:
diverged`) are left out of the means, counted and named.
"""

import pandas as pd


def diverged(summaries: pd.DataFrame) -> pd.Series:
    """Which summary rows are diverged members (`status: diverged`): their early-stop values
    may be the untrained network's, so tables and plots leave them out. A record from before
    the `status` column has none."""
    if "status" not in summaries.columns:
        return pd.Series(False, index=summaries.index)
    return summaries["status"].eq("diverged")


def left_out(summaries: pd.DataFrame) -> str:
    """One line naming the diverged members of `summaries` that a table leaves out of its
    means ("" when there are none), so that a reader sees what the means are not over; each
    named by level, branch and replicate, and by run when the rows come from several."""
    gone = summaries[diverged(summaries)]
    if gone.empty:
        return ""
    runs = "run" in gone.columns and summaries["run"].nunique() > 1
    names = ", ".join((f"{r.run} " if runs else "") + f"level {r.level} {r.branch} r{r.replicate}"
                      for r in gone.itertuples())
    return (f"Left out of the means: {len(gone)} diverged member{'s' * (len(gone) > 1)} "
            f"({names}).\n")


def summary_table(summaries: pd.DataFrame, accuracy: str = "early_stop") -> pd.DataFrame:
    """Test accuracy (`accuracy`: "early_stop", at the minimum validation loss, or "final")
    and the early-stop step, mean and std over replicates, per level and branch (branches in
    the order they ran). Diverged members are left out of the means (`replicates`: members
    averaged) and counted (`diverged`); a group with none left has NaN means."""
    gone = diverged(summaries)
    metric = f"{accuracy}_test_accuracy"
    grouped = summaries.assign(**{metric: summaries[metric].mask(gone),
                                  "early_stop_step": summaries["early_stop_step"].mask(gone),
                                  "ok": ~gone, "diverged": gone}
                               ).groupby(["level", "branch"], sort=False)
    table = grouped.agg(density=("density", "mean"),
                        accuracy_mean=(metric, "mean"), accuracy_std=(metric, "std"),
                        early_stop_step_mean=("early_stop_step", "mean"),
                        early_stop_step_std=("early_stop_step", "std"),
                        replicates=("ok", "sum"), diverged=("diverged", "sum")).reset_index()
    single = table["replicates"] == 1  # one replicate: no spread
    table.loc[single, ["accuracy_std", "early_stop_step_std"]] = 0.0
    return table


def markdown_table(summaries: pd.DataFrame, accuracy: str = "early_stop") -> str:
    """`summary_table` as Markdown: per level, percent remaining, then each branch's
    early-stop iteration and test accuracy (mean ± std over replicates); empty where a
    branch has no member at a level. A cell whose means leave diverged members out says how
    many, and a line under the table names them."""
    table = summary_table(summaries, accuracy)
    branches = list(dict.fromkeys(table["branch"]))
    label = "early-stop" if accuracy == "early_stop" else accuracy
    lines = ["| level | % remaining | " + " | ".join(
        f"{b} early-stop iter | {b} {label} test acc (%)" for b in branches) + " |",
        "|---" * (2 + 2 * len(branches)) + "|"]
    for level, rows in table.groupby("level", sort=True):
        cells = [str(level), f"{100 * rows['density'].iloc[0]:.1f}"]
        for branch in branches:
            found = rows[rows["branch"] == branch]
            if found.empty:  # a branch that has no member at this level (an LM run's dense)
                cells += ["", ""]
                continue
            row = found.iloc[0]
            note = f" ({row.diverged} diverged)" if row.diverged else ""
            cells += (["—", "—" + note] if not row.replicates else
                      [f"{row.early_stop_step_mean:.0f} ± {row.early_stop_step_std:.0f}",
                       f"{100 * row.accuracy_mean:.2f} ± {100 * row.accuracy_std:.2f}{note}"])
        lines.append("| " + " | ".join(cells) + " |")
    note = left_out(summaries)
    return "\n".join(lines) + "\n" + ("\n" + note if note else "")
