"""MLflow parent run and report for sweeps run by Hydra's own sweepers (``lorasweep train -m a=1,2 b=x,y``).

The lorasweep Optuna sweeper opens and closes its parent run itself (after checking its config, so a bad
sweep starts nothing); for any other sweeper this callback does it around the multirun.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("lorasweep.sweep")

OUR_SWEEPER = "hydra_plugins.lorasweep_optuna.sweeper.LorasweepOptunaSweeper"


def _ours(config: DictConfig) -> bool:
    return str(config.hydra.sweeper.get("_target_", "")) == OUR_SWEEPER


def _swept_keys(config: DictConfig) -> list[str]:
    """Keys of the command line's sweep overrides (``a=1,2``, ``b=choice(x,y)``...), in order."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    return [o.key_or_group for o in overrides if o.is_sweep_override()]


class SweepCallback(Callback):
    """Opens the sweep's MLflow parent run before the first job and closes it, with the report, after the last."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from lorasweep.config.train import to_train_config
        from lorasweep.sweeping.parent import open_parent
        from lorasweep.sweeping.storage import SweepRecord

        if _ours(config):
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        keys = _swept_keys(config)
        tc = to_train_config(OmegaConf.create({k: v for k, v in config.items() if k != "hydra"}))
        record = SweepRecord(study_name=sweep_dir.name, storage="", objectives=["val_loss"],
                             directions=["minimize"], params=keys)
        params = {f"space.{o.split('=', 1)[0]}": o.split("=", 1)[1] for o in config.hydra.overrides.task
                  if o.split("=", 1)[0].lstrip("+~") in keys}
        open_parent(sweep_dir, tc, record, params=params, tags={"lorasweep.sweeper": "grid"})

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from lorasweep.sweeping.parent import close_parent, read_record
        from lorasweep.sweeping.report import build_report

        if _ours(config):
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        record = read_record(sweep_dir)
        if record is None:
            return
        try:
            build_report(sweep_dir)
        finally:
            close_parent(record, "FINISHED")
