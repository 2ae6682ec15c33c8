"""Structured configs: one dataclass per Hydra group, the single source of keys, types and defaults."""

from lorasweep.config.train import GROUPS, TrainConfig, register_configs, to_train_config

__all__ = ["GROUPS", "TrainConfig", "register_configs", "to_train_config"]
