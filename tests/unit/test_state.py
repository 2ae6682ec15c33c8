"""Training states: the data-set fingerprint a resume checks, and what ``resume.force`` may and may not
override."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lorasweep.config.train import TrainConfig
from lorasweep.data.dataset import ImageItem
from lorasweep.errors import UserError
from lorasweep.training.state import Position, data_fingerprint, load_state_meta, save_state


def _items(root: Path) -> list[ImageItem]:
    items = []
    for i, concept in enumerate(["zorb", "zorb", "blob"]):
        path = root / f"{i}_{concept}" / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes(100 + i))
        items.append(ImageItem(path, f"a {concept}", repeats=2, concept=concept))
    return items


def test_data_fingerprint_sees_what_changes_training_but_not_a_moved_folder(tmp_path: Path) -> None:
    items = _items(tmp_path / "a")
    digest = data_fingerprint(items)
    assert data_fingerprint(list(reversed(items))) == digest  # order of the scan does not matter
    moved = _items(tmp_path / "elsewhere")
    assert data_fingerprint(moved) == digest
    assert data_fingerprint(items[:2]) != digest  # an image removed
    assert data_fingerprint([*items[:2], replace(items[2], caption="a blob, red")]) != digest
    assert data_fingerprint([*items[:2], replace(items[2], repeats=3)]) != digest
    items[2].path.write_bytes(bytes(500))  # replaced by another file
    assert data_fingerprint(items) != digest


def _save(folder: Path, cfg: TrainConfig, digest: str) -> Path:
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([param])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return save_state(folder, cfg=cfg, position=Position(3, 1, 3), lora={"w": torch.zeros(1)}, optimizer=optimizer,
                      scheduler=scheduler, scaler=None, generators={"noise": torch.Generator().manual_seed(0)},
                      data_digest=digest)


def test_changed_data_set_is_refused_unless_forced(tmp_path: Path) -> None:
    cfg = TrainConfig()
    items = _items(tmp_path)
    state = _save(tmp_path / "state" / "step-000003", cfg, data_fingerprint(items))
    assert "forced" not in load_state_meta(state, cfg, data_fingerprint(items))
    changed = data_fingerprint(items[:2])
    with pytest.raises(UserError) as refused:
        load_state_meta(state, cfg, changed)
    assert refused.value.where == "resume.state_dir" and "the data set" in str(refused.value)
    assert "resume.force=true" in str(refused.value)
    cfg.resume.force = True
    cfg.training.batch_size = 2
    meta = load_state_meta(state, cfg, changed)
    assert meta["forced"][0] == "training.batch_size (4 → 2)" and meta["forced"][1].startswith("the data set")


@pytest.mark.parametrize(("key", "value", "named"), [("dim", 16, "network"), ("name", "lion", "optimizer.name")])
def test_lora_shape_and_optimizer_cannot_be_forced(tmp_path: Path, key: str, value: object, named: str) -> None:
    cfg = TrainConfig()
    state = _save(tmp_path / "step-000003", cfg, "d")
    cfg.resume.force = True
    setattr(cfg.network if named == "network" else cfg.optimizer, key, value)
    with pytest.raises(UserError) as refused:
        load_state_meta(state, cfg, "d")
    assert f"{named} cannot change on resume" in str(refused.value)


def test_damaged_state_json_is_a_clear_error(tmp_path: Path) -> None:
    cfg = TrainConfig()
    state = _save(tmp_path / "step-000003", cfg, "d")
    (state / "state.json").write_text('{"format": 1, "step"')
    with pytest.raises(UserError, match="cannot be read"):
        load_state_meta(state, cfg, "d")
