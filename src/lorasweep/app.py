"""``lorasweep train``: the Hydra application around ``job.run_job``.

Single runs are composed and checked once *before* Hydra starts, so a bad key, value or path gives one
paragraph and exit code 2 without leaving an empty run folder behind.
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lorasweep.config.paths import conf_dir
from lorasweep.errors import UserError

CONFIG_NAME = "train"
VERSION_BASE = "1.3"
_HYDRA_FLAGS_WITHOUT_RUN = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--version",
                            "--shell-completion", "-sc")


def register() -> None:
    """Schema and resolvers; called before any composition (idempotent)."""
    from lorasweep.config.train import register_configs
    from lorasweep.tracking.files import create_unique_dir

    register_configs()
    if not OmegaConf.has_resolver("lorasweep_run_dir"):
        # use_cache: Hydra may resolve hydra.run.dir more than once; the folder must be made only once.
        OmegaConf.register_new_resolver("lorasweep_run_dir", lambda p: str(create_unique_dir(Path(p))),
                                        use_cache=True)


def compose_config(overrides: list[str]) -> DictConfig:
    """Compose ``train.yaml`` with ``overrides`` (Hydra grammar), turning composition errors into UserErrors."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    from lorasweep.config.errors import describe_omegaconf_error

    register()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=VERSION_BASE, job_name="train"):
            return compose(CONFIG_NAME, overrides=overrides)
    except MissingConfigException as exc:
        group = (exc.missing_cfg_file or "").rsplit("/", 1)
        if len(group) == 2 and exc.options:
            raise UserError(group[0], f"there is no option {group[1]!r}.",
                            f"Choose one of: {', '.join(exc.options)}.") from None
        raise UserError("command line", " ".join(str(exc).split()), "") from None
    except HydraException as exc:
        cause = exc.__cause__
        if isinstance(cause, OmegaConfBaseException):
            raise UserError(*describe_omegaconf_error(cause)) from None
        text = " ".join(str(exc).split())
        raise UserError("command line", text, "See `lorasweep train --help` for groups, options and keys.") \
            from None


def check_multirun(overrides: list[str]) -> None:
    """Compose a multirun's config without its sweep overrides (``a=1,2``, ``b=choice(...)``), so grammar
    mistakes, unknown keys and values Hydra cannot merge are one paragraph before anything starts; each
    sweep value is checked by the sweeper or by its job."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    from lorasweep.config.train import to_train_config

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as exc:
        raise UserError("command line", " ".join(str(exc).split()),
                        "Quote sweep expressions for the shell, e.g. optimizer.lr='interval(1e-4, 1e-2)'.") from None
    fixed = [text for text, override in zip(overrides, parsed, strict=True) if not override.is_sweep_override()]
    try:
        to_train_config(compose_config(fixed))
    except UserError as exc:
        group, _, name = exc.where.rpartition(".")
        if exc.where.startswith("hydra.sweeper.params."):
            raise UserError(exc.where, "cannot be set like this: Hydra reads the dots of a search-space key "
                            "(e.g. `optimizer.lr`) as nesting.", "Give the range as a sweep override of the key "
                            "itself, e.g. `optimizer.lr='tag(log, interval(1e-4, 1e-2))'`.") from None
        if group in ("hydra.sweeper.sampler_args", "hydra.sweeper.pruner_args"):
            raise UserError(exc.where, f"`{name}` is not set in the preset, so a plain override cannot change it.",
                            f"Add it with `++{group}.{name}=<value>`.") from None
        raise


def report_user_error(exc: UserError) -> int:
    print(f"lorasweep: error: {exc.paragraph()}", file=sys.stderr)
    return 2


def train_main(args: list[str]) -> int:
    """Run ``lorasweep train [overrides] [hydra flags]`` and return the exit code."""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from lorasweep.job import CheckedInputs, preflight, run_job

    register()
    checked: CheckedInputs | None = None
    multirun = any(a in ("-m", "--multirun") for a in args)
    if not any(a.split("=")[0] in _HYDRA_FLAGS_WITHOUT_RUN for a in args):
        overrides = [a for a in args if not a.startswith("-")]
        try:
            if multirun:
                check_multirun(overrides)
            else:
                checked = preflight(compose_config(overrides))
        except UserError as exc:
            return report_user_error(exc)

    def task(cfg: DictConfig) -> dict[str, float]:
        from lorasweep.sweeping.parent import child_tags
        from lorasweep.tracking.console import print_summary

        hydra_cfg = HydraConfig.get()
        run_dir = Path(hydra_cfg.runtime.output_dir)
        tags = {"hydra.job.name": hydra_cfg.job.name}
        multirun = hydra_cfg.mode == RunMode.MULTIRUN
        if multirun:
            tags.update(child_tags(Path(hydra_cfg.sweep.dir), hydra_cfg.job.num))
        try:
            result = run_job(cfg, run_dir, tags=tags, checked=checked, show_progress=not multirun)
        except UserError as exc:
            if multirun:
                raise
            sys.exit(report_user_error(exc))
        if not multirun:
            print_summary(result.run_dir, result.val_loss_start, result.val_loss, result.lora_path,
                          result.tracking_uri)
        return result.objectives

    sys.argv = ["lorasweep train", *args]
    hydra.main(version_base=VERSION_BASE, config_path=str(conf_dir()), config_name=CONFIG_NAME)(task)()
    return 0


def presets() -> dict[str, str]:
    """Sweep presets (``sweeps/*.yaml``) and the first comment line of each."""
    from lorasweep.config.paths import sweeps_dir

    found = {}
    for path in sorted(sweeps_dir().glob("*.yaml")):
        lines = [line[1:].strip() for line in path.read_text().splitlines()
                 if line.startswith("#") and "@package" not in line]
        found[path.stem] = lines[0] if lines else ""
    return found


def sweep_main(args: list[str]) -> int:
    """``lorasweep sweep PRESET [overrides]``: a multirun with the preset added to the defaults."""
    from lorasweep.config.paths import sweeps_dir

    known = presets()
    if not args or args[0] in ("--list", "-l", "--help", "-h"):
        print("sweep presets (lorasweep sweep PRESET [overrides]):")
        for name, about in known.items():
            print(f"  {name:<16} {about}")
        return 0 if args else 2
    preset, rest = args[0], args[1:]
    if preset not in known:
        import difflib

        close = difflib.get_close_matches(preset, list(known), n=1)
        hint = f"Did you mean `{close[0]}`? " if close else ""
        return report_user_error(UserError("sweep preset", f"{preset!r} is not a preset in {sweeps_dir()}.",
                                           f"{hint}Choose one of: {', '.join(known)}."))
    search_path = f"hydra.searchpath=[file://{sweeps_dir().parent}]"
    return train_main(["-m", search_path, f"+sweeps={preset}", *rest])
