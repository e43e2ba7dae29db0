"""`lottery lm key=value ...`: the transformer prune-to-budget run (conf/lm.yaml), a Hydra app
of its own, dispatched by `lottery.cli.main` before the IMP app parses anything.

    lottery lm experiment=lm_tiny
    lottery lm experiment=transformer_budget prune.score=wanda budget.params_fraction=0.3

A bad request (unknown key or name, a budget the model already meets or cannot reach, a
removal the model cannot take, a bad fraction; in a sweep, `-m`, any job's) stops before
training: one line on stderr, exit status 2, through the pre-check `lottery` uses
(`lottery.overrides`), and so does a run directory another process is writing
(`lottery.rundir`).
At the end, a table of every summary row, test bits per byte first (`print_table`), and, when
models pruned from the dense one beat it, one line saying why.
"""

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import lottery.identity  # noqa: F401  (registers ${lottery_id:} before Hydra composes)
from lottery import overrides
from lottery.lm.config import ConfigError, LMConfig, validate  # (registers the schema)
from lottery.terminal import finished

CONF_DIR = str(Path(__file__).resolve().parent.parent.parent / "conf")
CONFIG_NAME = "lm"
PROGRAM = "lottery lm"  # the messages' prefix: `lottery lm: error: ...`


def compose(args: list[str]) -> DictConfig:
    """The composed `lm` config (tests use it)."""
    return overrides.compose(CONF_DIR, CONFIG_NAME, args)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=CONFIG_NAME)
def hydra_main(cfg: DictConfig) -> None:
    from lottery.rundir import exclusive

    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    try:
        run_cfg = validate(cfg)
        if run_cfg.model.path or run_cfg.model.name:  # a pretrained model's loop
            from lottery.llm import budget
        else:
            from lottery.lm import budget
        out_dir = Path(HydraConfig.get().runtime.output_dir)
        with exclusive(out_dir):  # one writer per run directory, as for `lottery`
            summaries = budget.run(run_cfg, out_dir)
    except ConfigError as error:
        overrides.refuse_job(str(error), PROGRAM)
    if run_cfg.logger.name == "wandb":  # the W&B summary run, with figures drawn here
        from lottery.analysis.plots import summary_figures
        from lottery.record import wandb_summary

        wandb_summary(out_dir, summary_figures(summaries, out_dir, run_cfg.name))
    print_table(summaries)
    finished(out_dir, overrides.sweep_dir(), PROGRAM)


def print_table(summaries) -> None:
    """Every summary row: training steps, size, test bits per byte (the main metric; lower
    is better; a pretrained model's: perplexity) and next-token accuracy, speed, and the int8
    model's; under it, when a model pruned from the dense one beats it, the line saying why
    (`lottery.lm.table.dense_note`)."""
    from rich.console import Console
    from rich.table import Table

    from lottery.lm.table import LABELS, dense_note, lm_summary, metric_of

    metric = metric_of(summaries)
    label = LABELS[metric]
    view = Table(title=f"transformer pruned to budget: test {label}, lower is better "
                       "(int8 = quantized)")
    columns = ("round", "branch", "steps", "params", "% dense", label, "accuracy",
               f"int8 {label}", "bytes", "tokens/s", "int8 bytes", "int8 tokens/s")
    for column in columns:
        view.add_column(column, justify="left" if column == "branch" else "right")

    def cell(row, key, form):
        value = row.get(key)
        return "" if value is None or value != value else format(value, form)

    for row in summaries.to_dict("records"):
        view.add_row(str(row["level"]), row["branch"], cell(row, "final_step", ",.0f"),
                     cell(row, "params", ",.0f"), cell(row, "density", ".1%"),
                     cell(row, metric, ".3f"), cell(row, "test_accuracy", ".1%"),
                     cell(row, f"quantized_{metric}", ".3f"), cell(row, "bytes", ",.0f"),
                     cell(row, "tokens_per_second", ",.0f"),
                     cell(row, "quantized_bytes", ",.0f"),
                     cell(row, "quantized_tokens_per_second", ",.0f"))
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # a log file: no terminal to wrap to
    console.print(view)
    note = dense_note(lm_summary(summaries, "final"))
    if note:
        console.print(note, highlight=False)


def main(argv: list[str] | None = None) -> None:
    """`argv`: the arguments after `lm`."""
    argv = sys.argv[2:] if argv is None else list(argv)
    overrides.check_overrides(argv, CONF_DIR, CONFIG_NAME, validate, LMConfig, PROGRAM)
    sys.argv = ["lottery lm", *argv]
    hydra_main()
