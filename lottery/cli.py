"""The `lottery` command: Hydra config -> validated config -> IMP run. Nothing else.

    lottery experiment=lenet_mnist train.steps=5000 prune.levels=5 replicates=2
    lottery -m experiment=lenet_mnist rewind.step=0,500 seed=0,1
    lottery check experiment=lenet_mnist # validate, load the data, build; no training
    lottery report RUN_OR_SWEEP_DIR      # plots and report.md (lottery.analysis.report)

Any bad input (unknown name, out-of-range value, missing data) stops before training with
one line on stderr and exit status 2.
"""

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import lottery.identity  # noqa: F401  (registers ${lottery_id:} before Hydra composes)
from lottery import distributed, overrides, platform
from lottery.config import ConfigError, RunConfig, validate
from lottery.data import DataError
from lottery.models import ModelError
from lottery.record import summary_table, wandb_summary
from lottery.terminal import finished, percent
from lottery.optim import OptimizerError

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
USER_ERRORS = (ConfigError, DataError, ModelError, OptimizerError, distributed.DistributedError)
PROGRAM = "lottery"  # the messages' prefix: `lottery: error: ...`
CHECK_ONLY = False  # `lottery check ...`: stop once the run is built, before training


def check_overrides(args: list[str]) -> None:
    """The shared pre-check (`lottery.overrides`) on the IMP config: each override parsed, and
    the config composed and validated for each value of a sweep, so that a bad one fails in
    one line, exit 2, before Hydra starts any job."""
    overrides.check_overrides(args, CONF_DIR, "config", validate, RunConfig, PROGRAM)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    from lottery import imp

    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # "no TPU" notices
    try:
        distributed.initialize()  # a SLURM job's tasks (submitit) join here; see `main`
        run_cfg = validate(cfg)
        platform.configure(run_cfg.stack_size)  # on CPU: devices, XLA flags, CPU kernels
        if CHECK_ONLY:
            from lottery.setup import build, describe

            setup = build(run_cfg)
            overrides.discard_job_dir()  # a check leaves no run directory behind
            print(f"lottery: {run_cfg.name}: config OK: {setup.model.name} on "
                  f"{setup.data.name}, {describe(setup)}; {run_cfg.stack_size} members")
            return
        out_dir = Path(HydraConfig.get().runtime.output_dir)
        with distributed.stopping_together(PROGRAM), distributed.voiced():
            summaries = imp.run(run_cfg, out_dir)
    except USER_ERRORS as error:
        overrides.refuse_job(str(error), PROGRAM)
    if not distributed.writes():  # process 0 speaks for a several-process run
        return
    if run_cfg.logger.name == "wandb":  # the W&B summary run, with figures drawn here
        from lottery.analysis.plots import summary_figures

        wandb_summary(out_dir, summary_figures(summaries, out_dir, run_cfg.name))
    print_table(summary_table(summaries))
    finished(out_dir, overrides.sweep_dir(), PROGRAM)


def print_table(table) -> None:
    from rich.console import Console
    from rich.table import Table

    view = Table(title="early-stop test accuracy (mean ± std over replicates)")
    for column in ("level", "density", "branch", "test accuracy", "early-stop step", "n"):
        view.add_column(column, justify="left" if column == "branch" else "right")
    for row in table.itertuples():
        view.add_row(str(row.level), percent(row.density), row.branch,
                     f"{100 * row.accuracy_mean:.2f} ± {100 * row.accuracy_std:.2f}",
                     f"{row.early_stop_step_mean:.0f}",
                     f"{row.replicates}" + (f" (+{row.diverged} diverged)" if row.diverged else ""))
    Console().print(view)


def main() -> None:
    if sys.argv[1:2] == ["report"]:  # not a Hydra command line: dispatch before Hydra parses
        from lottery.analysis.report import main as report

        sys.exit(report(sys.argv[2:]))
    if sys.argv[1:2] == ["llm"]:  # one-shot pruning of pretrained LMs (its own Hydra config)
        from lottery.llm.cli import main as llm

        llm(sys.argv[2:])
        return
    if sys.argv[1:2] == ["lm"]:  # the transformer prune-to-budget app (its own Hydra config)
        from lottery.lm.cli import main as lm

        lm(sys.argv[2:])
        return
    if sys.argv[1:2] == ["check"]:  # the run's checks, from overrides to a built setup
        global CHECK_ONLY
        CHECK_ONLY = True
        sys.argv = [sys.argv[0], *sys.argv[2:]]
    try:
        several = distributed.initialize()  # before anything starts JAX's backend
    except distributed.DistributedError as error:
        overrides.fail(str(error), PROGRAM)
    check_overrides(sys.argv[1:])
    if several and not distributed.writes():  # Hydra's .hydra/ files: process 0's alone
        sys.argv.append("hydra.output_subdir=null")
    hydra_main()


if __name__ == "__main__":
    main()
