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
from lottery import platform
from lottery.config import ConfigError, validate
from lottery.data import DataError
from lottery.models import ModelError
from lottery.record import summary_table, wandb_summary
from lottery.optim import OptimizerError

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
USER_ERRORS = (ConfigError, DataError, ModelError, OptimizerError)
CHECK_ONLY = False  # `lottery check ...`: stop once the run is built, before training


def fail(message: str) -> None:
    print(f"lottery: error: {message}", file=sys.stderr)
    sys.exit(2)


def check_overrides(args: list[str]) -> None:
    """Compose and validate the config for each value of the command line's overrides (each
    value of a sweep on its own), so that an unknown group option or key, or a bad value,
    fails in one line, exit 2, before Hydra starts any job."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in args):
        return  # Hydra's own flags (--help, --cfg, ...): let Hydra handle the command line
    overrides = [a for a in args if not a.startswith("-")]
    parser = OverridesParser.create()
    for override in overrides:  # one at a time, so that the message names the bad one
        try:
            parser.parse_overrides([override])
        except HydraException as error:
            reason = "; ".join(line for line in str(error).splitlines() if line.strip()
                               and not line.startswith(("See https", "Error parsing override")))
            fail(f"cannot parse the overrides: {override} ({reason}); write key=value, see "
                 "https://hydra.cc/docs/advanced/override_grammar/basic")
    parsed = parser.parse_overrides(overrides)
    first = [o.input_line if not o.is_sweep_override()
             else f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}" for o in parsed]
    trials = [first]
    for i, override in enumerate(parsed):
        if override.is_sweep_override():
            trials += [first[:i] + [f"{override.get_key_element()}={value}"] + first[i + 1:]
                       for value in list(override.sweep_string_iterator())[1:]]
    swept = {o.get_key_element() for o in parsed if o.is_sweep_override()}
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for trial in trials:
            job = " ".join(t for t in trial if t.split("=", 1)[0] in swept)
            where = f" (overrides: {job})" if job else ""  # which job of a sweep
            try:
                composed = compose("config", overrides=trial, return_hydra_config=True)
            except (HydraException, OmegaConfBaseException, ValueError) as error:
                from lottery.config import unknown_in_file

                if message := unknown_in_file(error):  # a key a config file sets
                    fail(f"{message}{where}")
                # an unknown group option or key, or a value that does not fit its node
                text = str(error).split("Config search path:")[0]
                lines = [line.strip() for line in text.splitlines()
                         if line.strip() and not line.startswith("See https")]
                lines = lines or [type(error).__name__]
                if len(lines) > 1 and lines[1].startswith("Available options"):
                    lines = [lines[0], f"{lines[1]} {', '.join(lines[2:])}"]
                cause = str(error.__cause__ or "").splitlines()
                if lines[0].startswith("Error merging override") and cause:
                    lines[0] += f": {cause[0]}"  # e.g. a mapping given for a list
                fail("; ".join([lines[0].rstrip(".") + where,
                                *(line[0].lower() + line[1:] for line in lines[1:])]))
            # Validate each composed config too, so that a bad value fails here, before Hydra
            # starts a job (in a sweep: before the first job trains). A config that uses
            # `${hydra:...}` resolves only inside a job: hydra_main validates it there.
            task = OmegaConf.to_container(composed, resolve=False)
            task.pop("hydra", None)
            if "${hydra:" in str(task):
                continue
            try:
                validate(OmegaConf.create(task))
            except ConfigError as error:
                fail(f"{error}{where}")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    from lottery import imp

    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # "no TPU" notices
    try:
        run_cfg = validate(cfg)
        platform.configure(run_cfg.stack_size)  # on CPU: devices, XLA flags, CPU kernels
        if CHECK_ONLY:
            from lottery.setup import build, describe

            setup = build(run_cfg)
            print(f"lottery: {run_cfg.name}: config OK: {setup.model.name} on "
                  f"{setup.data.name}, {describe(setup)}; {run_cfg.stack_size} members")
            return
        out_dir = Path(HydraConfig.get().runtime.output_dir)
        summaries = imp.run(run_cfg, out_dir)
    except USER_ERRORS as error:
        fail(str(error))
    if run_cfg.logger.name == "wandb":  # the W&B summary run, with figures drawn here
        from lottery.analysis.plots import summary_figures

        wandb_summary(out_dir, summary_figures(summaries, out_dir, run_cfg.name))
    print_table(summary_table(summaries))


def print_table(table) -> None:
    from rich.console import Console
    from rich.table import Table

    view = Table(title="early-stop test accuracy (mean ± std over replicates)")
    for column in ("level", "density", "branch", "test accuracy", "early-stop step", "n"):
        view.add_column(column, justify="left" if column == "branch" else "right")
    for row in table.itertuples():
        view.add_row(str(row.level), f"{100 * row.density:.2f}%", row.branch,
                     f"{100 * row.accuracy_mean:.2f} ± {100 * row.accuracy_std:.2f}",
                     f"{row.early_stop_step_mean:.0f}",
                     f"{row.replicates}" + (f" (+{row.diverged} diverged)" if row.diverged else ""))
    Console().print(view)


def main() -> None:
    if sys.argv[1:2] == ["report"]:  # not a Hydra command line: dispatch before Hydra parses
        from lottery.analysis.report import main as report

        sys.exit(report(sys.argv[2:]))
    if sys.argv[1:2] == ["lm"]:  # the transformer prune-to-budget app (its own Hydra config)
        from lottery.lm.cli import main as lm

        lm(sys.argv[2:])
        return
    if sys.argv[1:2] == ["check"]:  # the run's checks, from overrides to a built setup
        global CHECK_ONLY
        CHECK_ONLY = True
        sys.argv = [sys.argv[0], *sys.argv[2:]]
    check_overrides(sys.argv[1:])
    hydra_main()


if __name__ == "__main__":
    main()
