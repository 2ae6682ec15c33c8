"""model.base / model.vae / model.v2 / model.v_parameterization: diffusers folders, single-file checkpoints
(SD 1.x and SD 2.x layouts), replacement VAEs, and a UserError naming the key for every bad input."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before diffusers/transformers import huggingface_hub

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from lorasweep.config.model import ModelConfig
from lorasweep.errors import UserError
from lorasweep.models import single_file
from lorasweep.models.loading import BaseModel, load_base_model, model_hash, resolve_base
from lorasweep.models.single_file import save_single_file

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tiny(untrained_tiny: Path) -> Path:
    return untrained_tiny



@pytest.fixture(autouse=True)
def empty_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No test may depend on what the machine's hub cache holds."""
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def sd1_file(tiny: Path) -> Path:
    return save_single_file(tiny, tiny.parent / "tiny-sd1.safetensors")


@pytest.fixture(scope="module")
def folder_model(tiny: Path) -> BaseModel:
    return load_base_model(ModelConfig(base=str(tiny)))


@pytest.fixture(scope="module")
def sd2_parts(tiny: Path, folder_model: BaseModel) -> dict[str, Any]:
    """A random SD-2-style model at toy width: linear projections, 64-channel heads, a GELU text encoder."""
    torch.manual_seed(1)
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(1, 1),
                                use_linear_projection=True, cross_attention_dim=64, norm_num_groups=32).eval()
    tokenizer = folder_model.tokenizer
    text_config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256,
                                 num_hidden_layers=2, num_attention_heads=1, max_position_embeddings=77,
                                 hidden_act="gelu", bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return {"unet": unet, "vae": folder_model.vae, "text_encoder": CLIPTextModel(text_config).eval()}


@pytest.fixture(scope="module")
def sd2_file(tiny: Path, sd2_parts: dict[str, Any]) -> Path:
    return save_single_file(sd2_parts, tiny.parent / "tiny-sd2.safetensors", v2=True)


def public(config: Any) -> dict[str, Any]:
    items = config.to_dict().items() if hasattr(config, "to_dict") else dict(config).items()
    return {k: v for k, v in items if not k.startswith("_") and k not in ("architectures", "dtype")}


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


@torch.no_grad()
def assert_same_outputs(a: BaseModel | dict[str, Any], b: BaseModel, text_width: int, *,
                        vae: bool = True) -> None:
    """UNet, VAE and text encoder of ``b`` compute what those of ``a`` compute, to 1e-6."""
    get = a.get if isinstance(a, dict) else lambda name: getattr(a, name)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=gen)
    states = torch.randn(1, 77, text_width, generator=gen)
    t = torch.tensor([900])
    torch.testing.assert_close(b.unet(latents, t, states).sample, get("unet")(latents, t, states).sample,
                               rtol=0, atol=1e-6)
    ids = b.tokenizer(["zorb, on the left", "a red circle"], padding="max_length", max_length=77,
                      return_tensors="pt").input_ids
    torch.testing.assert_close(b.text_encoder(ids).last_hidden_state, get("text_encoder")(ids).last_hidden_state,
                               rtol=0, atol=1e-6)
    if vae:
        pixels = torch.rand(1, 3, 32, 32, generator=gen) * 2 - 1
        torch.testing.assert_close(b.vae.encode(pixels).latent_dist.mean, get("vae").encode(pixels).latent_dist.mean,
                                   rtol=0, atol=1e-6)
        small = latents[:, :, :4, :4]
        torch.testing.assert_close(b.vae.decode(small).sample, get("vae").decode(small).sample, rtol=0, atol=1e-6)


def user_error(cfg: ModelConfig, *, load: bool = False) -> UserError:
    with pytest.raises(UserError) as info:
        load_base_model(cfg) if load else resolve_base(cfg)
    return info.value


# ------------------------------------------------------------------------------------------ single files


def test_sd1_single_file_loads_like_the_folder(tiny: Path, sd1_file: Path, folder_model: BaseModel) -> None:
    with safe_open(str(sd1_file), framework="pt") as handle:
        keys = set(handle.keys())
    # The original LDM layout, as A1111 and kohya read it.
    assert {"model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.out.2.weight",
            "model.diffusion_model.middle_block.1.proj_in.weight", "first_stage_model.encoder.mid.attn_1.q.weight",
            "first_stage_model.decoder.up.3.block.0.conv1.weight",
            "cond_stage_model.transformer.text_model.final_layer_norm.weight"} <= keys
    assert single_file.checkpoint_layout(keys) == "sd1"

    loaded = load_base_model(ModelConfig(base=str(sd1_file), tokenizer=str(tiny)))
    assert loaded.model_id == str(sd1_file.resolve()) and loaded.source_dir == sd1_file.resolve()
    for part in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(folder_model, part), getattr(loaded, part))
        assert public(getattr(loaded, part).config) == public(getattr(folder_model, part).config), part
    assert_same_outputs(folder_model, loaded, text_width=64)
    assert public(loaded.noise_scheduler.config) == public(folder_model.noise_scheduler.config)
    assert not any(p.requires_grad for p in loaded.unet.parameters())
    # ss_sd_model_hash is kohya's model_hash: sha256 of the 64 KiB at offset 1 MiB, 8 hex digits.
    data = sd1_file.read_bytes()
    assert loaded.model_hash == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert len(folder_model.model_hash) == 8 and folder_model.model_hash != loaded.model_hash


def test_architecture_is_read_from_shapes_without_stored_configs(tiny: Path, folder_model: BaseModel) -> None:
    """Real checkpoints carry no diffusers config: channels, depths and attention placement come from the
    tensor shapes; heads and GroupNorm groups take SD's standard values."""
    bare = save_single_file(tiny, tiny.parent / "bare.safetensors", store_configs=False)
    with safe_open(str(bare), framework="pt") as handle:
        assert not set(single_file.CONFIG_METADATA.values()) & set(handle.metadata())
    loaded = load_base_model(ModelConfig(base=str(bare), tokenizer=str(tiny)))
    for part in ("unet", "vae", "text_encoder"):
        assert_same_weights(getattr(folder_model, part), getattr(loaded, part))
    ours, theirs = public(folder_model.unet.config), public(loaded.unet.config)
    assert {k: v for k, v in theirs.items() if ours[k] != v} == {"sample_size": 64}  # 512 px, SD 1.x's default
    vae = public(loaded.vae.config)
    assert vae["norm_num_groups"] == 32 and vae["scaling_factor"] == 0.18215  # not in the shapes: SD's values
    assert vae["block_out_channels"] == [32, 32, 64, 64] and vae["layers_per_block"] == 1
    text = loaded.text_encoder.config
    assert (text.hidden_size, text.num_hidden_layers, text.vocab_size) == (64, 2, len(folder_model.tokenizer))
    assert text.num_attention_heads == 1  # CLIP's heads are 64 wide
    # The tiny UNet happens to use SD 1.x's 8 heads, so it computes exactly what the folder's does.
    gen = torch.Generator().manual_seed(0)
    latents, states = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 77, 64, generator=gen)
    t = torch.tensor([5])
    with torch.no_grad():
        assert torch.equal(loaded.unet(latents, t, states).sample, folder_model.unet(latents, t, states).sample)


def test_sd2_single_file(tiny: Path, sd2_file: Path, sd2_parts: dict[str, Any]) -> None:
    with safe_open(str(sd2_file), framework="pt") as handle:
        keys = set(handle.keys())
    assert single_file.checkpoint_layout(keys) == "sd2"
    assert {"cond_stage_model.model.token_embedding.weight", "cond_stage_model.model.positional_embedding",
            "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight",
            "cond_stage_model.model.transformer.resblocks.2.mlp.c_fc.weight",  # OpenCLIP's unused last block
            "cond_stage_model.model.text_projection"} <= keys

    err = user_error(ModelConfig(base=str(sd2_file), tokenizer=str(tiny)))
    assert err.where == "model.v2" and "SD 2" in err.problem and "model.v2=true" in err.hint

    loaded = load_base_model(ModelConfig(base=str(sd2_file), tokenizer=str(tiny), v2=True, v_parameterization=True))
    assert loaded.v2 and loaded.text_encoder.config.num_hidden_layers == 2  # the penultimate block is the last
    assert loaded.unet.config.use_linear_projection
    assert loaded.noise_scheduler.config.prediction_type == "v_prediction"
    assert_same_outputs(sd2_parts, loaded, text_width=64)

    # Without stored configs SD 2's conventions apply: GELU, 64-channel heads in UNet and text encoder.
    bare = save_single_file(sd2_parts, tiny.parent / "sd2-bare.safetensors", v2=True, store_configs=False)
    inferred = load_base_model(ModelConfig(base=str(bare), tokenizer=str(tiny), v2=True))
    assert_same_outputs(sd2_parts, inferred, text_width=64, vae=False)
    assert inferred.text_encoder.config.hidden_act == "gelu" and inferred.unet.config.upcast_attention
    assert list(inferred.unet.config.attention_head_dim) == [1, 1]  # max(1, channels // 64)


def test_v2_must_match_the_model(tiny: Path, sd1_file: Path, tmp_path: Path) -> None:
    for base in (str(sd1_file), str(tiny), "tiny"):
        err = user_error(ModelConfig(base=base, tokenizer=str(tiny), v2=True))
        assert err.where == "model.v2" and "SD 1" in err.problem, base
    # A diffusers folder is recognised by its 1024-wide text encoder (SD 2's OpenCLIP-H).
    sd2_folder = tmp_path / "sd2"
    shutil.copytree(tiny, sd2_folder)
    config_path = sd2_folder / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "hidden_size": 1024}))
    err = user_error(ModelConfig(base=str(sd2_folder)))
    assert err.where == "model.v2" and str(sd2_folder) in err.problem
    resolve_base(ModelConfig(base=str(sd2_folder), v2=True))  # accepted


def test_tokenizer_from_the_local_hub_cache(tiny: Path, sd1_file: Path, empty_hub_cache: Path) -> None:
    err = user_error(ModelConfig(base=str(sd1_file)))
    assert err.where == "model.tokenizer"
    assert "openai/clip-vit-large-patch14" in err.problem and "model.tokenizer" in err.hint
    # The hub cache's layout: refs/main names the snapshot that holds the files.
    repo = empty_hub_cache / "models--openai--clip-vit-large-patch14"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copytree(tiny / "tokenizer", repo / "snapshots" / ("0" * 40))
    loaded = load_base_model(ModelConfig(base=str(sd1_file)))
    assert loaded.tokenizer.get_vocab() == load_base_model(ModelConfig(base=str(tiny))).tokenizer.get_vocab()
    err = user_error(ModelConfig(base=str(sd1_file), tokenizer=str(tiny / "nothing-here")))
    assert err.where == "model.tokenizer"


def test_pickle_checkpoints_need_allow_pickle(tiny: Path, sd1_file: Path, folder_model: BaseModel,
                                              tmp_path: Path) -> None:
    with safe_open(str(sd1_file), framework="pt") as handle:
        names = handle.keys()  # a safe_open handle is not iterable
        tensors = {k: handle.get_tensor(k) for k in names}
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": tensors, "global_step": 7}, ckpt)
    err = user_error(ModelConfig(base=str(ckpt), tokenizer=str(tiny)))
    assert err.where == "model.base" and "model.allow_pickle=true" in err.hint

    loaded = load_base_model(ModelConfig(base=str(ckpt), tokenizer=str(tiny), allow_pickle=True))
    assert_same_weights(folder_model.vae, loaded.vae)  # read through the stored-config-free path: shapes only
    assert_same_weights(folder_model.unet, loaded.unet)

    # weights_only refuses pickled objects other than tensors and containers.
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": tensors, "callback": Path("x")}, evil)
    err = user_error(ModelConfig(base=str(evil), tokenizer=str(tiny), allow_pickle=True), load=True)
    assert err.where == "model.base" and "weights-only" in err.problem


def test_tiny_base_loads_the_built_folder(tiny: Path, folder_model: BaseModel,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from lorasweep.models import tiny as tiny_module

    monkeypatch.setattr(tiny_module, "ensure_tiny_model", lambda cache_root: tiny)  # skip the 3-minute build
    loaded = load_base_model(ModelConfig())
    assert loaded.model_id == f"lorasweep/tiny-sd1-v{tiny_module.TINY_VERSION}" and loaded.source_dir == tiny
    assert loaded.model_hash == model_hash(tiny) == folder_model.model_hash and not loaded.v2
    assert_same_weights(folder_model.unet, loaded.unet)


# ------------------------------------------------------------------------------------------ VAE, scheduler


def test_replacement_vae(tiny: Path, folder_model: BaseModel, tmp_path: Path) -> None:
    other = AutoencoderKL.from_config(folder_model.vae.config)
    with torch.no_grad():
        for param in other.parameters():
            param.copy_(torch.randn_like(param) * 0.02)
    other.save_pretrained(tmp_path / "with-sub" / "vae")
    other.save_pretrained(tmp_path / "bare")
    full = save_single_file({"unet": folder_model.unet, "vae": other, "text_encoder": folder_model.text_encoder},
                            tmp_path / "full.safetensors")
    with safe_open(str(full), framework="pt") as handle:  # an LDM VAE file as SD's released VAEs are
        names = handle.keys()
        ldm_vae = {k.removeprefix("first_stage_model."): handle.get_tensor(k) for k in names
                   if k.startswith("first_stage_model.")}
        metadata = handle.metadata()
    save_file(ldm_vae, tmp_path / "vae.safetensors", metadata=metadata)
    for vae in (tmp_path / "with-sub", tmp_path / "bare", full, tmp_path / "vae.safetensors"):
        loaded = load_base_model(ModelConfig(base=str(tiny), vae=str(vae)))
        assert_same_weights(other, loaded.vae)
        assert loaded.vae.config.norm_num_groups == 8
        assert loaded.vae_hash == model_hash(vae)
    assert folder_model.vae_hash is None

    for bad, problem in ((tmp_path / "missing", "does not exist"), (tmp_path / "with-sub" / "vae" / "config.json",
                                                                    "neither")):
        err = user_error(ModelConfig(base=str(tiny), vae=str(bad)))
        assert err.where == "model.vae" and problem in err.problem


def test_v_parameterization_sets_the_prediction_type(tiny: Path, folder_model: BaseModel,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    assert folder_model.noise_scheduler.config.prediction_type == "epsilon"
    with caplog.at_level(logging.WARNING, logger="lorasweep"):
        cfg = ModelConfig(base=str(tiny), v_parameterization=True)
        cfg.validate()
    assert "v_parameterization" in caplog.text  # kohya allows v-prediction SD 1.x, with a warning
    loaded = load_base_model(cfg)
    assert loaded.noise_scheduler.config.prediction_type == "v_prediction"
    assert loaded.noise_scheduler.config.beta_schedule == "scaled_linear"


# ------------------------------------------------------------------------------------------ bad input


def test_bad_inputs_name_their_key(tiny: Path, tmp_path: Path) -> None:
    err = user_error(ModelConfig(base=str(tmp_path / "nope.safetensors")))
    assert err.where == "model.base" and "does not exist" in err.problem

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(4096))
    err = user_error(ModelConfig(base=str(garbage)))
    assert err.where == "model.base" and "not a readable .safetensors" in err.problem

    not_sd = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.lora_up.weight": torch.zeros(2, 2)}, not_sd)
    err = user_error(ModelConfig(base=str(not_sd)))
    assert err.where == "model.base" and "not an SD 1.x/2.x single-file checkpoint" in err.problem

    text = tmp_path / "model.txt"
    text.write_text("hello")
    assert user_error(ModelConfig(base=str(text))).where == "model.base"

    err = user_error(ModelConfig(base="nobody-lorasweep/no-such-model"))
    assert err.where == "model.base" and "offline" in err.problem and "hf download" in err.hint

    err = user_error(ModelConfig(base=str(tiny), clip_skip=3), load=True)
    assert err.where == "model.clip_skip" and "2" in err.hint

    for bad in (100, 300):
        with pytest.raises(UserError) as info:
            ModelConfig(max_token_length=bad).validate()
        assert info.value.where == "model.max_token_length"
    ModelConfig(max_token_length=225).validate()


def test_writer_never_overwrites_and_folder_hash_follows_weights(tiny: Path, sd1_file: Path, tmp_path: Path) -> None:
    before = sd1_file.read_bytes()
    with pytest.raises(FileExistsError):
        save_single_file(tiny, sd1_file)
    assert sd1_file.read_bytes() == before
    copy = tmp_path / "copy"
    shutil.copytree(tiny, copy)
    assert model_hash(copy) == model_hash(tiny)
    weights = copy / "text_encoder" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert model_hash(copy) != model_hash(tiny)
