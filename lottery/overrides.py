"""The command line's pre-check, shared by `lottery` and `lottery lm`: every override is
parsed, and the config composed and validated for each value of a sweep on its own, before
Hydra starts any job; a bad one is one line on stderr (`<program>: error: ...`), exit 2.

    check_overrides(args, conf_dir, "config", lottery.config.validate, RunConfig, "lottery")
    check_overrides(args, conf_dir, "lm", lottery.lm.config.validate, LMConfig, "lottery lm")

Each app passes its config's name, its `validate` (raising `lottery.options.ConfigError`),
the root of its schema (which names the nearest key of a typo) and its program name.
"""

import sys
from pathlib import Path

from lottery.config import keys, unknown_in_file, unknown_override
from lottery.options import ConfigError
from lottery.options import override as typed
from lottery.rundir import discard


def fail(message: str, program: str) -> None:
    """`<program>: error: <message>` on stderr, exit status 2."""
    print(f"{program}: error: {message}", file=sys.stderr)
    sys.exit(2)


def refuse_job(message: str, program: str) -> None:
    """A refusal inside a Hydra job (a config the pre-check cannot validate, data found bad
    at load, a directory in use): the job's run directory is removed where it holds only what
    starting the job made (`discard_job_dir`), then `fail`."""
    discard_job_dir()
    fail(message, program)


def discard_job_dir() -> None:
    """Remove the Hydra job's run directory where it holds nothing but what Hydra made when
    the job started, its `.hydra/` and its job log (`lottery.rundir.discard`)."""
    from hydra.core.hydra_config import HydraConfig

    job = HydraConfig.get()
    made = tuple(name for name in (job.output_subdir, f"{job.job.name}.log") if name)
    discard(Path(job.runtime.output_dir), made)


def sweep_dir() -> Path | None:
    """Inside a Hydra job of a sweep (`-m`), the sweep's folder (`lottery report` on it
    reports every run of it); None in a single run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    job = HydraConfig.get()
    return Path(job.sweep.dir) if job.mode == RunMode.MULTIRUN else None


def unknown_name(override, groups: list[str], root) -> str | None:
    """One line for a plain override whose name is neither a key of the schema `root` nor
    one of the config's `groups` (`experimnt=lenet_mnist`), naming the nearest of both
    (Hydra would advise `+experimnt=...`, which then fails too); None for any other."""
    from difflib import get_close_matches

    from hydra.core.override_parser.types import OverrideType

    name = override.key_or_group.split("@")[0]
    if override.type != OverrideType.CHANGE or "." in name or "/" in name:
        return None  # +add, ~delete, nested keys and hydra/...: Hydra's and the schema's checks
    known = [key for key in keys(root) if key not in groups]
    if name in known or name in groups or name == "hydra":
        return None
    close = get_close_matches(name, groups + known, n=1)
    value = override.input_line.split("=", 1)[1] if "=" in override.input_line else "..."
    hint = f" (did you mean {close[0]}={value}?)" if close else ""
    return (f"{name} is not a config key or group{hint}; the groups are {', '.join(groups)} "
            f"(group=option), the keys {', '.join(known)}")


def preset_source(key: str | None, trial: list[str], config_name: str, composed) -> str:
    """`; K=V comes from experiment=X, not from your overrides` where the setting at fault
    (`key`, from `ConfigError.key`) was set by the preset that `trial` chooses and by none of
    its other overrides, so that a user who never wrote it learns where it is from; '' for
    any other. Composes `config_name` with the preset alone (inside Hydra's initialize)."""
    from hydra import compose
    from omegaconf import OmegaConf

    presets = [line for line in trial if line.split("=", 1)[0] == "experiment"]
    if key is None or not presets:
        return ""
    for line in trial:
        name = line.split("=", 1)[0].lstrip("~+")
        if name != "experiment" and (name == key or f"{name}.".startswith(f"{key}.")
                                     or key.startswith(f"{name}.")):
            return ""  # the user wrote it (or a part of it, or the section that holds it)
    value = OmegaConf.select(composed, key)
    if value != OmegaConf.select(compose(config_name, overrides=presets), key):
        return ""  # an override changed it after all
    if value == OmegaConf.select(compose(config_name), key):
        return ""  # the default, not the preset's
    value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    if isinstance(value, dict):
        value = "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}"
    return f"; {typed(key, value)} comes from {presets[0]}, not from your overrides"


def check_overrides(args: list[str], conf_dir: str, config_name: str, validate, root,
                    program: str) -> None:
    """Compose `config_name` (in `conf_dir`) and `validate` it for each value of the command
    line's overrides (each value of a sweep on its own), so that an unknown group option or
    key, or a bad value, fails in one line, exit 2, before Hydra starts any job. `root` is
    the schema's root dataclass; `program` prefixes the message."""
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
                 "https://hydra.cc/docs/advanced/override_grammar/basic", program)
    parsed = parser.parse_overrides(overrides)
    first = [o.input_line if not o.is_sweep_override()
             else f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}" for o in parsed]
    trials = [first]
    for i, override in enumerate(parsed):
        if override.is_sweep_override():
            trials += [first[:i] + [f"{override.get_key_element()}={value}"] + first[i + 1:]
                       for value in list(override.sweep_string_iterator())[1:]]
    swept = {o.get_key_element() for o in parsed if o.is_sweep_override()}
    with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
        choices = compose(config_name, return_hydra_config=True).hydra.runtime.choices
        groups = sorted(group for group in choices if not group.startswith("hydra"))
        for override in parsed:
            if message := unknown_name(override, groups, root):
                fail(message, program)
        for trial in trials:
            job = " ".join(t for t in trial if t.split("=", 1)[0] in swept)
            where = f" (overrides: {job})" if job else ""  # which job of a sweep
            try:
                composed = compose(config_name, overrides=trial, return_hydra_config=True)
            except (HydraException, OmegaConfBaseException, ValueError) as error:
                # a key the schema does not have, set by a config file or an override
                if message := unknown_in_file(error, root) or unknown_override(error, root):
                    fail(f"{message}{where}", program)
                # an unknown group option, or a value that does not fit its node
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
                                *(line[0].lower() + line[1:] for line in lines[1:])]), program)
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
                source = preset_source(error.key, trial, config_name, composed)
                fail(f"{error}{where}{source}", program)


def compose(conf_dir: str, config_name: str, args):
    """The composed config `config_name` of `conf_dir` with `args` (overrides), outside a
    Hydra app: what each app's `compose` gives tests and scripts."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
        return hydra_compose(config_name, overrides=list(args))
