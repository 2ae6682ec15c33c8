"""Single-file SD-1.x / SD-2.x checkpoints in the original (LDM/CompVis) key layout, read and written offline.

Why not diffusers' ``from_single_file``: offline it works only with ``config=<local diffusers folder>``, and
an LDM ``original_config`` YAML hard-codes 32 GroupNorm groups (the embedded tiny VAE has 8). Instead the
state dict is converted with diffusers' own converters (:mod:`diffusers.loaders.single_file_utils`) into
models built from a config made here:

* what the tensor shapes tell is read from them: channels per level, layers per block, where attention
  sits, cross-attention width, linear vs. convolutional projections, text encoder width/depth/vocabulary,
  VAE channels and latent channels;
* what they cannot tell takes the SD-standard value: attention heads (8 for SD 1.x, 64-channel heads for
  SD 2.x and for CLIP), 32 GroupNorm groups, the VAE scaling factor 0.18215, SD's DDPM noise schedule;
* a file written by :func:`save_single_file` also carries the exact diffusers configs in its safetensors
  metadata (``lorasweep.*_config``); they are used when present, so such a file loads bit-identically.

SD 2.x follows diffusers' SD 2 folders (and kohya): the OpenCLIP text encoder becomes a ``CLIPTextModel``
without OpenCLIP's last block, so its ``last_hidden_state`` is the penultimate layer after the final layer
norm — the layer SD 2 was trained on.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorasweep.errors import UserError

if TYPE_CHECKING:  # imported by the functions that make tensors: model.base checks must stay cheap
    import torch

__all__ = [
    "CLIP_PREFIX",
    "CONFIG_METADATA",
    "OPEN_CLIP_PREFIX",
    "PICKLE_SUFFIXES",
    "UNET_PREFIX",
    "VAE_PREFIX",
    "SingleFileModel",
    "check_layout",
    "checkpoint_layout",
    "infer_text_config",
    "infer_unet_config",
    "infer_vae_config",
    "load_checkpoint",
    "load_vae_file",
    "read_header",
    "read_keys",
    "read_state_dict",
    "save_single_file",
    "sd_scheduler_config",
]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
#: Suffixes read with ``torch.load`` (a pickle); refused unless ``model.allow_pickle``.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
#: Metadata keys in which :func:`save_single_file` stores each part's diffusers/transformers config (JSON).
CONFIG_METADATA = {
    "unet": "lorasweep.unet_config",
    "vae": "lorasweep.vae_config",
    "text_encoder": "lorasweep.text_encoder_config",
    "scheduler": "lorasweep.scheduler_config",
}
_VAE_KEY_STARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
_SD_VAE_SCALING_FACTOR = 0.18215
# diffusers ResnetBlock2D name → LDM ResBlock name (UNet); the VAE's resnets share diffusers' names.
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "self_attn.out_proj": "attn.out_proj"}


def sd_scheduler_config() -> dict[str, Any]:
    """SD 1.x/2.x's training noise schedule (what kohya builds for every SD model; also the tiny model's)."""
    return {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "prediction_type": "epsilon", "clip_sample": False, "steps_offset": 1, "timestep_spacing": "leading"}


@dataclass
class SingleFileModel:
    """The frozen parts converted from one checkpoint, plus the scheduler config its metadata carried."""

    unet: Any
    vae: Any
    text_encoder: Any
    scheduler_config: dict[str, Any] | None
    layout: str


# --------------------------------------------------------------------------------------------------------
# reading


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_header(path: Path, key: str) -> tuple[list[str], dict[str, str]]:
    """Tensor names and metadata of a ``.safetensors`` file, from its header only (cheap for any size)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys()), dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(key, f"{path} is not a readable .safetensors file ({_first_line(exc)}).",
                        "Point it at an SD checkpoint (.safetensors), or re-download a damaged file.") from None


def read_state_dict(path: Path, *, key: str, allow_pickle: bool,
                    prefixes: tuple[str, ...] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a checkpoint whose names start with one of ``prefixes`` (all when None), and its metadata.

    Only the wanted tensors are read, so EMA copies and optimizer leftovers in big files cost nothing. A pickle
    (``.ckpt``...) is refused unless ``allow_pickle``; then ``torch.load(weights_only=True)`` reads it, which
    unpickles tensors and plain containers only, never arbitrary objects.
    """
    import torch

    suffix = path.suffix.lower()

    def wanted(name: object) -> bool:
        return isinstance(name, str) and (prefixes is None or name.startswith(prefixes))

    if suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
                names = handle.keys()  # a safe_open handle is not iterable
                return {name: handle.get_tensor(name) for name in names if wanted(name)}, metadata
        except (SafetensorError, OSError, ValueError) as exc:
            raise UserError(key, f"{path} is not a readable .safetensors file ({_first_line(exc)}).",
                            "Point it at an SD checkpoint (.safetensors), or re-download a damaged file.") from None
    if suffix in PICKLE_SUFFIXES:
        obj = _read_pickle(path, key=key, allow_pickle=allow_pickle)
        return {name: t for name, t in obj.items() if wanted(name) and isinstance(t, torch.Tensor)}, {}
    raise UserError(key, f"{path} is neither a .safetensors nor a .ckpt checkpoint.",
                    "Give a diffusers folder, a .safetensors checkpoint, or a .ckpt with model.allow_pickle=true.")


def read_keys(path: Path, key: str, *, allow_pickle: bool) -> list[str]:
    """The tensor names of a checkpoint, without reading its tensors: the ``.safetensors`` header, or a pickle
    opened as a later load opens it (``torch.load(weights_only=True)``, memory-mapped), so a file that load
    would refuse is refused now, before anything is written."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return [name for name in _read_pickle(path, key=key, allow_pickle=allow_pickle, mmap=True)
                if isinstance(name, str)]
    return read_header(path, key)[0]


def _read_pickle(path: Path, *, key: str, allow_pickle: bool, mmap: bool = False) -> Mapping[Any, Any]:
    """The state dict of a pickle checkpoint, read with ``torch.load(weights_only=True)``; refused unless
    ``allow_pickle``. ``mmap``: map the tensors instead of reading them (zip checkpoints; the old format is
    read whole)."""
    import re

    import torch

    suffix = path.suffix.lower()
    if not allow_pickle:
        raise UserError(key, f"{path} is a pickle checkpoint ({suffix}); unpickling a file can run any code it "
                        "carries, so it is refused by default.",
                        "Convert it to .safetensors, or, if you trust it, set model.allow_pickle=true (it is "
                        "then read with torch.load(weights_only=True), which loads tensors only).")
    try:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as exc:
            if not mmap or "mmap" not in str(exc):
                raise
            obj = torch.load(str(path), map_location="cpu", weights_only=True)  # the pre-zip format
    except Exception as exc:  # UnpicklingError: weights_only met something besides tensors and containers;
        if type(exc).__name__ != "UnpicklingError":  # anything else (RuntimeError, EOFError ...): a damaged file
            detail = re.sub(r"\x1b\[[0-9;]*m", "", _first_line(exc))
            raise UserError(key, f"{path} cannot be read as a checkpoint: it is damaged or truncated ({detail}).",
                            "Re-download it, or convert the original to .safetensors.") from None
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f" ({found.group(1)})" if found else ""
        raise UserError(key, f"{path} holds Python objects besides tensors{what}, which the weights-only load "
                        "(torch.load(weights_only=True)) refuses to unpickle: loading them could run code.",
                        "Convert it to .safetensors with a tool you trust, or use a checkpoint of tensors only.") \
            from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise UserError(key, f"{path} holds a {type(obj).__name__}, not a state dict.",
                        "Point it at an SD checkpoint.")
    return obj


def checkpoint_layout(keys: Iterable[str]) -> str:
    """``sd1`` (CLIP text encoder), ``sd2`` (OpenCLIP), ``sdxl``, or ``unknown`` — read from tensor names."""
    unet = clip = open_clip = sdxl = False
    for name in keys:
        unet = unet or name.startswith(UNET_PREFIX)
        clip = clip or name.startswith(CLIP_PREFIX)
        open_clip = open_clip or name.startswith(OPEN_CLIP_PREFIX)
        sdxl = sdxl or name.startswith("conditioner.embedders.")
    if sdxl:
        return "sdxl"
    if unet and open_clip:
        return "sd2"
    if unet and clip:
        return "sd1"
    return "unknown"


def check_layout(layout: str, path: Path, *, v2: bool, key: str = "model.base") -> None:
    """Refuse what is not an SD 1.x/2.x checkpoint, and a ``model.v2`` that disagrees with the file."""
    if layout == "sdxl":
        raise UserError(key, f"{path} is an SDXL checkpoint; lorasweep trains SD 1.x and 2.x LoRAs.",
                        "Use an SD 1.x or 2.x base model.")
    if layout == "unknown":
        raise UserError(key, f"{path} is not an SD 1.x/2.x single-file checkpoint (it has no "
                        f"{UNET_PREFIX}* UNet with {CLIP_PREFIX}* or {OPEN_CLIP_PREFIX}* text-encoder weights).",
                        "Point it at a full SD checkpoint in the original layout, or at a diffusers folder.")
    if layout == "sd2" and not v2:
        raise UserError("model.v2", f"{path} is an SD 2.x checkpoint (OpenCLIP text encoder), but model.v2 is false.",
                        "Set model.v2=true (and model.v_parameterization=true for a 768-v model).")
    if layout == "sd1" and v2:
        raise UserError("model.v2", f"model.v2 is true, but {path} is an SD 1.x checkpoint (CLIP text encoder).",
                        "Set model.v2=false.")


# --------------------------------------------------------------------------------------------------------
# what the shapes tell


def _indices(keys: Iterable[str], prefix: str) -> set[int]:
    """The integers that follow ``prefix`` in ``keys`` (block numbers)."""
    found = set()
    for name in keys:
        if name.startswith(prefix):
            head = name[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return found


def infer_unet_config(sd: Mapping[str, torch.Tensor], *, v2: bool, v_parameterization: bool = False) -> dict[str, Any]:
    """A ``UNet2DConditionModel`` config from an LDM UNet's tensor shapes (keys with :data:`UNET_PREFIX`)."""
    p = UNET_PREFIX
    conv_in = sd[f"{p}input_blocks.0.0.weight"]
    n_input = max(_indices(sd, f"{p}input_blocks.")) + 1
    n_down = sum(f"{p}input_blocks.{i}.0.op.weight" in sd for i in range(n_input))
    levels = n_down + 1
    per_level, rest = divmod(n_input - 1 - n_down, levels)
    if rest or per_level < 1:
        raise ValueError(f"{n_input} input blocks with {n_down} downsamplers fit no level layout")
    channels, down_types, up_types, depths = [], [], [], []
    for level in range(levels):
        block = 1 + level * (per_level + 1)
        channels.append(int(sd[f"{p}input_blocks.{block}.0.out_layers.3.weight"].shape[0]))
        attention = f"{p}input_blocks.{block}.1.proj_in.weight" in sd
        down_types.append("CrossAttnDownBlock2D" if attention else "DownBlock2D")
        depths.append(len(_indices(sd, f"{p}input_blocks.{block}.1.transformer_blocks.")) or 1)
        up_attention = f"{p}output_blocks.{level * (per_level + 1)}.1.proj_in.weight" in sd
        up_types.append("CrossAttnUpBlock2D" if up_attention else "UpBlock2D")
    to_k = [t for name, t in sd.items() if name.startswith(p) and name.endswith("attn2.to_k.weight")]
    proj_in = [t for name, t in sd.items() if name.startswith(p) and name.endswith(".proj_in.weight")]
    if not to_k or not proj_in:
        raise ValueError("the UNet has no cross-attention")
    return {
        "sample_size": 96 if v2 and v_parameterization else 64,  # 768 px for SD 2 768-v, else 512 px
        "in_channels": int(conv_in.shape[1]),
        "out_channels": int(sd[f"{p}out.2.weight"].shape[0]),
        "down_block_types": down_types,
        "up_block_types": up_types,
        "mid_block_type": ("UNetMidBlock2DCrossAttn" if f"{p}middle_block.1.proj_in.weight" in sd
                           else "UNetMidBlock2D"),
        "block_out_channels": channels,
        "layers_per_block": per_level,
        "transformer_layers_per_block": depths[0] if len(set(depths)) == 1 else depths,
        "cross_attention_dim": int(to_k[0].shape[1]),
        # Not in the shapes: SD 1.x has 8 heads per attention, SD 2.x heads of 64 channels.
        "attention_head_dim": [max(1, c // 64) for c in channels] if v2 else 8,
        "use_linear_projection": proj_in[0].ndim == 2,
        "upcast_attention": v2,  # fp32 attention scores: SD 2.1 overflows in fp16 otherwise; no effect in fp32
        "norm_num_groups": 32,
    }


def infer_vae_config(sd: Mapping[str, torch.Tensor], *, sample_size: int = 512) -> dict[str, Any]:
    """An ``AutoencoderKL`` config from an LDM VAE's tensor shapes (keys without prefix: ``encoder.*``...)."""
    levels = len(_indices(sd, "encoder.down."))
    per_level = len(_indices(sd, "encoder.down.0.block."))
    if not levels or not per_level:
        raise ValueError("no encoder.down.* blocks")
    return {
        "in_channels": int(sd["encoder.conv_in.weight"].shape[1]),
        "out_channels": int(sd["decoder.conv_out.weight"].shape[0]),
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [int(sd[f"encoder.down.{i}.block.{per_level - 1}.conv2.weight"].shape[0])
                               for i in range(levels)],
        "layers_per_block": per_level,
        "latent_channels": int(sd["decoder.conv_in.weight"].shape[1]),
        "norm_num_groups": 32,  # not in the shapes; SD's VAEs use 32
        "sample_size": sample_size,
        "scaling_factor": _SD_VAE_SCALING_FACTOR,
        "use_quant_conv": "quant_conv.weight" in sd,
        "use_post_quant_conv": "post_quant_conv.weight" in sd,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in sd,
    }


def infer_text_config(sd: Mapping[str, torch.Tensor], *, v2: bool, tokenizer: Any = None) -> dict[str, Any]:
    """A ``CLIPTextConfig`` (as a dict) from the text encoder's shapes; ids of special tokens from ``tokenizer``.

    SD 2.x: OpenCLIP's last block is left out (see the module docstring).
    """
    if v2:
        p = OPEN_CLIP_PREFIX
        embedding = sd[f"{p}token_embedding.weight"]
        blocks = len(_indices(sd, f"{p}transformer.resblocks."))
        config = {
            "num_hidden_layers": blocks - 1,
            "intermediate_size": int(sd[f"{p}transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
            "max_position_embeddings": int(sd[f"{p}positional_embedding"].shape[0]),
            "hidden_act": "gelu",
            "projection_dim": int(sd[f"{p}text_projection"].shape[1]) if f"{p}text_projection" in sd else 512,
        }
        if blocks < 2:
            raise ValueError("an SD 2 text encoder needs at least two blocks")
    else:
        p = CLIP_PREFIX + "text_model."
        embedding = sd[f"{p}embeddings.token_embedding.weight"]
        config = {
            "num_hidden_layers": len(_indices(sd, f"{p}encoder.layers.")),
            "intermediate_size": int(sd[f"{p}encoder.layers.0.mlp.fc1.weight"].shape[0]),
            "max_position_embeddings": int(sd[f"{p}embeddings.position_embedding.weight"].shape[0]),
            "hidden_act": "quick_gelu",
            "projection_dim": 768,
        }
    width = int(embedding.shape[1])
    config.update(vocab_size=int(embedding.shape[0]), hidden_size=width,
                  num_attention_heads=max(1, width // 64))  # heads are not in the shapes; CLIP's are 64 wide
    if tokenizer is not None:
        config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    return config


# --------------------------------------------------------------------------------------------------------
# building models


def _build(factory: Callable[[], torch.nn.Module], weights: Mapping[str, torch.Tensor], *, key: str, path: Path,
           part: str) -> Any:
    """Instantiate without allocating weights, then take the converted tensors (as float32) as its parameters."""
    import torch
    from accelerate import init_empty_weights

    with init_empty_weights():  # parameters on the meta device; buffers (CLIP's position ids) stay real
        model = factory()
    expected = model.state_dict().keys()
    if not any(name.startswith("text_model.") for name in expected):  # transformers ≥ 5: a flat CLIPTextModel
        weights = {name.removeprefix("text_model."): t for name, t in weights.items()}
    # Fresh float32 copies: they own aligned storage (views into the file's buffer gave results ~1e-7 off,
    # through other SIMD paths) and keep no reference to the whole checkpoint alive.
    state = {name: t.to(torch.float32 if t.is_floating_point() else t.dtype, copy=True).contiguous()
             for name, t in weights.items()}
    hint = ("The architecture read from the file does not fit its weights; use the diffusers folder of this "
            "model instead, or report the file's origin.")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:
        raise UserError(key, f"{path}: the {part} weights do not fit ({_first_line(exc)}).", hint) from None
    unexpected = [name for name in unexpected if not name.endswith("position_ids")]
    if missing or unexpected:
        detail = f"missing {sorted(missing)[:3]}" if missing else f"unexpected {sorted(unexpected)[:3]}"
        raise UserError(key, f"{path}: the {part} weights do not match its architecture ({detail}).", hint)
    model.requires_grad_(False)
    return model.eval()


def _config_from_metadata(metadata: Mapping[str, str], part: str) -> dict[str, Any] | None:
    text = metadata.get(CONFIG_METADATA[part])
    return json.loads(text) if text else None


def _normalise_clip_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old checkpoints name CLIP weights without ``text_model.`` (transformers < 4.x layout)."""
    old = CLIP_PREFIX + "embeddings."
    if not any(name.startswith(old) for name in sd):
        return sd
    return {(CLIP_PREFIX + "text_model." + name[len(CLIP_PREFIX):] if name.startswith(CLIP_PREFIX)
             and not name.startswith(CLIP_PREFIX + "text_model.") else name): t for name, t in sd.items()}


def _vae_weights(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LDM VAE tensors without their ``first_stage_model.``/``vae.`` prefix (none for a bare VAE file)."""
    for prefix in (VAE_PREFIX, "vae."):
        if any(name.startswith(prefix) for name in sd):
            return {name[len(prefix):]: t for name, t in sd.items()
                    if name.startswith(prefix) and name[len(prefix):].startswith(_VAE_KEY_STARTS)}
    return {name: t for name, t in sd.items() if name.startswith(_VAE_KEY_STARTS)}


def _vae(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str], *, key: str, path: Path,
         sample_size: int = 512) -> Any:
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    weights = _vae_weights(sd)
    if any(name.startswith("encoder.down_blocks.") for name in weights):
        raise UserError(key, f"{path} holds VAE weights in the diffusers layout, which carry no config.",
                        "Point it at the diffusers VAE folder (with config.json) the file came from.")
    try:
        config = _config_from_metadata(metadata, "vae") or infer_vae_config(weights, sample_size=sample_size)
        converted = convert_ldm_vae_checkpoint(weights, config)
    except (KeyError, ValueError, IndexError) as exc:
        raise UserError(key, f"{path} holds no complete SD VAE ({_first_line(exc)}).",
                        "Point it at an SD checkpoint or VAE file in the original layout.") from None
    return _build(lambda: AutoencoderKL.from_config(config), converted, key=key, path=path, part="VAE")


def _text_encoder(sd: dict[str, torch.Tensor], metadata: Mapping[str, str], *, v2: bool, tokenizer: Any, key: str,
                  path: Path) -> Any:
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig.from_dict(_config_from_metadata(metadata, "text_encoder")
                                      or infer_text_config(sd, v2=v2, tokenizer=tokenizer))
    if v2:
        with_config = type("_Config", (), {"config": config})()  # the converter reads only .config.hidden_size
        converted = convert_open_clip_checkpoint(with_config, sd, prefix=OPEN_CLIP_PREFIX)
        layers = "text_model.encoder.layers."
        converted = {name: t for name, t in converted.items() if name != "text_projection.weight"
                     and not (name.startswith(layers) and int(name[len(layers):].split(".")[0])
                              >= config.num_hidden_layers)}  # OpenCLIP's last block: SD 2 never used it
    else:
        converted = convert_ldm_clip_checkpoint({n: t for n, t in sd.items() if n.startswith(CLIP_PREFIX)})
    return _build(lambda: CLIPTextModel(config), converted, key=key, path=path, part="text encoder")


def load_checkpoint(path: Path, *, v2: bool, v_parameterization: bool = False, allow_pickle: bool = False,
                    tokenizer: Any = None, key: str = "model.base") -> SingleFileModel:
    """UNet, VAE and text encoder (float32, frozen, eval) from an SD 1.x/2.x single-file checkpoint.

    ``v2`` must agree with the file (SD 2.x is recognised by its OpenCLIP weights); ``tokenizer`` supplies the
    text encoder's special-token ids when the file carries no config.
    """
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    prefixes = (UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX, OPEN_CLIP_PREFIX, "conditioner.embedders.")
    sd, metadata = read_state_dict(path, key=key, allow_pickle=allow_pickle, prefixes=prefixes)
    layout = checkpoint_layout(sd)
    check_layout(layout, path, v2=v2, key=key)
    sd = _normalise_clip_keys(sd)
    try:
        unet_config = (_config_from_metadata(metadata, "unet")
                       or infer_unet_config(sd, v2=v2, v_parameterization=v_parameterization))
        unet_weights = convert_ldm_unet_checkpoint(sd, unet_config)
    except (KeyError, ValueError, IndexError) as exc:
        raise UserError(key, f"{path} holds no complete SD UNet ({_first_line(exc)}).",
                        "Point it at a full SD 1.x/2.x checkpoint in the original layout.") from None
    unet = _build(lambda: UNet2DConditionModel.from_config(unet_config), unet_weights, key=key, path=path, part="UNet")
    vae = _vae(sd, metadata, key=key, path=path, sample_size=8 * int(unet.config.sample_size))
    try:
        text_encoder = _text_encoder(sd, metadata, v2=v2, tokenizer=tokenizer, key=key, path=path)
    except (KeyError, ValueError, IndexError) as exc:
        raise UserError(key, f"{path} holds no complete text encoder ({_first_line(exc)}).",
                        "Point it at a full SD 1.x/2.x checkpoint in the original layout.") from None
    return SingleFileModel(unet, vae, text_encoder, _config_from_metadata(metadata, "scheduler"), layout)


def load_vae_file(path: Path, *, allow_pickle: bool = False, key: str = "model.vae") -> Any:
    """An ``AutoencoderKL`` from a VAE file in the LDM layout: bare (``encoder.*``, as SD's released VAEs) or
    inside a full checkpoint (``first_stage_model.*``)."""
    sd, metadata = read_state_dict(path, key=key, allow_pickle=allow_pickle)
    return _vae(sd, metadata, key=key, path=path)


# --------------------------------------------------------------------------------------------------------
# writing


def _unet_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """diffusers UNet names → LDM names (the inverse of diffusers' ``convert_ldm_unet_checkpoint``)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    direct = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    per = config["layers_per_block"]
    if not isinstance(per, int):
        raise ValueError("only one layers_per_block for all levels has an LDM layout")
    up_attention = {i for i, kind in enumerate(config["up_block_types"]) if "CrossAttn" in kind}

    def resnet(rest: list[str]) -> str:
        return ".".join([_UNET_RESNET[rest[0]], *rest[1:]])

    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        parts = name.split(".")
        if name in direct:
            ldm = direct[name]
        elif parts[0] == "down_blocks":
            b, kind, j = int(parts[1]), parts[2], int(parts[3])
            if kind == "downsamplers":
                ldm = f"input_blocks.{(b + 1) * (per + 1)}.0.op.{parts[-1]}"
            else:
                block = 1 + b * (per + 1) + j
                ldm = (f"input_blocks.{block}.0.{resnet(parts[4:])}" if kind == "resnets"
                       else f"input_blocks.{block}.1.{'.'.join(parts[4:])}")
        elif parts[0] == "mid_block":
            j = int(parts[2])
            ldm = (f"middle_block.{2 * j}.{resnet(parts[3:])}" if parts[1] == "resnets"
                   else f"middle_block.1.{'.'.join(parts[3:])}")
        elif parts[0] == "up_blocks":
            b, kind, j = int(parts[1]), parts[2], int(parts[3])
            if kind == "upsamplers":
                ldm = f"output_blocks.{b * (per + 1) + per}.{2 if b in up_attention else 1}.conv.{parts[-1]}"
            else:
                block = b * (per + 1) + j
                ldm = (f"output_blocks.{block}.0.{resnet(parts[4:])}" if kind == "resnets"
                       else f"output_blocks.{block}.1.{'.'.join(parts[4:])}")
        else:
            raise ValueError(f"UNet weight {name} has no SD 1.x/2.x counterpart")
        out[UNET_PREFIX + ldm] = tensor
    return out


def _vae_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """diffusers VAE names → LDM names (the inverse of diffusers' ``convert_ldm_vae_checkpoint``)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    direct = DIFFUSERS_TO_LDM_MAPPING["vae"]
    levels = len(config["up_block_types"])

    def resnet(rest: list[str]) -> str:
        return ".".join(["nin_shortcut" if rest[0] == "conv_shortcut" else rest[0], *rest[1:]])

    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        coder, *parts = name.split(".")
        if name in direct:
            ldm = direct[name]
        elif parts[0] in ("down_blocks", "up_blocks"):
            i = int(parts[1]) if parts[0] == "down_blocks" else levels - 1 - int(parts[1])
            stage = "down" if parts[0] == "down_blocks" else "up"
            if parts[2] == "resnets":
                ldm = f"{coder}.{stage}.{i}.block.{parts[3]}.{resnet(parts[4:])}"
            else:  # downsamplers.0.conv.* / upsamplers.0.conv.*
                ldm = f"{coder}.{stage}.{i}.{'downsample' if stage == 'down' else 'upsample'}.{'.'.join(parts[4:])}"
        elif parts[0] == "mid_block" and parts[1] == "resnets":
            ldm = f"{coder}.mid.block_{int(parts[2]) + 1}.{resnet(parts[3:])}"
        elif parts[0] == "mid_block" and parts[1] == "attentions":
            ldm = f"{coder}.mid.attn_1.{_VAE_ATTENTION[parts[3]]}.{parts[-1]}"
            if tensor.ndim == 2:  # LDM's attention projections are 1×1 convolutions
                tensor = tensor[:, :, None, None]
        else:
            raise ValueError(f"VAE weight {name} has no SD 1.x/2.x counterpart")
        out[VAE_PREFIX + ldm] = tensor
    return out


def _text_to_ldm(state: Mapping[str, torch.Tensor], config: Any, *, v2: bool) -> dict[str, torch.Tensor]:
    """CLIPTextModel names → SD 1.x (``cond_stage_model.transformer.*``) or SD 2.x OpenCLIP names.

    For SD 2.x the file gets OpenCLIP's shape: q/k/v fused into ``in_proj``, one extra last block that SD 2
    never uses (zeros here; a real SD 2 file has OpenCLIP's own) and an identity ``text_projection``.
    """
    import torch

    # transformers ≥ 5 names CLIPTextModel's weights without the ``text_model.`` level that SD files have.
    state = {name.removeprefix("text_model."): t for name, t in state.items() if not name.endswith("position_ids")}
    if not v2:
        return {f"{CLIP_PREFIX}text_model.{name}": t for name, t in state.items()}
    p = OPEN_CLIP_PREFIX
    layer = "encoder.layers."
    direct = {"embeddings.token_embedding.weight": "token_embedding.weight",
              "embeddings.position_embedding.weight": "positional_embedding",
              "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        if name in direct:
            out[p + direct[name]] = tensor
            continue
        if not name.startswith(layer):
            raise ValueError(f"text encoder weight {name} has no OpenCLIP counterpart")
        index, rest = name[len(layer):].split(".", 1)
        module, kind = rest.rsplit(".", 1)
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault((int(index), kind), {})[module[-6]] = tensor
        else:
            out[f"{p}transformer.resblocks.{index}.{_OPEN_CLIP_LAYER[module]}.{kind}"] = tensor
    for (index, kind), parts in qkv.items():
        out[f"{p}transformer.resblocks.{index}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    last = config.num_hidden_layers - 1
    for name in [n for n in out if n.startswith(f"{p}transformer.resblocks.{last}.")]:
        out[name.replace(f"resblocks.{last}.", f"resblocks.{last + 1}.")] = torch.zeros_like(out[name])
    out[f"{p}text_projection"] = torch.eye(config.hidden_size)
    return out


def _parts_of(source: str | Path | Mapping[str, Any] | Any) -> dict[str, Any]:
    """unet / vae / text_encoder / scheduler config from a diffusers folder, a mapping or an object."""
    if isinstance(source, str | Path):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        folder = Path(source)
        scheduler = folder / "scheduler" / "scheduler_config.json"
        return {"unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True),
                "vae": AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True),
                "text_encoder": CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", local_files_only=True),
                "scheduler": json.loads(scheduler.read_text()) if scheduler.is_file() else None}
    get = source.get if isinstance(source, Mapping) else lambda name: getattr(source, name, None)
    scheduler = get("noise_scheduler") or get("scheduler")
    return {"unet": get("unet"), "vae": get("vae"), "text_encoder": get("text_encoder"),
            "scheduler": dict(scheduler.config) if hasattr(scheduler, "config") else scheduler}


def _public(config: Mapping[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in config.items() if not name.startswith("_")}


def save_single_file(source: str | Path | Mapping[str, Any] | Any, path: str | Path, *, v2: bool | None = None,
                     store_configs: bool = True) -> Path:
    """Write a diffusers SD model as one original-layout ``.safetensors`` checkpoint (as A1111/kohya expect).

    ``source``: a diffusers folder, or a mapping/object with ``unet``, ``vae``, ``text_encoder`` (and optionally
    ``noise_scheduler``/``scheduler``). ``v2``: write the SD 2.x layout (OpenCLIP text encoder); None = SD 2.x
    when the text encoder is 1024 wide. ``store_configs`` keeps each part's exact config in the metadata, so
    :func:`load_checkpoint` rebuilds the same architecture even where the shapes cannot tell (heads, groups).
    The file is written under a temporary name and renamed; an existing ``path`` is never overwritten.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; save_single_file never overwrites a file")
    parts = _parts_of(source)
    unet, vae, text_encoder = parts["unet"], parts["vae"], parts["text_encoder"]
    if v2 is None:
        v2 = text_encoder.config.hidden_size == 1024
    tensors = {**_unet_to_ldm(unet.state_dict(), unet.config), **_vae_to_ldm(vae.state_dict(), vae.config),
               **_text_to_ldm(text_encoder.state_dict(), text_encoder.config, v2=v2)}
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    metadata = {"format": "pt", "lorasweep.layout": "sd2" if v2 else "sd1"}
    if store_configs:
        metadata[CONFIG_METADATA["unet"]] = json.dumps(_public(unet.config))
        metadata[CONFIG_METADATA["vae"]] = json.dumps(_public(vae.config))
        text_config = json.loads(text_encoder.config.to_json_string())
        metadata[CONFIG_METADATA["text_encoder"]] = json.dumps(_public(text_config))
        if parts["scheduler"] is not None:
            metadata[CONFIG_METADATA["scheduler"]] = json.dumps(_public(parts["scheduler"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
