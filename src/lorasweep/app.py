"""``lorasweep train``: the Hydra application around ``job.run_job``.

Single runs are composed and checked once *before* Hydra starts, so a bad key, value or path gives one
paragraph and exit code 2 without leaving an empty run folder behind. ``legacy.load_json_path`` is applied
here, at composition (see :func:`compose`), for single runs and for each job of a multirun.
"""

from __future__ import annotations

import sys
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from lorasweep.config.paths import conf_dir
from lorasweep.errors import UserError

if TYPE_CHECKING:
    from hydra.core.override_parser.types import Override

    from lorasweep.config.train import TrainConfig
    from lorasweep.legacy.convert import Conversion

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


@dataclass(frozen=True)
class Composed:
    """A composed config and, when ``legacy.load_json_path`` was set, what that file contributed."""

    cfg: DictConfig
    legacy: Conversion | None = None
    user_overrides: tuple[str, ...] = ()
    hydra: DictConfig | None = None
    """Hydra's own node of the composition (``runtime.choices``, ``run.dir``, ``sweeper``), kept apart from
    ``cfg`` so that ``cfg`` is exactly the training config."""

    def train_config(self, swept: Collection[str] = ()) -> TrainConfig:
        """The typed, validated config; an error caused by a legacy setting names that setting and file.
        ``swept``: the keys a multirun sets per job (not known yet here)."""
        from lorasweep.config.train import to_train_config

        try:
            tc = to_train_config(self.cfg)
        except UserError as exc:
            raise self.blame(exc) from None
        choices = OmegaConf.select(self.hydra, "runtime.choices", default=None) if self.hydra is not None else None
        if (choices is not None and choices.get("data") == "folder" and not tc.data.train_dir
                and not {"data", "data.train_dir", "legacy.load_json_path"} & set(swept)):
            # conf/data/folder.yaml's `???` does not survive the merge onto the schema's null default, which
            # would train on the built-in synthetic set instead of the user's images.
            raise UserError("data.train_dir", "is not set, but data=folder trains on your own images.",
                            "Add data.train_dir=<your image folder> (kohya layout: <repeats>_<concept>/ "
                            "sub-folders), or leave out data=folder to train on the built-in synthetic set.")
        return tc

    def blame(self, exc: UserError) -> UserError:
        """``exc`` with the legacy setting behind its key named, unless the user's own override set that key."""
        return exc if self.legacy is None else self.legacy.blame(exc, self.user_overrides)


def _with_search_path(overrides: list[str], folder: Path) -> list[str]:
    """``overrides`` with ``folder`` added to ``hydra.searchpath`` (kept if the user gives one too)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from lorasweep.legacy.convert import hydra_value

    url = f"file://{folder}"
    for i, text in enumerate(overrides):
        if text.startswith("hydra.searchpath="):
            paths = list(OverridesParser.create().parse_override(text).value())
            return [*overrides[:i], f"hydra.searchpath={hydra_value([*paths, url])}", *overrides[i + 1:]]
    return [*overrides, f"hydra.searchpath={hydra_value([url])}"]


def _split_hydra(cfg: DictConfig) -> tuple[DictConfig, DictConfig]:
    """(the training config, Hydra's node) of a composition made with ``return_hydra_config=True`` (nothing in
    it is resolved, so ``hydra.run.dir``'s resolver creates no folder)."""
    from omegaconf import open_dict

    hydra_node = cfg.hydra
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, hydra_node


def _compose(overrides: list[str], config_name: str, config_dir: str | None) -> tuple[DictConfig, DictConfig]:
    """Compose with Hydra, turning composition errors into UserErrors; returns (config, Hydra's node).

    Inside a running Hydra app (a multirun's job) the app's own search path is used; otherwise a
    ``--config-dir`` is the primary folder with lorasweep's ``conf/`` on the search path (for ``train``).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    from lorasweep.config.errors import describe_omegaconf_error

    register()
    try:
        if GlobalHydra.instance().is_initialized():
            return _split_hydra(compose(config_name, overrides=overrides, return_hydra_config=True))
        if config_dir is None:
            with initialize_config_dir(config_dir=str(conf_dir()), version_base=VERSION_BASE, job_name="train"):
                return _split_hydra(compose(config_name, overrides=overrides, return_hydra_config=True))
        with initialize_config_dir(config_dir=config_dir, version_base=VERSION_BASE, job_name="train"):
            return _split_hydra(compose(config_name, overrides=_with_search_path(overrides, conf_dir()),
                                        return_hydra_config=True))
    except MissingConfigException as exc:
        if exc.missing_cfg_file == config_name and config_name != CONFIG_NAME:
            raise UserError("--config-name", f"there is no {config_name}.yaml in "
                            f"{config_dir or conf_dir()}.", "Give --config-dir FOLDER and --config-name NAME "
                            "of a YAML file in it (e.g. one written by `lorasweep import-legacy`).") from None
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


def compose(overrides: list[str], *, config_name: str = CONFIG_NAME, config_dir: str | None = None) -> Composed:
    """Compose ``config_name`` with ``overrides`` (Hydra grammar), then apply ``legacy.load_json_path``.

    The legacy file (minus ``legacy.json_load_skip_list``) becomes overrides placed *before* the user's, and
    the config is composed again: the file fills in settings, and every command-line override still wins.
    """
    from lorasweep.legacy.convert import convert_file
    from lorasweep.legacy.schema import BadValue

    cfg, hydra_node = _compose(overrides, config_name, config_dir)
    path = OmegaConf.select(cfg, "legacy.load_json_path")
    if not path:
        return Composed(cfg, None, tuple(overrides), hydra_node)
    skip = [str(s) for s in OmegaConf.select(cfg, "legacy.json_load_skip_list") or []]
    conversion = convert_file(Path(str(path)).expanduser(), skip, where="legacy.load_json_path")
    try:
        legacy_overrides = conversion.overrides(overrides)
    except BadValue as exc:
        raise UserError(str(conversion.path), f"{exc}.", "") from None
    composed = Composed(cfg, conversion, tuple(overrides), hydra_node)
    try:
        full, full_hydra = _compose([*legacy_overrides, *overrides], config_name, config_dir)
    except UserError as exc:
        raise composed.blame(exc) from None
    return Composed(full, conversion, tuple(overrides), full_hydra)


def compose_config(overrides: list[str], *, config_name: str = CONFIG_NAME,
                   config_dir: str | None = None) -> DictConfig:
    """Compose ``train.yaml`` (or ``config_name``) with ``overrides`` and ``legacy.load_json_path`` applied."""
    return compose(overrides, config_name=config_name, config_dir=config_dir).cfg


def job_config(cfg: DictConfig) -> DictConfig:
    """A multirun job's config with its ``legacy.load_json_path`` applied.

    Hydra composes each job itself, so a job whose overrides set ``legacy.load_json_path`` (``lorasweep
    queue``, or ``-m legacy.load_json_path=a.json,b.json``) composes its own overrides again through
    :func:`compose`, in the running app's search path.
    """
    from hydra.core.hydra_config import HydraConfig

    if not OmegaConf.select(cfg, "legacy.load_json_path"):
        return cfg
    hydra_cfg = HydraConfig.get()
    search = [o for o in hydra_cfg.overrides.hydra if o.startswith("hydra.searchpath=")]
    return compose([*search, *hydra_cfg.overrides.task], config_name=str(hydra_cfg.job.config_name)).cfg


#: Values of one swept key that ``check_multirun`` validates: all of a short list, else its first and last ones.
_CHECKED_SWEEP_VALUES = 16
#: Swept keys whose values ``check_multirun`` composes anew, besides config groups: they set other keys.
_COMPOSED_KEYS = frozenset({"legacy.load_json_path"})


def _refuse_used_folder(key: str, hydra_node: DictConfig | None) -> None:
    """``hydra.run.dir``/``hydra.sweep.dir`` set by the user to a file or a folder that holds files: Hydra would
    write into it (and its jobs over each other's files). The defaults make a new folder per run."""
    if hydra_node is None:
        return
    parent_key, _, leaf = key.removeprefix("hydra.").rpartition(".")
    node = OmegaConf.select(hydra_node, parent_key)
    # `leaf in node` would resolve the value, and hydra.run.dir's resolver creates the folder it names.
    child = node._get_node(leaf) if isinstance(node, DictConfig) else None
    raw = child._value() if child is not None else None
    if not isinstance(raw, str) or "${" in raw:  # the defaults and other interpolations are fresh folders
        return
    path = Path(raw).expanduser()
    hint = (f"Give a new or empty folder, or leave {key} unset (each run then gets a new folder under "
            "output.root); nothing in an existing folder is overwritten.")
    if path.exists() and not path.is_dir():
        raise UserError(key, f"{path} is a file, not a folder.", hint)
    if path.is_dir() and any(path.iterdir()):
        raise UserError(key, f"{path} already exists and is not empty.", hint)


def _check_sweeper_keys(hydra_node: DictConfig | None) -> None:
    """A key added to ``hydra.sweeper`` with ``++`` that the sweeper does not have would be silently ignored."""
    import dataclasses
    import difflib

    sweeper = OmegaConf.select(hydra_node, "sweeper") if hydra_node is not None else None
    schema = OmegaConf.get_type(sweeper) if isinstance(sweeper, DictConfig) else None
    if schema is None or not dataclasses.is_dataclass(schema):
        return
    known = [f.name for f in dataclasses.fields(schema)]
    settings = ", ".join(k for k in known if not k.startswith("_"))
    for name in sweeper:
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f"Did you mean `hydra.sweeper.{close[0]}`? " if close else ""
            raise UserError(f"hydra.sweeper.{name}", f"is not a setting of this sweeper ({schema.__name__}), so "
                            "it would be ignored.", f"{hint}Its settings: {settings}.")


def _sweep_values(override: Override) -> list[Any]:
    """The values of a discrete sweep override (all of a short list, else its first and last ones)."""
    from hydra.core.override_parser.types import QuotedString

    values = [v.text if isinstance(v, QuotedString) else v for v in override.sweep_iterator()]
    if len(values) > _CHECKED_SWEEP_VALUES:
        half = _CHECKED_SWEEP_VALUES // 2
        values = values[:half] + values[-half:]
    return values


def _check_grid_values(composed: Composed, fixed: list[str], swept: list[Override], *, config_name: str,
                       config_dir: str | None) -> None:
    """Each value of each swept key of a grid (Hydra's basic sweeper), on top of the fixed config: a bad one
    would otherwise stop its job after the sweep folder and its MLflow parent run exist. A config group or a
    legacy file is composed anew; a plain key is set on the fixed config (much cheaper than Hydra)."""
    import copy

    from lorasweep.config.errors import omegaconf_errors_as_user_errors
    from lorasweep.legacy.convert import hydra_value

    swept_keys = [override.key_or_group for override in swept]
    for override in swept:
        key = override.key_or_group
        if key.startswith("hydra."):  # Hydra's own settings: not part of the training config
            continue
        if not override.is_discrete_sweep():
            raise UserError(key, f"is `{override.input_line}`, which Hydra's grid sweeper cannot enumerate "
                            "(it takes lists of values).", "Give comma-separated values, choice(...) or "
                            "range(...); for intervals use an Optuna sweep (`lorasweep sweep PRESET` or "
                            "hydra/sweeper=lorasweep_optuna).")
        compose_each = key in _COMPOSED_KEYS or override.package is not None or "." not in key
        for value in _sweep_values(override):
            if compose_each:
                compose([*fixed, f"{override.get_key_element()}={hydra_value(value)}"], config_name=config_name,
                        config_dir=config_dir).train_config(swept_keys)
                continue
            cfg = copy.deepcopy(composed.cfg)
            OmegaConf.set_struct(cfg, False)  # free dicts (tracking.tags) take new keys; dataclass nodes never do
            with omegaconf_errors_as_user_errors():  # an unknown key, a value of the wrong type
                OmegaConf.update(cfg, key, value, merge=False)
            Composed(cfg, composed.legacy, composed.user_overrides, composed.hydra).train_config(swept_keys)


def check_multirun(overrides: list[str], *, config_name: str = CONFIG_NAME, config_dir: str | None = None) -> None:
    """Check a multirun before Hydra starts: compose its config without the sweep overrides (``a=1,2``,
    ``b=choice(...)``), so grammar mistakes, unknown keys and values Hydra cannot merge are one paragraph before
    anything starts; refuse unknown sweeper settings and a used output folder. The lorasweep Optuna sweeper
    checks its search space itself; for a grid, every swept value is checked here (legacy files of ``lorasweep
    queue`` included: a bad file stops the queue before anything trains), and the fixed config's paths and
    stores by ``preflight``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    from lorasweep.sweeping.callback import OUR_SWEEPER

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as exc:
        raise UserError("command line", " ".join(str(exc).split()),
                        "Quote sweep expressions for the shell, e.g. optimizer.lr='interval(1e-4, 1e-2)'.") from None
    fixed = [text for text, override in zip(overrides, parsed, strict=True) if not override.is_sweep_override()]
    swept = [override for override in parsed if override.is_sweep_override()]
    try:
        composed = compose(fixed, config_name=config_name, config_dir=config_dir)
        tc = composed.train_config(swept=[o.key_or_group for o in swept])
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
    if tc.legacy.save_json_only:
        raise UserError("legacy.save_json_only", "writes the config files of one run and cannot be part of a "
                        "multirun.", "Run it without -m (once per setting).")
    _check_sweeper_keys(composed.hydra)
    if str(OmegaConf.select(composed.hydra, "sweeper._target_", default="")) == OUR_SWEEPER:
        return  # the sweeper checks its search space, then runs preflight, before its first trial
    _refuse_used_folder("hydra.sweep.dir", composed.hydra)
    _check_grid_values(composed, fixed, swept, config_name=config_name, config_dir=config_dir)
    from lorasweep.job import preflight

    preflight(tc)


def report_user_error(exc: UserError) -> int:
    print(f"lorasweep: error: {exc.paragraph()}", file=sys.stderr)
    return 2


_CONFIG_FLAGS = {"--config-name": "name", "-cn": "name", "--config-dir": "dir", "-cd": "dir",
                 "--config-path": "path", "-cp": "path"}


def split_hydra_args(args: list[str]) -> tuple[list[str], str, str | None]:
    """(overrides, config name, config dir) of ``lorasweep train`` arguments; Hydra's own flags and the
    values of ``--config-name``/``--config-dir`` are not overrides."""
    overrides: list[str] = []
    config_name, config_dir = CONFIG_NAME, None
    i = 0
    while i < len(args):
        flag, eq, val = args[i].partition("=")
        if flag in _CONFIG_FLAGS:
            if not eq:
                i += 1
                val = args[i] if i < len(args) else ""
            if not val:
                raise UserError(flag, "needs a value.", f"Write `{flag} VALUE`.")
            if _CONFIG_FLAGS[flag] == "path":
                raise UserError(flag, "would replace lorasweep's own conf/ folder.",
                                "Use --config-dir FOLDER --config-name NAME for your own YAML config.")
            if _CONFIG_FLAGS[flag] == "name":
                config_name = val.removesuffix(".yaml")
            else:
                config_dir = str(Path(val).expanduser().resolve())
                if not Path(config_dir).is_dir():
                    raise UserError(flag, f"{val} is not a folder.", "Give the folder that holds your YAML config.")
        elif not args[i].startswith("-"):
            overrides.append(args[i])
        i += 1
    return overrides, config_name, config_dir


def _print_legacy_note(composed: Composed) -> None:
    conversion = composed.legacy
    if conversion is None:
        return
    line = f"Settings from {conversion.path} ({conversion.kind}): {len(conversion.mapped)} applied"
    if conversion.not_applied:
        line += (f", {len(conversion.not_applied)} not applied (`lorasweep import-legacy {conversion.path}` "
                 "lists each with the reason)")
    print(line + ".", flush=True)


def _save_json_only(tc: TrainConfig) -> int:
    from lorasweep.legacy.lets import save_config_files

    json_path, yaml_path = save_config_files(tc)
    print(f"LETS JSON: {json_path}\nYAML config: {yaml_path}\n"
          f"Train with: lorasweep train --config-dir {yaml_path.parent} --config-name {yaml_path.stem}\n"
          "Nothing was trained (legacy.save_json_only=true).")
    return 0


def config_groups(*folders: Path) -> dict[str, list[str]]:
    """Every config group in ``folders`` (a sub-folder holding YAML files) and its options, sorted."""
    groups: dict[str, set[str]] = {}
    for folder in folders:
        for yaml_file in folder.glob("*/*.yaml"):
            groups.setdefault(yaml_file.parent.name, set()).add(yaml_file.stem)
    return {group: sorted(options) for group, options in sorted(groups.items())}


def _train_help(args: list[str]) -> int:
    """``lorasweep train --help``: groups, options and the composed config. Hydra's own help takes seconds
    (it composes the config once per option of every group, Hydra's included); this reads the folders."""
    try:
        overrides, config_name, config_dir = split_hydra_args([a for a in args if a not in ("--help", "-h")])
        cfg = compose(overrides, config_name=config_name, config_dir=config_dir).cfg
    except UserError as exc:
        return report_user_error(exc)
    folders = [conf_dir()] + ([Path(config_dir)] if config_dir else [])
    groups = "\n".join(f"  {group}: {', '.join(options)}" for group, options in config_groups(*folders).items())
    body = OmegaConf.to_yaml({k: v for k, v in cfg.items() if k != "hydra"})
    print(f"usage: lorasweep train [group=option ...] [key=value ...] [-m] [--cfg job] [--hydra-help]\n\n"
          f"Train one LoRA; with -m, sweep every combination of comma-separated values (Hydra multirun).\n\n"
          f"config groups (group=option):\n{groups}\n\n"
          f"config (override any key with key=value; docs/parameters.md documents each):\n{body}")
    return 0


def train_main(args: list[str]) -> int:
    """Run ``lorasweep train [overrides] [hydra flags]`` and return the exit code."""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from lorasweep.job import CheckedInputs, preflight, run_job

    register()
    if any(a in ("--help", "-h") for a in args):
        return _train_help(args)
    checked: CheckedInputs | None = None
    single_cfg: DictConfig | None = None
    multirun = any(a in ("-m", "--multirun") for a in args)
    try:
        overrides, config_name, config_dir = split_hydra_args(args)
    except UserError as exc:
        return report_user_error(exc)
    if not any(a.split("=")[0] in _HYDRA_FLAGS_WITHOUT_RUN for a in args):
        try:
            if multirun:
                check_multirun(overrides, config_name=config_name, config_dir=config_dir)
            else:
                composed = compose(overrides, config_name=config_name, config_dir=config_dir)
                tc = composed.train_config()
                if tc.legacy.save_json_only:
                    return _save_json_only(tc)
                _refuse_used_folder("hydra.run.dir", composed.hydra)
                try:
                    checked = preflight(tc)
                except UserError as exc:
                    raise composed.blame(exc) from None
                single_cfg = composed.cfg
                _print_legacy_note(composed)
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
            # A single run uses the config checked above (legacy file applied); a job applies its own.
            job_cfg = single_cfg if single_cfg is not None and not multirun else job_config(cfg)
            result = run_job(job_cfg, run_dir, tags=tags, checked=checked, show_progress=not multirun)
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
