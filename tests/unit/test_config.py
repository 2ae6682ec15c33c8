"""The config dataclasses are the single source of keys: every YAML option composes onto them, every key
is documented, and validation names the key at fault."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lorasweep.app import compose_config
from lorasweep.config import GROUPS, TrainConfig, to_train_config
from lorasweep.config.docs import field_docs, render
from lorasweep.config.paths import conf_dir
from lorasweep.errors import UserError

REPO = Path(__file__).resolve().parents[2]


def test_default_composes_and_validates() -> None:
    cfg = to_train_config(compose_config([]))
    assert cfg.model.base == "tiny"
    assert cfg.network.effective_alpha == cfg.network.dim
    assert cfg.optimizer.unet_learning_rate == cfg.optimizer.lr


def _unavailable_here(group: str, option: str) -> str | None:
    """The error an option must give on a machine that lacks what it needs (None: it must validate)."""
    import importlib.util

    import torch

    if (group, option) == ("precision", "fp16") and not torch.cuda.is_available():
        return r"precision\.mixed.*CUDA"
    if (group, option) == ("optimizer", "adamw8bit") and importlib.util.find_spec("bitsandbytes") is None:
        return r"lorasweep\[bnb\]"
    return None


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_of_every_group_composes(group: str) -> None:
    options = sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))
    assert options, f"conf/{group} has no option"
    for option in options:
        cfg = compose_config([f"{group}={option}"])
        if OmegaConf.select(cfg, "model.base") == "???" or OmegaConf.select(cfg, "data.train_dir") == "???":
            continue  # templates that the user must fill in
        expected_error = _unavailable_here(group, option)
        if expected_error is None:
            to_train_config(cfg)
        else:
            with pytest.raises(UserError, match=expected_error):
                to_train_config(cfg)


def test_overrides_reach_the_typed_config() -> None:
    cfg = to_train_config(compose_config(["optimizer.lr=3e-4", "network.dim=16", "scheduler=cosine",
                                          "training.max_steps=200", "optimizer.unet_lr=1e-4"]))
    assert (cfg.optimizer.lr, cfg.network.dim, cfg.scheduler.name, cfg.training.max_steps) == \
        (3e-4, 16, "cosine", 200)
    assert cfg.optimizer.unet_learning_rate == 1e-4
    assert cfg.optimizer.text_encoder_learning_rate == 3e-4


def test_saved_config_round_trips(tmp_path: Path) -> None:
    cfg = compose_config(["network.alpha=4"])
    path = tmp_path / "config.yaml"
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    assert to_train_config(OmegaConf.load(path)) == to_train_config(cfg)


def test_unknown_key_in_saved_config_is_an_error() -> None:
    with pytest.raises(UserError, match=r"network\.rank: no such config key"):
        to_train_config({"network": {"rank": 4}})


def test_fp16_on_cpu_is_refused() -> None:
    with pytest.raises(UserError, match=r"precision\.mixed"):
        to_train_config(compose_config(["precision=fp16", "training.device=cpu"]))


def test_every_field_has_a_docstring() -> None:
    import dataclasses
    import typing

    hints = typing.get_type_hints(TrainConfig)
    for group in GROUPS:
        docs = field_docs(hints[group])
        missing = [f.name for f in dataclasses.fields(hints[group]) if not docs.get(f.name)]
        assert not missing, f"{group}: fields without a docstring: {missing}"


def test_parameters_doc_is_current() -> None:
    assert (REPO / "docs" / "parameters.md").read_text() == render(), \
        "regenerate with: python -m lorasweep.config.docs > docs/parameters.md"


def test_conf_ships_inside_the_wheel(tmp_path: Path) -> None:
    """A regular (non-editable) install finds conf/ and sweeps/ inside the package, and Hydra finds the sweeper."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
                   check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("lorasweep-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "lorasweep/conf/train.yaml" in names
    assert "lorasweep/conf/scheduler/cosine.yaml" in names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    assert "lorasweep/sweeps/quickstart.yaml" in names
    assert "hydra_plugins/lorasweep_optuna/sweeper.py" in names
    code = ("from lorasweep.config.paths import conf_dir, sweeps_dir; print(conf_dir()); print(sweeps_dir()); "
            "from hydra.core.plugins import Plugins; from hydra.plugins.sweeper import Sweeper; "
            "print(sorted(p.__name__ for p in Plugins.instance().discover(Sweeper)))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         env={"PYTHONPATH": str(target)}, cwd=tmp_path).stdout.splitlines()
    assert Path(out[0]) == target / "lorasweep" / "conf"
    assert Path(out[1]) == target / "lorasweep" / "sweeps"
    assert "LorasweepOptunaSweeper" in out[2]  # Hydra discovers the plugin in the installed wheel
