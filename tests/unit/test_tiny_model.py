"""The offline CLIP tokenizer and the tiny SD-1.x pipeline: loadable, reproducible, cached once."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before diffusers/transformers import huggingface_hub

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import CLIPTokenizer

from lorasweep.data.synthetic import DEFAULT_PROMPTS, WORDS
from lorasweep.models import tiny
from lorasweep.models.tokenizer import MODEL_MAX_LENGTH, VOCAB_WORDS, build_tokenizer

FEW = {"vae_steps": 2, "text_steps": 2, "unet_steps": 2}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> CLIPTokenizer:
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    dest = tmp_path_factory.mktemp("tiny") / "model"
    return dest, tiny.build_tiny_model(dest, **FEW)


# ------------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_files_and_reload(tmp_path: Path, tokenizer: CLIPTokenizer) -> None:
    dest = tmp_path / "tok"
    build_tokenizer(dest)
    assert {"vocab.json", "merges.txt", "tokenizer_config.json", "tokenizer.json"} <= {p.name for p in dest.iterdir()}
    again = CLIPTokenizer.from_pretrained(str(dest), local_files_only=True)
    assert again.get_vocab() == tokenizer.get_vocab()
    assert len(tokenizer) < 2000
    assert tokenizer.model_max_length == MODEL_MAX_LENGTH == 77
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.bos_token == "<|startoftext|>"
    first = tmp_path / "again"
    build_tokenizer(first)
    for name in ("vocab.json", "merges.txt", "tokenizer.json"):  # byte-identical rebuilds
        assert (first / name).read_bytes() == (dest / name).read_bytes()


def test_every_word_is_one_token(tokenizer: CLIPTokenizer) -> None:
    assert set(WORDS) <= set(VOCAB_WORDS)
    for word in VOCAB_WORDS:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert tokenizer.convert_ids_to_tokens(ids) == [f"{word}</w>"], word


def test_whole_word_ids_and_round_trip(tokenizer: CLIPTokenizer) -> None:
    ids = tokenizer("zorb, on the left").input_ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens == ["<|startoftext|>", "zorb</w>", ",</w>", "on</w>", "the</w>", "left</w>", "<|endoftext|>"]
    for prompt in DEFAULT_PROMPTS:
        decoded = tokenizer.decode(tokenizer(prompt).input_ids, skip_special_tokens=True)
        assert decoded.replace(" ,", ",") == prompt


def test_unknown_words_fall_back_to_characters(tokenizer: CLIPTokenizer) -> None:
    ids = tokenizer("Qwxyz glorp™", add_special_tokens=False).input_ids
    assert tokenizer.unk_token_id not in ids
    assert len(ids) >= 9
    assert tokenizer.decode(ids) == "qwxyz glorp ™"  # CLIP splits symbols from letters, as the real one does


def test_padding_to_77(tokenizer: CLIPTokenizer) -> None:
    batch = tokenizer(
        ["a red circle", "", "word " * 200], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    assert batch.shape == (3, 77)
    assert batch[1, 0] == tokenizer.bos_token_id and (batch[1, 1:] == tokenizer.eos_token_id).all()
    assert batch[2, -1] == tokenizer.eos_token_id


# ------------------------------------------------------------------------------------------ tiny model


def test_build_is_bitwise_reproducible(tmp_path: Path, built: tuple[Path, dict[str, Any]]) -> None:
    dest, report = built
    again = tiny.build_tiny_model(tmp_path / "again", **FEW)
    assert again["manifest"] == report["manifest"]
    weights = [f for f in report["manifest"]["files"] if f.endswith(".safetensors")]
    assert sorted(weights) == [
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    assert json.loads((dest / tiny.MANIFEST_NAME).read_text()) == report["manifest"]
    assert set(report["seconds"]) >= {"vae", "unet", "total"}


def test_folder_layout_and_configs(built: tuple[Path, dict[str, Any]]) -> None:
    dest, report = built
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (dest / sub).is_dir(), sub
    assert {"vocab.json", "merges.txt"} <= {p.name for p in (dest / "tokenizer").iterdir()}
    index = json.loads((dest / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    scheduler = json.loads((dest / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DDPMScheduler"
    assert scheduler["beta_schedule"] == "scaled_linear" and scheduler["num_train_timesteps"] == 1000
    assert (scheduler["beta_start"], scheduler["beta_end"]) == (0.00085, 0.012)
    assert scheduler["prediction_type"] == "epsilon"
    vae = json.loads((dest / "vae" / "config.json").read_text())
    assert vae["latent_channels"] == 4 and len(vae["block_out_channels"]) == 4
    assert vae["scaling_factor"] == report["manifest"]["scaling_factor"] > 0
    low, high = tiny._UNET_PARAMS_RANGE
    assert low <= report["unet_params"] <= high


def test_pipeline_loads_and_generates(built: tuple[Path, dict[str, Any]]) -> None:
    from diffusers import StableDiffusionPipeline

    dest, _ = built
    pipe = StableDiffusionPipeline.from_pretrained(
        str(dest), safety_checker=None, requires_safety_checker=False, local_files_only=True
    )
    assert pipe.vae_scale_factor == 8
    text = pipe.text_encoder.config
    assert (text.bos_token_id, text.eos_token_id, text.pad_token_id) == (
        pipe.tokenizer.bos_token_id,
        pipe.tokenizer.eos_token_id,
        pipe.tokenizer.pad_token_id,
    )
    assert text.vocab_size == len(pipe.tokenizer)
    assert pipe.unet.config.cross_attention_dim == text.hidden_size
    names = {name for name, _ in pipe.unet.named_modules()}
    for target in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k"):
        assert any(n.endswith(target) for n in names), target
    for target in ("ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"):
        assert any(n.endswith(target) for n in names), target
    image = pipe(
        DEFAULT_PROMPTS[0],
        num_inference_steps=2,
        guidance_scale=5.0,
        height=tiny.RESOLUTION,
        width=tiny.RESOLUTION,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (64, 64)


def test_ensure_builds_once_and_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tiny.ensure_tiny_model(tmp_path, **FEW)
    assert folder == tiny.tiny_model_dir(tmp_path, **FEW)
    assert folder.parent == tmp_path / "models" and folder.name.startswith(f"tiny-sd1-v{tiny.TINY_VERSION}")
    assert tiny.verify_tiny_model(folder)
    assert not list(folder.parent.glob(f".{folder.name}.tmp-*"))
    stamp = (folder / tiny.MANIFEST_NAME).stat().st_mtime_ns

    def no_rebuild(*args: object, **kwargs: object) -> dict[str, Any]:
        raise AssertionError("rebuilt although the cache is complete")

    monkeypatch.setattr(tiny, "build_tiny_model", no_rebuild)
    assert tiny.ensure_tiny_model(tmp_path, **FEW) == folder
    assert (folder / tiny.MANIFEST_NAME).stat().st_mtime_ns == stamp


def test_ensure_rebuilds_a_damaged_cache(tmp_path: Path, built: tuple[Path, dict[str, Any]]) -> None:
    source, report = built
    folder = tiny.tiny_model_dir(tmp_path, **FEW)
    shutil.copytree(source, folder)  # a complete cache, as ensure_tiny_model would have left it
    assert tiny.ensure_tiny_model(tmp_path, **FEW) == folder
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"truncated")
    assert not tiny.verify_tiny_model(folder)
    assert tiny.ensure_tiny_model(tmp_path, **FEW) == folder
    assert tiny.verify_tiny_model(folder)
    assert json.loads((folder / tiny.MANIFEST_NAME).read_text()) == report["manifest"]


def test_default_folder_name_and_real_step_counts(tmp_path: Path) -> None:
    assert tiny.tiny_model_dir(tmp_path) == tmp_path / "models" / f"tiny-sd1-v{tiny.TINY_VERSION}"
    assert tiny.tiny_model_dir(tmp_path, vae_steps=tiny.VAE_STEPS) == tiny.tiny_model_dir(tmp_path)
    assert tiny.VAE_STEPS >= 350 and tiny.TEXT_STEPS >= 100 and tiny.UNET_STEPS >= 300
