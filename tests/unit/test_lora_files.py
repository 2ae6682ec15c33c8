"""LoRA files as kohya writes them: formats, save precision, the ``ss_*`` metadata and ``sshs_*`` hashes,
no-overwrite saving, the pickle refusal, and the validation of the ``network``/``output`` keys.

Everything here runs on a few small tensors (a two-layer module with peft LoRA), no diffusion model.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from peft import LoraConfig, inject_adapter_in_model
from safetensors import safe_open
from torch import nn

from lorasweep.config.network import NetworkConfig
from lorasweep.config.output import FORMATS, OutputConfig
from lorasweep.config.train import TrainConfig, to_train_config
from lorasweep.errors import UserError
from lorasweep.network.kohya import (
    ADAPTER_NAME,
    export_copy,
    kohya_hashes,
    load_lora_file,
    lora_path,
    save_lora,
    save_lora_file,
    to_kohya_state_dict,
)
from lorasweep.network.metadata import (
    TrainingFacts,
    base_model_version,
    kohya_metadata,
    legacy_model_hash,
    session_id,
    sha256_file,
)

SAVE_DTYPES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class _Block(nn.Module):
    """A Linear and a 1×1 conv, the two module kinds a kohya LoRA adapts."""

    def __init__(self) -> None:
        super().__init__()
        self.to_q = nn.Linear(16, 24)
        self.proj_in = nn.Conv2d(8, 12, kernel_size=1)


def _lora_tensors(dtype: str = "float", *, dim: int = 4, alpha: float = 2.0, width: int = 1) -> dict[str, torch.Tensor]:
    """A kohya state dict exported from a real peft LoRA with seeded non-zero weights."""
    torch.manual_seed(0)
    model = nn.Module()
    model.blocks = nn.ModuleList(_Block() for _ in range(width))
    targets = [f"blocks.{i}.{leaf}" for i in range(width) for leaf in ("to_q", "proj_in")]
    inject_adapter_in_model(LoraConfig(r=dim, lora_alpha=alpha, target_modules=targets), model,
                            adapter_name=ADAPTER_NAME)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape))
    return to_kohya_state_dict(model, None, alpha=alpha, dtype=dtype)


def _facts(**overrides: object) -> TrainingFacts:
    values: dict[str, object] = {
        "model_id": "runwayml/stable-diffusion-v1-5", "num_train_images": 40, "num_batches_per_epoch": 10,
        "num_epochs": 3, "epoch": 3, "max_train_steps": 30, "warmup_steps": 2, "started_at": 1700000000.5,
        "tag_frequency": {"10_shiroko": {"shiroko": 4, "blue hair": 3}},
        "dataset_dirs": {"10_shiroko": {"n_repeats": 10, "img_count": 4}},
    }
    values.update(overrides)
    return TrainingFacts(**values)  # type: ignore[arg-type]


def _header_and_data(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


# formats and precision ---------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", list(SAVE_DTYPES))
@pytest.mark.parametrize("fmt", FORMATS)
def test_save_lora_writes_each_format_in_the_save_dtype(fmt: str, precision: str, tmp_path: Path) -> None:
    tensors = _lora_tensors(precision)
    assert {k.rsplit(".", 2)[-2] if k.endswith("weight") else "alpha" for k in tensors} == \
        {"lora_down", "lora_up", "alpha"}
    # a 1×1 conv keeps its kernel dims, as in kohya
    assert tensors["lora_unet_blocks_0_proj_in.lora_down.weight"].shape == (4, 8, 1, 1)
    assert tensors["lora_unet_blocks_0_proj_in.lora_up.weight"].shape == (12, 4, 1, 1)
    assert tensors["lora_unet_blocks_0_to_q.lora_down.weight"].shape == (4, 16)
    meta = {"ss_network_dim": "4", "ss_network_alpha": "2.0"}

    path = save_lora(tmp_path / "my.lora-v1.2", tensors, meta, fmt)
    assert path == tmp_path / f"my.lora-v1.2.{fmt}"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temp file left behind

    if fmt == "safetensors":
        loaded, header = load_lora_file(path)
        assert header["ss_network_dim"] == "4" and set(header) == {*meta, "sshs_model_hash", "sshs_legacy_hash"}
    else:
        with pytest.raises(UserError, match="never loads pickles") as err:
            load_lora_file(path)
        assert str(path) in str(err.value)
        loaded = torch.load(path, weights_only=True)  # the test may; lorasweep itself never does
        assert isinstance(loaded, dict)  # kohya's layout: the bare state dict, the metadata is dropped
    assert loaded.keys() == tensors.keys()
    assert all(t.dtype == SAVE_DTYPES[precision] for t in loaded.values())
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    assert loaded["lora_unet_blocks_0_to_q.alpha"].ndim == 0 and float(loaded["lora_unet_blocks_0_to_q.alpha"]) == 2.0


def test_lora_path_extension_rules(tmp_path: Path) -> None:
    assert lora_path(tmp_path / "lora", "safetensors") == tmp_path / "lora.safetensors"
    assert lora_path(tmp_path / "lora.safetensors", "safetensors") == tmp_path / "lora.safetensors"
    assert lora_path(tmp_path / "lora.CKPT", "ckpt") == tmp_path / "lora.CKPT"
    assert lora_path(tmp_path / "v1.5-style", "pt") == tmp_path / "v1.5-style.pt"
    with pytest.raises(ValueError, match="extension"):
        lora_path(tmp_path / "lora.pt", "safetensors")
    with pytest.raises(ValueError, match="format"):
        lora_path(tmp_path / "lora", "diffusers")


@pytest.mark.parametrize("fmt", FORMATS)
def test_save_lora_never_overwrites(fmt: str, tmp_path: Path) -> None:
    tensors = _lora_tensors()
    path = save_lora(tmp_path / "out" / "lora", tensors, {}, fmt)
    before = path.read_bytes()
    with pytest.raises(UserError, match="already exists") as err:
        save_lora(tmp_path / "out" / "lora", _lora_tensors(dim=2), {}, fmt)
    assert str(path) in str(err.value)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_export_copy_is_complete_and_never_overwrites(tmp_path: Path) -> None:
    src = save_lora(tmp_path / "run" / "lora", _lora_tensors(), {"ss_network_dim": "4"}, "safetensors")
    dest = export_copy(src, tmp_path / "export" / src.name)
    assert dest.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in dest.parent.iterdir()) == [src.name]
    other = save_lora(tmp_path / "run2" / "lora", _lora_tensors(dim=2), {}, "safetensors")
    with pytest.raises(UserError, match="already exists"):
        export_copy(other, dest)
    assert dest.read_bytes() == src.read_bytes()


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    bad = {"x.lora_down.weight": torch.zeros(2, 2), "x.lora_up.weight": "not a tensor"}
    with pytest.raises(Exception):  # noqa: B017 - whatever safetensors raises, no file may remain
        save_lora(tmp_path / "lora", bad, {}, "safetensors")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(TypeError, match="str"):
        save_lora(tmp_path / "lora", _lora_tensors(), {"ss_network_dim": 4}, "safetensors")  # type: ignore[dict-item]
    assert list(tmp_path.iterdir()) == []


def test_save_lora_file_writes_exactly_the_given_metadata(tmp_path: Path) -> None:
    save_lora_file(tmp_path / "a.safetensors", _lora_tensors(), {"note": "raw"})
    assert load_lora_file(tmp_path / "a.safetensors")[1] == {"note": "raw"}
    save_lora_file(tmp_path / "b.safetensors", _lora_tensors(), None)
    assert load_lora_file(tmp_path / "b.safetensors")[1] == {}


def test_pickles_are_refused_whatever_their_name(tmp_path: Path) -> None:
    disguised = tmp_path / "lora.safetensors"
    torch.save(_lora_tensors(), disguised)
    with pytest.raises(UserError, match="never loads pickles"):
        load_lora_file(disguised)
    for suffix in (".ckpt", ".pt", ".pth"):
        named = tmp_path / f"x{suffix}"
        named.write_bytes(b"anything")
        with pytest.raises(UserError, match="never loads pickles"):
            load_lora_file(named)


# hashes ------------------------------------------------------------------------------------------------


def _kohya_reference_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """sd-scripts' precalculate_safetensors_hashes, step by step over a stream as kohya reads it."""
    stream = io.BytesIO(safetensors.torch.save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")}))
    n = int.from_bytes(stream.read(8), "little")
    stream.seek(n + 8)
    new = hashlib.sha256()
    for chunk in iter(lambda: stream.read(1 << 20), b""):
        new.update(chunk)
    stream.seek(0x100000)
    return new.hexdigest(), hashlib.sha256(stream.read(0x10000)).hexdigest()[:8]


def test_sshs_hashes_are_kohyas(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(5)
    tensors = {**_lora_tensors(),  # > 1 MiB in all, so the legacy hash reads real bytes
               "lora_unet_wide.lora_down.weight": torch.randn(4, 40_000, generator=g),
               "lora_unet_wide.lora_up.weight": torch.randn(40_000, 4, generator=g),
               "lora_unet_wide.alpha": torch.tensor(2.0)}
    meta = {"ss_network_dim": "64", "ss_training_comment": "x" * 10}
    path = save_lora(tmp_path / "big", tensors, meta, "safetensors")
    assert path.stat().st_size > 0x110000
    header, data = _header_and_data(path)
    stored = header["__metadata__"]
    assert (stored["sshs_model_hash"], stored["sshs_legacy_hash"]) == _kohya_reference_hashes(tensors, meta)
    assert stored["sshs_model_hash"] == hashlib.sha256(data).hexdigest()  # what A1111 recomputes from the file
    assert stored["sshs_legacy_hash"] != hashlib.sha256(b"").hexdigest()[:8]

    # user (non-ss_) keys never change them; an ss_ key shifts the header and so the legacy hash only
    assert kohya_hashes(tensors, {**meta, "user_note": "y" * 500}) == kohya_hashes(tensors, meta)
    longer = kohya_hashes(tensors, {**meta, "ss_training_comment": "x" * 500})
    assert longer[0] == stored["sshs_model_hash"] and longer[1] != stored["sshs_legacy_hash"]


def test_no_metadata_file_has_no_training_keys(tmp_path: Path) -> None:
    cfg = TrainConfig()
    cfg.output.no_metadata = True
    cfg.output.comment = "secret"
    meta = kohya_metadata(cfg, _facts())
    assert meta == {}
    tensors = _lora_tensors()
    path = save_lora(tmp_path / "lora", tensors, meta, "safetensors")
    header = load_lora_file(path)[1]
    assert set(header) == {"sshs_model_hash", "sshs_legacy_hash"}  # content hashes only, as kohya keeps them
    assert not any(k.startswith("ss_") for k in header)


def test_model_file_hashes(tmp_path: Path) -> None:
    blob = bytes(range(256)) * 8192  # 2 MiB
    model = tmp_path / "model.safetensors"
    model.write_bytes(blob)
    assert sha256_file(model) == hashlib.sha256(blob).hexdigest()
    assert legacy_model_hash(model) == hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
    assert legacy_model_hash(tmp_path) is None and sha256_file(tmp_path / "missing") is None


# metadata ----------------------------------------------------------------------------------------------


def test_kohya_metadata_values(tmp_path: Path) -> None:
    cfg = TrainConfig()
    cfg.network.dim, cfg.network.alpha = 16, 8
    cfg.optimizer.lr, cfg.optimizer.unet_lr = 2e-4, 1e-4
    cfg.output.name, cfg.output.comment = "shiroko", "trigger: shiroko"
    cfg.training.seed, cfg.training.batch_size, cfg.training.grad_accum_steps = 1234, 2, 3
    cfg.data.resolution = 512
    cfg.data.caption_dropout_rate, cfg.data.caption_tag_dropout_rate, cfg.data.keep_tokens = 0.05, 0.1, 1
    cfg.data.shuffle_caption, cfg.data.flip_aug = True, True
    cfg.data.buckets.min_side, cfg.data.buckets.max_side = 256, 1024
    cfg.model.clip_skip, cfg.model.max_token_length = 2, 225
    cfg.training.prior_loss_weight = 0.5
    checkpoint = tmp_path / "sd15.safetensors"
    checkpoint.write_bytes(b"\0" * 10)
    buckets = {"buckets": {0: {"resolution": [512, 512], "count": 30}, 1: {"resolution": [448, 576], "count": 10}},
               "mean_img_ar_error": 0.01}
    facts = _facts(model_id=str(checkpoint), model_hash="0123abcd", new_model_hash="f" * 64, num_reg_images=20,
                   reg_dataset_dirs={"1_girl": {"n_repeats": 1, "img_count": 20}}, bucket_info=buckets,
                   steps=20, epoch=2, finished_at=1700000999.0, num_validation_images=5)
    meta = kohya_metadata(cfg, facts)
    assert all(isinstance(v, str) for v in meta.values()) and all(k.startswith("ss_") for k in meta)
    expected = {
        "ss_network_module": "networks.lora", "ss_network_dim": "16", "ss_network_alpha": "8.0",
        "ss_learning_rate": "0.0002", "ss_unet_lr": "0.0001", "ss_text_encoder_lr": "None",
        "ss_base_model_version": "sd_v1", "ss_v2": "False", "ss_resolution": "(512, 512)",
        "ss_training_comment": "trigger: shiroko", "ss_seed": "1234", "ss_output_name": "shiroko",
        "ss_sd_model_name": "sd15.safetensors", "ss_sd_model_hash": "0123abcd", "ss_new_sd_model_hash": "f" * 64,
        "ss_num_reg_images": "20", "ss_prior_loss_weight": "0.5", "ss_max_token_length": "225",
        "ss_clip_skip": "2", "ss_enable_bucket": "True", "ss_min_bucket_reso": "256", "ss_max_bucket_reso": "1024",
        "ss_bucket_no_upscale": "False", "ss_caption_dropout_rate": "0.05", "ss_caption_dropout_every_n_epochs": "0",
        "ss_caption_tag_dropout_rate": "0.1", "ss_shuffle_caption": "True", "ss_keep_tokens": "1",
        "ss_color_aug": "False", "ss_flip_aug": "True", "ss_random_crop": "False", "ss_lr_scheduler": "constant",
        "ss_mixed_precision": "no", "ss_full_fp16": "False", "ss_batch_size_per_device": "2",
        "ss_total_batch_size": "6", "ss_steps": "20", "ss_epoch": "2", "ss_max_train_steps": "30",
        "ss_training_started_at": "1700000000.5", "ss_training_finished_at": "1700000999.0",
        "ss_num_train_images": "40", "ss_num_validation_images": "5", "ss_lr_warmup_steps": "2",
    }
    assert {k: meta.get(k) for k in expected} == expected
    assert "ss_network_args" not in meta  # kohya writes it only for non-default network arguments
    assert "ss_vae_name" not in meta
    assert json.loads(meta["ss_tag_frequency"]) == facts.tag_frequency
    assert json.loads(meta["ss_dataset_dirs"]) == facts.dataset_dirs
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"1_girl": {"n_repeats": 1, "img_count": 20}}
    assert json.loads(meta["ss_bucket_info"])["buckets"]["1"] == {"resolution": [448, 576], "count": 10}
    assert meta["ss_optimizer"].startswith(("torch.optim", "AdamW", "adamw"))
    assert "AdamW" in meta["ss_optimizer"] or "adamw" in meta["ss_optimizer"].lower()


def test_kohya_metadata_switches() -> None:
    cfg = TrainConfig()
    meta = kohya_metadata(cfg, _facts())
    # defaults: kohya's spelling of "not set"
    assert meta["ss_max_token_length"] == "None" and meta["ss_training_comment"] == "None"
    assert meta["ss_sd_model_name"] == "runwayml/stable-diffusion-v1-5"  # a hub id stays as given
    assert "ss_sd_model_hash" not in meta and "ss_new_sd_model_hash" not in meta
    assert float(meta["ss_training_finished_at"]) >= float(meta["ss_training_started_at"])
    assert meta["ss_steps"] == "30"

    cfg.data.resolution = [512, 768]  # (width, height)
    cfg.data.buckets.min_side, cfg.data.buckets.max_side, cfg.data.buckets.step = 250, 1000, 64
    wide = kohya_metadata(cfg, _facts())
    assert wide["ss_resolution"] == "(512, 768)"
    assert (wide["ss_min_bucket_reso"], wide["ss_max_bucket_reso"]) == ("192", "1024")  # kohya rounds outwards

    cfg.data.buckets.enabled = False
    off = kohya_metadata(cfg, _facts(bucket_info={"buckets": {}}))
    assert (off["ss_enable_bucket"], off["ss_min_bucket_reso"], off["ss_max_bucket_reso"], off["ss_bucket_info"]) \
        == ("False", "None", "None", "null")
    cfg.network.target = "attention"
    cfg.model.vae = "stabilityai/sd-vae-ft-mse"
    other = kohya_metadata(cfg, _facts(vae_hash="9999aaaa"))
    assert json.loads(other["ss_network_args"]) == {"target": "attention"}
    assert other["ss_vae_name"] == "stabilityai/sd-vae-ft-mse" and other["ss_vae_hash"] == "9999aaaa"
    assert (base_model_version(False, False), base_model_version(True, False), base_model_version(True, True)) == \
        ("sd_v1", "sd_v2", "sd_v2_v")
    cfg.model.v2, cfg.model.v_parameterization = True, True
    v2 = kohya_metadata(cfg, _facts())
    assert (v2["ss_v2"], v2["ss_base_model_version"]) == ("True", "sd_v2_v")


def test_session_id_is_reproducible_and_per_config() -> None:
    a, b = TrainConfig(), TrainConfig()
    assert session_id(a) == session_id(b)
    assert 0 <= session_id(a) <= 2**32
    b.training.seed += 1
    assert session_id(a) != session_id(b)
    b.training.seed -= 1
    b.trial.number = 7  # two trials of one sweep with the same seed are still different sessions
    assert session_id(a) != session_id(b)
    assert kohya_metadata(a, _facts())["ss_session_id"] == str(session_id(a))


# validation --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"dim": 0}, "network.dim"),
        ({"dim": -4}, "network.dim"),
        ({"dropout": 1.0}, "network.dropout"),
        ({"dropout": -0.1}, "network.dropout"),
        ({"alpha": 0.0}, "network.alpha"),
        ({"alpha": -1.0}, "network.alpha"),
        ({"train_unet": False, "train_text_encoder": False}, "network.train_unet"),
        ({"init_weights": "/nonexistent/lora.safetensors"}, "network.init_weights"),
        ({"target": "everything"}, "network.target"),
    ],
)
def test_network_validation_names_the_key(overrides: dict[str, object], key: str) -> None:
    with pytest.raises(UserError) as err:
        to_train_config({"network": overrides})
    assert err.value.where.startswith(key)
    with pytest.raises(UserError):
        NetworkConfig(**overrides).validate()  # type: ignore[arg-type]


def test_init_weights_must_be_a_safetensors_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pickle = tmp_path / "old.ckpt"
    pickle.write_bytes(b"x")
    with pytest.raises(UserError, match="never loads pickles") as err:
        NetworkConfig(init_weights=str(pickle)).validate()
    assert err.value.where == "network.init_weights"
    with pytest.raises(UserError, match="not an existing file"):
        NetworkConfig(init_weights=str(tmp_path)).validate()
    good = tmp_path / "lora.safetensors"
    good.write_bytes(b"x")
    NetworkConfig(init_weights=str(good)).validate()
    monkeypatch.setenv("HOME", str(tmp_path))
    NetworkConfig(init_weights="~/lora.safetensors").validate()


def test_output_validation() -> None:
    for fmt in FORMATS:
        OutputConfig(format=fmt).validate()
    with pytest.raises(UserError, match=r"output\.format") as err:
        to_train_config({"output": {"format": "diffusers"}})
    assert "safetensors" in str(err.value)
    with pytest.raises(UserError, match=r"output\.save_every_n_epochs"):
        OutputConfig(save_every_n_epochs=0).validate()
    with pytest.raises(UserError, match=r"output\.name.*extension"):
        OutputConfig(name="shiroko.safetensors").validate()
    with pytest.raises(UserError, match=r"output\.name"):
        OutputConfig(name="shiroko.CKPT", format="ckpt").validate()
    OutputConfig(name="shiroko-v1.5").validate()  # a dot inside a name is fine


def test_saved_metadata_round_trips_through_the_file(tmp_path: Path) -> None:
    cfg = TrainConfig()
    cfg.output.comment = "naïve ünïcode ✓"
    meta = kohya_metadata(cfg, _facts())
    path = save_lora(tmp_path / cfg.output.name, _lora_tensors("fp16"), meta, cfg.output.format)
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
    assert {k: header[k] for k in meta} == meta
    assert header["ss_training_comment"] == "naïve ünïcode ✓"
