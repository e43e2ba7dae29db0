"""`lottery llm key=value ...`: one-shot pruning of a pretrained language model
(conf/llm.yaml), a Hydra app of its own, dispatched by `lottery.cli.main`.

    lottery llm model.path=DIR prune.method=wanda prune.sparsity=0.5 \\
        calibration.path=FILE eval.path=FILE save=OUT_DIR

A bad request (unknown key or value, a model folder that cannot be read, a hub that cannot
be reached, too little text) stops before pruning: one line on stderr, exit status 2,
through the pre-check `lottery` uses (`lottery.overrides`). At the end, the summary rows as
a table: perplexity of the dense and the pruned model, density, seconds.
"""

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import lottery.identity  # noqa: F401  (registers ${lottery_id:} before Hydra composes)
from lottery import overrides
from lottery.llm.config import ConfigError, LLMConfig, validate  # (registers the schema)
from lottery.terminal import finished

CONF_DIR = str(Path(__file__).resolve().parent.parent.parent / "conf")
CONFIG_NAME = "llm"
PROGRAM = "lottery llm"


def compose(args: list[str]) -> DictConfig:
    """The composed `llm` config (tests use it)."""
    return overrides.compose(CONF_DIR, CONFIG_NAME, args)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=CONFIG_NAME)
def hydra_main(cfg: DictConfig) -> None:
    from lottery.llm import run
    from lottery.rundir import exclusive

    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    try:
        run_cfg = validate(cfg)
        out_dir = Path(HydraConfig.get().runtime.output_dir)
        with exclusive(out_dir):
            summaries = run.run(run_cfg, out_dir)
    except ConfigError as error:
        overrides.refuse_job(str(error), PROGRAM)
    print_table(summaries)
    finished(out_dir, overrides.sweep_dir(), PROGRAM)


def print_table(summaries) -> None:
    """The dense and pruned models: method, sparsity, density, perplexity, seconds (and of
    them the pruning rules')."""
    from rich.console import Console
    from rich.table import Table

    view = Table(title="one-shot pruning: perplexity, lower is better")
    for column in ("model", "method", "sparsity", "density", "perplexity", "seconds",
                   "of which rules"):
        view.add_column(column, justify="left" if column in ("model", "method") else "right")
    def cell(row, key, form):
        value = row.get(key)
        return "" if value is None or value != value else format(value, form)

    for row in summaries.to_dict("records"):
        view.add_row(Path(row["model"]).name, row["branch"], row["sparsity"],
                     cell(row, "density", ".1%"), cell(row, "perplexity", ".3f"),
                     cell(row, "prune_seconds", ".1f"), cell(row, "rule_seconds", ".1f"))
    console = Console()
    if not console.is_terminal:
        console = Console(width=120)
    console.print(view)


def main(argv: list[str] | None = None) -> None:
    """`argv`: the arguments after `llm`."""
    argv = sys.argv[2:] if argv is None else list(argv)
    overrides.check_overrides(argv, CONF_DIR, CONFIG_NAME, validate, LLMConfig, PROGRAM)
    sys.argv = ["lottery llm", *argv]
    hydra_main()
