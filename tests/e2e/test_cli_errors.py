"""Bad input: one clear paragraph naming the key or file, exit code 2, no traceback, nothing created."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import run_cli, user_error_line


def _assert_user_error(proc, *fragments: str) -> None:
    user_error_line(proc.returncode, proc.stderr, *fragments)


@pytest.mark.parametrize(("override", "fragments"), [
    ("optimizer.lrr=1", ("optimizer.lrr", "no such config key", "lr, unet_lr")),
    ("+foo=1", ("foo", "no such config key")),
    ("optimizer.lr=abc", ("optimizer.lr", "could not be converted to Float")),
    ("network.dim=1.5", ("network.dim", "Integer")),
    ("network.dim=0", ("network.dim", "out of range")),
    ("optimizer.lr=-1", ("optimizer.lr", "out of range")),
    ("scheduler=foo", ("scheduler", "no option 'foo'", "cosine")),
    ("validation.split=1.5", ("validation.split", "out of range")),
    ("data.resolution=65", ("data.resolution", "multiple of 8")),
    ("training.device=tpu", ("training.device", "'tpu' is not one of")),
    ("model.base=/nonexistent/model", ("model.base", "does not exist")),
    ("data.train_dir=/nonexistent/data", ("data.train_dir", "does not exist")),
])
def test_config_errors(tmp_path: Path, override: str, fragments: tuple[str, ...]) -> None:
    proc = run_cli(["train", override], cwd=tmp_path)
    _assert_user_error(proc, *fragments)
    assert not (tmp_path / "outputs" / "runs").exists()


def test_both_components_off(tmp_path: Path) -> None:
    proc = run_cli(["train", "network.train_unet=false", "network.train_text_encoder=false"], cwd=tmp_path)
    _assert_user_error(proc, "network.train_unet", "nothing would be trained")


def test_empty_data_folder(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    _assert_user_error(run_cli(["train", f"data.train_dir={data}"], cwd=tmp_path), "data.train_dir",
                       "no <repeats>_<concept> sub-folder")
    (data / "5_thing").mkdir()
    _assert_user_error(run_cli(["train", f"data.train_dir={data}"], cwd=tmp_path), "data.train_dir",
                       "no images")


def test_unreadable_image(tmp_path: Path) -> None:
    concept = tmp_path / "data" / "2_thing"
    concept.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (64, 64), (i * 50, 0, 0)).save(concept / f"{i}.png")
        (concept / f"{i}.txt").write_text("thing")
    (concept / "broken.png").write_bytes(b"not a png at all")
    proc = run_cli(["train", f"data.train_dir={tmp_path / 'data'}"], cwd=tmp_path)
    _assert_user_error(proc, "broken.png", "cannot be read as an image")


def test_unwritable_output_root(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    proc = run_cli(["train", f"output.root={blocker / 'out'}"], cwd=tmp_path)
    _assert_user_error(proc, "output.root", "not writable")
    assert blocker.read_text() == "a file where a folder should be"


def test_unknown_command(tmp_path: Path) -> None:
    proc = run_cli(["trian"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "unknown command 'trian'" in proc.stderr
