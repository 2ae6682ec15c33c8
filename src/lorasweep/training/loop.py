"""The training loop: ε-prediction LoRA training of an SD-1.x UNet (+ text encoder), one readable loop in
the style of diffusers' ``train_text_to_image_lora.py``, with accelerate for device, precision and
gradient accumulation."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from lorasweep.config.train import TrainConfig
from lorasweep.data.dataset import ImageItem, load_pixels
from lorasweep.evaluation.samples import Sample, render_samples
from lorasweep.evaluation.validation import ValidationLoss
from lorasweep.models.loading import BaseModel
from lorasweep.models.text import encode_tokens, tokenize
from lorasweep.training.optim import build_lr_scheduler, build_optimizer, warmup_steps

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf: the run cannot recover (usually the learning rate is too high)."""


class Recorder(Protocol):
    """Where the loop's results go (run folder, MLflow, progress bar); the loop knows nothing of them."""

    def metrics(self, step: int, values: dict[str, float]) -> None: ...

    def samples(self, step: int, samples: list[Sample]) -> None: ...

    def progress(self, step: int, total: int, loss: float | None) -> None: ...


@dataclass
class TrainResult:
    steps: int
    val_loss_start: float
    val_loss: float
    val_history: list[tuple[int, float]] = field(default_factory=list)
    lora_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    num_batches_per_epoch: int = 0
    epochs: int = 0
    warmup_steps: int = 0


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _encode_pixels(vae: torch.nn.Module, pixels: torch.Tensor, device: torch.device, batch: int,
                   generator: torch.Generator | None) -> torch.Tensor:
    """VAE latents × scaling factor; a sample of the posterior with ``generator``, its mean without."""
    out = []
    with torch.no_grad():
        for start in range(0, pixels.shape[0], batch):
            dist = vae.encode(pixels[start:start + batch].to(device)).latent_dist
            z = dist.mean if generator is None else dist.sample(generator=generator)
            out.append(z * vae.config.scaling_factor)
    return torch.cat(out)


def epoch_batches(items: list[ImageItem], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """One epoch: every image ``repeats`` times, shuffled, cut into batches (the last may be short)."""
    order = [i for i, item in enumerate(items) for _ in range(item.repeats)]
    perm = torch.randperm(len(order), generator=generator).tolist()
    shuffled = [order[p] for p in perm]
    return [shuffled[s:s + batch_size] for s in range(0, len(shuffled), batch_size)]


def total_optimizer_steps(cfg: TrainConfig, n_micro_batches_per_epoch: int) -> tuple[int, int]:
    """(total optimizer steps, epochs). ``max_steps`` wins over ``epochs``, as in kohya."""
    per_epoch = max(1, math.ceil(n_micro_batches_per_epoch / cfg.training.grad_accum_steps))
    if cfg.training.max_steps is not None:
        return cfg.training.max_steps, math.ceil(cfg.training.max_steps / per_epoch)
    return per_epoch * cfg.training.epochs, cfg.training.epochs


def train(cfg: TrainConfig, base: BaseModel, train_items: list[ImageItem], val_items: list[ImageItem],
          recorder: Recorder) -> TrainResult:
    """Train a LoRA on ``base`` and return its kohya tensors and the validation-loss history."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from lorasweep.network.kohya import to_kohya_state_dict
    from lorasweep.network.lora import inject_lora

    tc = cfg.training
    device = pick_device(tc.device)
    accelerator = Accelerator(mixed_precision=cfg.precision.mixed, gradient_accumulation_steps=tc.grad_accum_steps,
                              cpu=device.type == "cpu")
    set_seed(tc.seed)  # python, numpy and torch global RNGs: LoRA init and dropout draw from them
    device = accelerator.device

    unet, vae, text_encoder = base.unet, base.vae, base.text_encoder
    unet.set_attn_processor(AttnProcessor2_0() if tc.attention == "sdpa" else AttnProcessor())
    network = inject_lora(unet, text_encoder, cfg.network)
    unet_params, te_params = network.unet_params(), network.text_encoder_params()
    if tc.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        text_encoder.gradient_checkpointing_enable()
    for module in (unet, vae, text_encoder):
        module.to(device)
    vae.eval()

    # Data: pixels once, latents once (the VAE is frozen), token ids once.
    data_gen = torch.Generator().manual_seed(tc.seed)
    noise_gen = torch.Generator(device=device).manual_seed(tc.seed)
    res = cfg.data.resolution
    train_pixels = torch.stack([load_pixels(it.path, res) for it in train_items])
    val_pixels = torch.stack([load_pixels(it.path, res) for it in val_items])
    latent_gen = torch.Generator(device=device).manual_seed(tc.seed + 1)
    train_latents = (_encode_pixels(vae, train_pixels, device, 16, latent_gen)
                     if cfg.data.cache_latents else None)
    val_latents = _encode_pixels(vae, val_pixels, device, 16, None)
    train_ids = tokenize(base.tokenizer, [it.caption for it in train_items]).to(device)
    val_ids = tokenize(base.tokenizer, [it.caption for it in val_items]).to(device)
    frozen_states = None
    if not te_params:
        with torch.no_grad():
            frozen_states = encode_tokens(text_encoder, train_ids, cfg.model.clip_skip)

    validation = ValidationLoss(val_latents, val_ids, list(cfg.validation.timesteps), cfg.validation.repeats,
                                cfg.validation.seed, base.noise_scheduler, cfg.validation.batch_size)
    validation.to(device)

    first_epoch = epoch_batches(train_items, tc.batch_size, data_gen)
    total_steps, n_epochs = total_optimizer_steps(cfg, len(first_epoch))
    optimizer = build_optimizer(cfg.optimizer, unet_params, te_params)
    lr_scheduler = build_lr_scheduler(cfg.scheduler, optimizer, total_steps)
    trained = [m for m, p in ((unet, unet_params), (text_encoder, te_params)) if p]
    prepared = accelerator.prepare(*trained, optimizer, lr_scheduler)
    trained, optimizer, lr_scheduler = list(prepared[:-2]), prepared[-2], prepared[-1]
    unet_fwd = trained[0] if unet_params else unet
    te_fwd = trained[-1] if te_params else text_encoder
    params = unet_params + te_params
    for module in trained:
        module.train()

    def evaluate() -> float:
        return validation(unet_fwd, te_fwd, cfg.model.clip_skip, accelerator.autocast)

    def sample(step: int) -> None:
        if cfg.sampling.enabled:
            recorder.samples(step, render_samples(
                cfg.sampling, unet=accelerator.unwrap_model(unet_fwd), vae=vae,
                text_encoder=accelerator.unwrap_model(te_fwd), tokenizer=base.tokenizer,
                noise_scheduler=base.noise_scheduler, resolution=res, clip_skip=cfg.model.clip_skip,
                device=device))

    def lr_values() -> dict[str, float]:
        lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)}
        return {f"lr/{name}": float(v) for name, v in lrs.items()}

    val_start = evaluate()
    history = [(0, val_start)]
    recorder.metrics(0, {"val_loss": val_start, **lr_values()})
    sample(0)

    num_t = base.noise_scheduler.config.num_train_timesteps
    step = 0
    epoch = 0
    batches = first_epoch
    loss_sum = torch.zeros((), device=device)
    loss_count = 0
    interval_start = time.perf_counter()
    interval_images = 0
    interval_steps = 0
    recorder.progress(0, total_steps, None)
    while step < total_steps:
        for batch in batches:
            idx = torch.tensor(batch, device=device)
            with accelerator.accumulate(*trained):
                if train_latents is not None:
                    latents = train_latents[idx]
                else:
                    latents = _encode_pixels(vae, train_pixels[batch], device, len(batch), latent_gen)
                noise = torch.randn(latents.shape, generator=noise_gen, device=device)
                timesteps = torch.randint(0, num_t, (latents.shape[0],), generator=noise_gen, device=device)
                noisy = base.noise_scheduler.add_noise(latents, noise, timesteps)
                states = (frozen_states[idx] if frozen_states is not None
                          else encode_tokens(te_fwd, train_ids[idx], cfg.model.clip_skip))
                pred = unet_fwd(noisy, timesteps, states).sample
                loss = F.mse_loss(pred.float(), noise.float())
                accelerator.backward(loss)
                if accelerator.sync_gradients and tc.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(params, tc.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            loss_count += 1
            interval_images += len(batch)
            if not accelerator.sync_gradients:
                continue
            step += 1
            interval_steps += 1
            last = step == total_steps
            if step % tc.log_every_n_steps == 0 or last:
                mean_loss = float(loss_sum.item()) / loss_count  # the only host-device sync of the loop
                if not math.isfinite(mean_loss):
                    raise NonFiniteLossError(f"the training loss became {mean_loss} by step {step}; the "
                                             "learning rate is probably too high")
                elapsed = time.perf_counter() - interval_start
                recorder.metrics(step, {"loss": mean_loss, "epoch": epoch, **lr_values(),
                                        "throughput/steps_per_s": interval_steps / elapsed,
                                        "throughput/samples_per_s": interval_images / elapsed})
                recorder.progress(step, total_steps, mean_loss)
                loss_sum.zero_()
                loss_count = 0
                interval_images = 0
                interval_steps = 0
                interval_start = time.perf_counter()
            if (cfg.validation.every_n_steps and step % cfg.validation.every_n_steps == 0) or last:
                val = evaluate()
                history.append((step, val))
                recorder.metrics(step, {"val_loss": val})
            if (cfg.sampling.every_n_steps and step % cfg.sampling.every_n_steps == 0) or last:
                sample(step)
            if last:
                break
        epoch += 1
        batches = epoch_batches(train_items, tc.batch_size, data_gen)

    dtype = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.precision.save]
    tensors = to_kohya_state_dict(accelerator.unwrap_model(unet_fwd) if unet_params else None,
                                  accelerator.unwrap_model(te_fwd) if te_params else None,
                                  alpha=cfg.network.effective_alpha, dtype=dtype)
    return TrainResult(steps=step, val_loss_start=val_start, val_loss=history[-1][1], val_history=history,
                       lora_tensors=tensors, num_batches_per_epoch=len(first_epoch), epochs=n_epochs,
                       warmup_steps=warmup_steps(cfg.scheduler, total_steps))


def lora_file_path(run_dir: Path, name: str) -> Path:
    return run_dir / "lora" / f"{name}.safetensors"
