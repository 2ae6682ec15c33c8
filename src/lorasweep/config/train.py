"""The root config: one field per group, registered in Hydra's ConfigStore as the schema of ``train.yaml``.

The dataclasses are the single source of keys, types, defaults and documentation; the YAML files under
``conf/`` only choose values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from lorasweep.config.data import DataConfig
from lorasweep.config.legacy import LegacyConfig
from lorasweep.config.model import ModelConfig
from lorasweep.config.network import NetworkConfig
from lorasweep.config.optimizer import OptimizerConfig
from lorasweep.config.output import OutputConfig
from lorasweep.config.precision import PrecisionConfig
from lorasweep.config.resume import ResumeConfig
from lorasweep.config.sampling import SamplingConfig
from lorasweep.config.scheduler import SchedulerConfig
from lorasweep.config.tracking import TrackingConfig
from lorasweep.config.training import TrainingConfig
from lorasweep.config.trial import TrialConfig
from lorasweep.config.validation import ValidationConfig

GROUPS = ("model", "data", "network", "optimizer", "scheduler", "training", "precision", "sampling",
          "validation", "output", "tracking")
EXTRA_NODES = ("trial", "resume", "legacy")
"""Root nodes without a conf/ group: set by the sweeper, ``lorasweep resume`` or overrides."""
SCHEMA_NAME = "train_schema"


@dataclass
class TrainConfig:
    """Everything one training run needs. ``config.yaml`` in a run folder is this, fully resolved."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    trial: TrialConfig = field(default_factory=TrialConfig)
    """Set by the Optuna sweeper for each trial (see :class:`TrialConfig`); empty otherwise."""
    resume: ResumeConfig = field(default_factory=ResumeConfig)
    """Continue from a saved training state (see :class:`ResumeConfig`)."""
    legacy: LegacyConfig = field(default_factory=LegacyConfig)
    """LETS JSON in and out (see :class:`LegacyConfig`)."""

    def validate(self) -> None:
        """Check ranges and combinations that types cannot express, group by group."""
        for group in GROUPS:
            getattr(self, group).validate(group)
        for node in EXTRA_NODES:
            getattr(self, node).validate(node)
        self.precision.check_device(self.training.device)
        self.training.check_with(v_parameterization=self.model.v_parameterization)
        self.network.check_with(optimizer=self.optimizer.name)
        self.optimizer.check_with(device=self.training.device, train_unet=self.network.train_unet,
                                  train_text_encoder=self.network.train_text_encoder)


def register_configs() -> None:
    """Register the root schema; idempotent, so importing twice (tests, Hydra plugins) is harmless."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=TrainConfig)


def _open_free_dicts(node: DictConfig) -> None:
    """Fields typed ``dict[str, ...]`` (tags, optimizer args, pruner args) take keys the user chooses."""
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            if child._metadata.object_type in (dict, None):
                OmegaConf.set_struct(child, False)
            else:
                _open_free_dicts(child)


def to_train_config(cfg: DictConfig | dict[str, Any]) -> TrainConfig:
    """Turn a composed (or loaded) config into typed, validated dataclasses.

    A loaded ``config.yaml`` is merged onto the schema first, so an old or hand-edited file gets the same
    key and type checks as a composed one.
    """
    from lorasweep.config.errors import omegaconf_errors_as_user_errors

    with omegaconf_errors_as_user_errors():
        schema = OmegaConf.structured(TrainConfig)
        OmegaConf.set_struct(schema, True)  # an unknown key anywhere is an error, also at the top level
        _open_free_dicts(schema)
        # A plain copy first: a composed config already typed TrainConfig may carry keys added with `+`.
        plain = OmegaConf.to_container(cfg) if isinstance(cfg, DictConfig) else cfg
        merged = OmegaConf.merge(schema, plain)
        obj = OmegaConf.to_object(merged)
    assert isinstance(obj, TrainConfig)
    obj.validate()
    return obj
