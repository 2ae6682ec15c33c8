"""Invalid values of the trainer parameters through `lorasweep train`, in process: exit code 2, one
paragraph naming the key, no traceback, no run folder (the subprocess path is covered by test_cli_errors)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorasweep.cli import main
from tests.conftest import user_error_line


@pytest.mark.parametrize(("overrides", "fragments"), [
    (["network.dim=-4"], ("network.dim", "out of range")),
    (["network.dropout=1.5"], ("network.dropout", "out of range")),
    (["data.buckets.step=12"], ("data.buckets.step", "multiple of 8")),
    (["scheduler.name=plateau"], ("scheduler.name", "cosine_with_restarts")),
    (["optimizer.name=sgd"], ("optimizer.name", "prodigy")),
    (["data.keep_tokens=7"], ("data.keep_tokens",)),
    (["network.train_unet=false", "network.train_text_encoder=false"], ("network.train_unet",)),
    (["model.v2=true"], ("model.v2", "SD 1")),
    (["data.color_aug=true"], ("data.cache_latents", "data.color_aug")),
    (["data.random_crop=true"], ("data.cache_latents", "data.random_crop")),
    (["data.caption_dropout_rate=1.2"], ("data.caption_dropout_rate", "out of range")),
    (["model.max_token_length=100"], ("model.max_token_length", "225")),
    (["model.clip_skip=0"], ("model.clip_skip", "out of range")),
    (["scheduler.warmup_ratio=1"], ("scheduler.warmup_ratio", "out of range")),
    (["optimizer.args.no_such_arg=1"], ("optimizer.args.no_such_arg",)),
    (["output.format=bin"], ("output.format", "safetensors")),
    (["output.save_every_n_epochs=0"], ("output.save_every_n_epochs", "out of range")),
    (["data.persistent_workers=true"], ("data.persistent_workers", "data.num_workers")),
    (["data.tag_frequency_sort=random"], ("data.tag_frequency_sort", "alpha")),
    (["network.init_weights=/nonexistent/lora.safetensors"], ("network.init_weights",)),
    (["resume.state_dir=/nonexistent/state"], ("resume.state_dir",)),
    (["data.reg_dir=/nonexistent/reg"], ("data.reg_dir", "does not exist")),
    (["model.base=/nonexistent/model.ckpt"], ("model.base",)),
    (["training.prior_loss_weight=-1"], ("training.prior_loss_weight", "out of range")),
    (["training.cpu_conv_kernels=fast"], ("training.cpu_conv_kernels", "native")),
])
def test_invalid_parameter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                           tiny_model: Path, overrides: list[str], fragments: tuple[str, ...]) -> None:
    monkeypatch.chdir(tmp_path)
    code = main(["train", *overrides])
    user_error_line(code, capsys.readouterr().err, *fragments)
    assert not (tmp_path / "outputs" / "runs").exists()
