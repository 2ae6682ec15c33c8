"""A full-size SD-1.5-architecture pipeline with random weights, built offline, for throughput benchmarks.

Why random weights: the cost of a training step depends on the architecture, resolution, batch and dtype,
not on what the weights have learned, and real SD-1.5 weights cannot be downloaded here (nor should a
benchmark need 4 GB of them). The components are the ones a real checkpoint loads into — diffusers'
``UNet2DConditionModel`` and ``AutoencoderKL``, transformers' ``CLIPTextModel`` — with SD-1.5's published
configs, so every layer, shape and attention call is that of the real model. The tokenizer is the tiny
model's offline CLIP BPE (its ~0.7k ids all exist in the 49 408-row embedding table; captions become 77 ids
either way, so the text encoder's cost is the same).

Weights come from torch's default initialisers under a fixed seed, created directly on the target device
(seconds on a GPU instead of a minute of CPU initialisation). Nothing is downloaded.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from lorasweep.models.loading import BaseModel

UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "center_input_sample": False,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-5,
}
"""``stable-diffusion-v1-5/unet/config.json`` (860 M parameters)."""

VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
"""``stable-diffusion-v1-5/vae/config.json`` (84 M parameters)."""

TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
"""CLIP ViT-L/14's text tower, ``stable-diffusion-v1-5/text_encoder/config.json`` (123 M parameters)."""

SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}
"""``stable-diffusion-v1-5/scheduler/scheduler_config.json``, read as a DDPM schedule (as training does)."""

MODEL_ID = "bench/sd15-architecture-random"


def offline_tokenizer() -> Any:
    """The tiny model's CLIP BPE tokenizer (77 positions, CLIP's bos/eos/pad conventions), built in a
    temporary folder in well under a second; no hub access."""
    from lorasweep.models.tokenizer import build_tokenizer

    with tempfile.TemporaryDirectory(prefix="bench-tokenizer-") as folder:
        return build_tokenizer(Path(folder))


def build_sd15_base(*, seed: int = 0, device: str | torch.device = "cpu") -> BaseModel:
    """SD-1.5's UNet, VAE, text encoder and DDPM schedule with random float32 weights, on ``device``.

    Frozen (``requires_grad`` off) as :func:`lorasweep.models.loading.load_base_model` returns a base, so
    lorasweep's ``train()`` and the reference loop can both take it as it is. Deterministic for a given
    seed, device and library versions.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = offline_tokenizer()
    text_config = CLIPTextConfig(**TEXT_CONFIG, bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    device = torch.device(device)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), device:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**UNET_CONFIG)
        vae = AutoencoderKL(**VAE_CONFIG)
        text_encoder = CLIPTextModel(text_config)
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
        module.eval()
    return BaseModel(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                     noise_scheduler=DDPMScheduler.from_config(SCHEDULER_CONFIG), model_id=MODEL_ID,
                     source_dir=None, model_hash=f"random-seed{seed}-{device.type}")


def parameter_counts(base: BaseModel) -> dict[str, int]:
    """Parameters per component (a check that the architecture is SD-1.5's: ~860 M, 84 M, 123 M)."""
    return {name: sum(p.numel() for p in getattr(base, name).parameters())
            for name in ("unet", "vae", "text_encoder")}


if __name__ == "__main__":
    import time

    start = time.perf_counter()
    built = build_sd15_base()
    print(f"built in {time.perf_counter() - start:.1f} s: {parameter_counts(built)}")
