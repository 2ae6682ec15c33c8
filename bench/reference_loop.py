"""The reference: a minimal LoRA training loop as a user would write it from diffusers'
``examples/text_to_image/train_text_to_image_lora.py``, to measure lorasweep's loop against.

What it does per step, and nothing else: (VAE-encode the batch: posterior sample × scaling factor) → DDPM
``add_noise`` at uniform random timesteps → CLIP text encoder → UNet → ε-MSE → backward → clip the gradient
norm → AdamW step. LoRA comes from peft (``LoraConfig`` + ``inject_adapter_in_model``; transformers'
``add_adapter`` refuses this peft version) on the attention projections, as diffusers' script targets them.
No accelerate, no logging, no validation, no checkpoints.

For a like-for-like comparison it takes the *same inputs* as lorasweep: the pixel tensors and captions of
lorasweep's own data pipeline (``TrainData`` batches, in lorasweep's order), prepared in memory before
training — so its data cost per step is zero, a best case for the reference — and it draws latents, noise
and timesteps from generators seeded as lorasweep seeds its own, so with the zero-initialised LoRA ``up``
matrices the first step's loss matches lorasweep's.

Precision: ``mixed`` in ``no``/``bf16``/``fp16`` autocasts the forward pass with float32 weights, as
lorasweep (accelerate) does; fp16 adds a gradient scaler. ``cast_base=True`` instead does what diffusers'
script does: the frozen UNet/VAE/text encoder in the autocast dtype, LoRA weights kept in float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model

from _measure import StepClock
from lorasweep.data.dataset import ImageItem
from lorasweep.data.loader import TrainData
from lorasweep.models.loading import BaseModel

#: diffusers' script's UNet targets; peft matches by suffix, which on SD's UNet hits exactly the attn1/attn2
#: projections of every transformer block (lorasweep's ``network.target=attention``).
UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")
#: kohya's wider set (lorasweep's ``network.target=kohya``): also the transformer blocks' feed-forward and
#: 1×1 projections, and the text encoder's MLP.
UNET_KOHYA = (*UNET_ATTENTION, "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
TEXT_KOHYA = (*TEXT_ATTENTION, "fc1", "fc2")
DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Batch:
    pixels: torch.Tensor
    """``[B, 3, H, W]`` in [-1, 1], as lorasweep's loader yields them."""
    captions: list[str]


def lorasweep_batches(train_items: Sequence[ImageItem], data_cfg: Any, *, seed: int, batch_size: int,
                      count: int) -> list[Batch]:
    """The first ``count`` batches lorasweep's loop trains on (epochs 1, 2, ... in order), decoded to pixels.

    ``data_cfg`` is lorasweep's ``DataConfig``; latent caching is switched off here only so the batches
    carry pixels (the reference caches, if asked, itself).
    """
    data = TrainData(list(train_items), [], replace(data_cfg, cache_latents=False), seed=seed,
                     batch_size=batch_size, prior_loss_weight=1.0)
    batches: list[Batch] = []
    epoch = 1
    while len(batches) < count:
        for index in range(data.num_batches):
            batch = data.collate(epoch, index)
            batches.append(Batch(batch["pixels"], list(batch["captions"])))
            if len(batches) == count:
                break
        epoch += 1
    return batches


def train_reference(base: BaseModel, batches: Sequence[Batch], clock: StepClock, *, dim: int, alpha: float,
                    lr: float, weight_decay: float, max_grad_norm: float | None, seed: int,
                    device: torch.device, mixed: str = "no", cache_latents: bool = False, cast_base: bool = False,
                    target: str = "attention", allow_tf32: bool = False) -> int:
    """Train LoRA for ``len(batches)`` steps, calling ``clock.mark(step, loss)`` after each; returns the number
    of LoRA modules (UNet + text encoder), to check it adapts as many as lorasweep does.

    ``allow_tf32``: TF32 matrix products on CUDA (diffusers' script's ``--allow_tf32``); pass lorasweep's
    ``precision.tf32`` so float32 runs compare like with like."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        torch.backends.cudnn.allow_tf32 = allow_tf32
    unet, vae, text_encoder, tokenizer = base.unet, base.vae, base.text_encoder, base.tokenizer
    scheduler = base.noise_scheduler
    weight_dtype = DTYPES[mixed]
    base_dtype = weight_dtype if cast_base else torch.float32
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
        module.to(device, dtype=base_dtype)

    unet_targets, text_targets = (UNET_KOHYA, TEXT_KOHYA) if target == "kohya" else (UNET_ATTENTION, TEXT_ATTENTION)
    torch.manual_seed(seed)
    inject_adapter_in_model(LoraConfig(r=dim, lora_alpha=alpha, init_lora_weights=True,
                                       target_modules=list(unet_targets)), unet)
    inject_adapter_in_model(LoraConfig(r=dim, lora_alpha=alpha, init_lora_weights=True,
                                       target_modules=list(text_targets)), text_encoder)
    params = [p for m in (unet, text_encoder) for p in m.parameters() if p.requires_grad]
    for p in params:  # diffusers' cast_training_params: trainable LoRA weights stay float32
        p.data = p.data.to(device, torch.float32)
    n_modules = sum(1 for m in (unet, text_encoder) for n, _ in m.named_modules() if n.endswith(".lora_A"))

    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scaler = torch.amp.GradScaler(device.type) if mixed == "fp16" else None
    autocast = (torch.autocast(device.type, dtype=weight_dtype) if mixed != "no" else nullcontext())
    noise_gen = torch.Generator(device=device).manual_seed(seed)
    latent_gen = torch.Generator(device=device).manual_seed(seed + 1)

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            posterior = vae.encode(pixels.to(device, dtype=base_dtype)).latent_dist
            return posterior.sample(generator=latent_gen).float() * vae.config.scaling_factor

    cached = [encode(b.pixels) for b in batches] if cache_latents else []
    unet.train()
    text_encoder.train()
    vae.eval()
    clock.mark(0)
    for step, batch in enumerate(batches, start=1):
        latents = cached[step - 1] if cache_latents else encode(batch.pixels)
        noise = torch.randn(latents.shape, generator=noise_gen, device=device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  generator=noise_gen, device=device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        ids = tokenizer(batch.captions, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        with autocast:
            states = text_encoder(ids)[0]
            pred = unet(noisy.to(base_dtype), timesteps, states).sample
        loss = F.mse_loss(pred.float(), noise.float())
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.mark(step, loss.item())
    return n_modules
