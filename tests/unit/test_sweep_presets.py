"""Every sweep preset composes with the training config and passes the sweeper's own checks: its search
space parses, names real keys, and its sampler and pruner build (no training: milliseconds each)."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lorasweep.app import CONFIG_NAME, VERSION_BASE, presets, register
from lorasweep.config.paths import conf_dir, sweeps_dir
from lorasweep.config.train import GROUPS, to_train_config
from lorasweep.sweeping.factories import grid_size, make_pruner, make_sampler
from lorasweep.sweeping.space import check_keys, parse_search_space

EXPECTED = {"quickstart", "lr_grid", "rank_alpha_grid", "schedulers", "tpe_full"}


def test_the_presets_are_there() -> None:
    assert set(presets()) == EXPECTED
    assert all(about for about in presets().values())  # each says what it searches


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_preset_composes_and_its_search_space_is_valid(preset: str) -> None:
    register()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=VERSION_BASE, job_name="train"):
        cfg = compose(CONFIG_NAME, overrides=[f"hydra.searchpath=[file://{sweeps_dir().parent}]", f"+sweeps={preset}"],
                      return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("LorasweepOptunaSweeper")
    assert cfg.hydra.launcher._target_.endswith("LorasweepProcessLauncher")
    assert sweeper.study_name == preset
    train = OmegaConf.create({k: v for k, v in cfg.items() if k != "hydra"})
    to_train_config(train)  # the preset's fixed values are valid
    space = parse_search_space(dict(sweeper.params))
    check_keys(space, train, set(GROUPS))
    assert space.distributions
    make_sampler(sweeper.sampler, seed=sweeper.seed, space=space, n_objectives=1, args=sweeper.sampler_args)
    make_pruner(sweeper.pruner, sweeper.pruner_args)
    if sweeper.sampler == "grid":
        assert grid_size(space) == sweeper.n_trials  # a grid preset runs its whole grid, once
    if preset == "tpe_full":
        assert sweeper.n_trials >= 50 and len(space.distributions) >= 10


def test_modern_knobs_give_valid_configs_for_every_branch() -> None:
    """The conditional space of tpe_full: 200 sampled trials, each a config that passes every check, and every
    branch (each algorithm, DoRA, LoRA+, each noise kind and loss type, EMA on) is reached."""
    import optuna

    from lorasweep.config.train import TrainConfig
    from lorasweep.sweeping.knobs import modern_knobs

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen: set[str] = set()
    for _ in range(200):
        trial = study.ask()
        values = modern_knobs(None, trial)
        cfg = TrainConfig()
        for key, value in values.items():
            *path, leaf = key.split(".")
            node = cfg
            for part in path:
                node = getattr(node, part)
            assert hasattr(node, leaf), key
            setattr(node, leaf, value)
        cfg.validate()
        seen |= {f"{k}={v}" for k, v in values.items() if isinstance(v, str | bool) or v is None}
        study.tell(trial, 0.0)
    for branch in ("network.algo=loha", "network.algo=lokr", "network.dora=True", "network.loraplus_lr_ratio=None",
                   "training.loss_type=smooth_l1", "training.ema.enabled=True", "network.conv_dim=None"):
        assert branch in seen, branch
    assert any("training.multires_noise_iterations" in t.params for t in study.trials)
    assert any("training.noise_offset" in t.params for t in study.trials)
