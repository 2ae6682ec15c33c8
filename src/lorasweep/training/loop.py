"""The training loop: LoRA training of an SD-1.x/2.x UNet (+ text encoder), one readable loop in the style of
diffusers' ``train_text_to_image_lora.py``, with accelerate for device, precision and gradient accumulation.

Data order, augmentation and caption randomness come from :class:`lorasweep.data.loader.TrainData` as pure
functions of (seed, epoch, position); the loop's own randomness (noise, timesteps, LoRA dropout) comes from
generators whose states are part of the saved training state. So a run resumed from a state continues the
very trajectory it was on.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from lorasweep.config.train import TrainConfig
from lorasweep.data.dataset import ImageItem
from lorasweep.data.loader import TrainData
from lorasweep.evaluation.samples import Sample, render_samples
from lorasweep.evaluation.validation import ValidationLoss, ValidationScores
from lorasweep.models.loading import BaseModel
from lorasweep.models.text import CaptionTokens, encode_tokens, tokenize
from lorasweep.training.ema import LoraEma
from lorasweep.training.noise import noisy_latents, training_scheduler
from lorasweep.training.objective import TrainingLoss, training_target
from lorasweep.training.optim import build_lr_scheduler, build_optimizer, effective_learning_rates, warmup_steps
from lorasweep.training.state import Position, SavedState, data_fingerprint, save_state, set_rng_states

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf: the run cannot recover (usually the learning rate is too high)."""


class Recorder(Protocol):
    """Where the loop's results go (run folder, MLflow, progress bar); the loop knows nothing of them."""

    def metrics(self, step: int, values: dict[str, float]) -> None: ...

    def samples(self, step: int, samples: list[Sample]) -> None: ...

    def progress(self, step: int, total: int, loss: float | None) -> None: ...

    def snapshot(self, epoch: int, step: int, tensors: dict[str, torch.Tensor], plan: Plan, *,
                 by_step: bool = False) -> None:
        """A numbered LoRA file: ``by_step`` for ``output.save_every_n_steps``, else for the end of ``epoch``."""


@dataclass(frozen=True)
class Plan:
    """The run's length as the loop computed it (kohya's metadata records these)."""

    total_steps: int
    epochs: int
    batches_per_epoch: int
    warmup_steps: int
    num_reg_images: int
    bucket_info: dict[str, Any] | None


@dataclass
class TrainResult:
    steps: int
    val_loss_start: float
    val_loss: float
    plan: Plan
    val_history: list[tuple[int, float]] = field(default_factory=list)
    lora_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    states: list[Path] = field(default_factory=list)
    first_step_at: float | None = None
    """``time.perf_counter()`` when the first optimizer step of this call ended (time-to-first-step)."""
    feature_cache: dict[str, Any] = field(default_factory=dict)
    """Hits and entries built per feature kind (``{"latents": {"hits": 8, "built": 0}}``)."""
    conv_kernels: dict[str, Any] = field(default_factory=dict)
    """The CPU convolution kernels the run used (:func:`training.kernels.conv_kernels`)."""
    val_per_timestep: dict[int, float] = field(default_factory=dict)
    """The last evaluation's loss at each validation timestep (empty when this call evaluated nothing)."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device`` without making the host wait for the GPU. A blocking copy from the CPU to
    CUDA synchronises the stream: the host waits until every kernel already queued has run, once per batch,
    and the GPU then idles while the host prepares the next step. From pinned memory the copy is queued
    behind those kernels instead (PyTorch keeps the pinned block alive until the copy has run)."""
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _encode_pixels(vae: torch.nn.Module, pixels: torch.Tensor, device: torch.device,
                   generator: torch.Generator | None) -> torch.Tensor:
    """VAE latents × scaling factor; a sample of the posterior with ``generator``, its mean without."""
    with torch.no_grad():
        dist = vae.encode(_to_device(pixels, device)).latent_dist
        z = dist.mean if generator is None else dist.sample(generator=generator)
    return z * vae.config.scaling_factor


def _encode_means(vae: torch.nn.Module, pixels: list[torch.Tensor], device: torch.device,
                  batch: int) -> list[torch.Tensor]:
    """Posterior-mean latents of images of possibly different bucket shapes, batching those of one shape, in
    input order (the validation images: cached training latents go through :mod:`training.features`)."""
    out: list[torch.Tensor | None] = [None] * len(pixels)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, px in enumerate(pixels):
        by_shape.setdefault(tuple(px.shape), []).append(i)
    for members in by_shape.values():
        for start in range(0, len(members), batch):
            chunk = members[start:start + batch]
            z = _encode_pixels(vae, torch.stack([pixels[i] for i in chunk]), device, None)
            for i, latent in zip(chunk, z, strict=True):
                out[i] = latent
    return [z for z in out if z is not None]


def total_optimizer_steps(cfg: TrainConfig, n_micro_batches_per_epoch: int) -> tuple[int, int]:
    """(total optimizer steps, epochs). ``max_steps`` wins over ``epochs``, as in kohya."""
    per_epoch = max(1, math.ceil(n_micro_batches_per_epoch / cfg.training.grad_accum_steps))
    if cfg.training.max_steps is not None:
        return cfg.training.max_steps, math.ceil(cfg.training.max_steps / per_epoch)
    return per_epoch * cfg.training.epochs, cfg.training.epochs


def _set_attention(unet: Any, backend: str) -> None:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if backend == "xformers":
        unet.enable_xformers_memory_efficient_attention()
    else:
        unet.set_attn_processor(AttnProcessor2_0() if backend == "sdpa" else AttnProcessor())


def _set_gradient_checkpointing(unet: Any, text_encoder: Any, enabled: bool) -> None:
    """On or off explicitly: a cached base keeps whatever the previous run of the process set."""
    # transformers 5.2x renamed gradient_checkpointing_* to activation_checkpointing_* (the old names warn)
    renamed = hasattr(text_encoder, "activation_checkpointing_enable")
    if enabled:
        unet.enable_gradient_checkpointing()
        (text_encoder.activation_checkpointing_enable if renamed else text_encoder.gradient_checkpointing_enable)()
    else:
        unet.disable_gradient_checkpointing()
        (text_encoder.activation_checkpointing_disable if renamed else text_encoder.gradient_checkpointing_disable)()


def _restore(network: Any, modules: tuple[torch.nn.Module, ...]) -> None:
    """Give the base back as it was loaded, for the next run of this process: LoRA off, and accelerate's
    mixed-precision ``forward`` patch (an instance attribute set by ``prepare``) removed."""
    network.remove()
    modules[0].to(memory_format=torch.contiguous_format)  # the UNet, if the run made it channels-last
    for module in modules:
        for attribute in ("forward", "_original_forward", "_is_accelerate_prepared"):
            module.__dict__.pop(attribute, None)
        module.eval()


def train(cfg: TrainConfig, base: BaseModel, train_items: list[ImageItem], val_items: list[ImageItem],
          recorder: Recorder, *, reg_items: list[ImageItem] | None = None, resume: SavedState | None = None,
          state_root: Path | None = None) -> TrainResult:
    """Train a LoRA on ``base`` and return its kohya tensors and the validation-loss history.

    ``state_root``: where training states go when ``output.save_state`` is on (``<run>/state``).
    ``resume``: a loaded state to continue from (LoRA, optimizer, scheduler, scaler, RNGs, data position).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    from lorasweep.network.kohya import to_kohya_state_dict
    from lorasweep.network.lora import inject_lora
    from lorasweep.training.features import (
        FrozenTextStates,
        describe,
        feature_store,
        latent_moments,
        sample_latents,
    )
    from lorasweep.training.kernels import conv_kernels, kernels_tag

    tc = cfg.training
    device = pick_device(tc.device)
    AcceleratorState._reset_state(reset_partial_state=True)  # an earlier run of this process set its precision
    accelerator = Accelerator(mixed_precision=cfg.precision.mixed, gradient_accumulation_steps=tc.grad_accum_steps,
                              cpu=device.type == "cpu")
    set_seed(tc.seed)  # python, numpy and torch global RNGs: LoRA init and dropout draw from them
    device = accelerator.device
    noise_scheduler = training_scheduler(base.noise_scheduler, tc)  # validation keeps the base schedule
    training_loss = TrainingLoss(tc, noise_scheduler, base.noise_scheduler)

    unet, vae, text_encoder = base.unet, base.vae, base.text_encoder
    for module in (unet, vae, text_encoder):
        module.eval()  # the base may come from an earlier run of this process (models.cache)
    _set_attention(unet, tc.attention)
    _set_gradient_checkpointing(unet, text_encoder, tc.gradient_checkpointing)
    network = inject_lora(unet, text_encoder, cfg.network)
    scope = ExitStack()  # process-wide kernel switches, undone however the run ends
    try:
        kernels = scope.enter_context(conv_kernels(tc.cpu_conv_kernels, device, cfg.precision.mixed))
        if resume is not None:
            network.load_kohya_state_dict(resume.lora, source=str(resume.folder))
        elif cfg.network.init_weights:
            from lorasweep.network.lora import init_from_file

            init_from_file(network, Path(cfg.network.init_weights).expanduser())
        unet_params, te_params = network.unet_params(), network.text_encoder_params()
        for module in (unet, vae, text_encoder):
            module.to(device)
        if tc.channels_last if tc.channels_last is not None else device.type == "cuda":
            unet.to(memory_format=torch.channels_last)
            for param in unet_params:  # the small LoRA weights keep the default layout: peft's DoRA views a
                param.data = param.data.contiguous()  # conv adapter's weights as matrices (found on CUDA)
        if device.type == "cuda":  # process-wide flags: set by every run, so a reused process keeps no stale one
            torch.backends.cuda.matmul.allow_tf32 = cfg.precision.tf32
            torch.backends.cudnn.allow_tf32 = cfg.precision.tf32

        max_tokens = cfg.model.max_token_length

        def encode(te: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
            return encode_tokens(te, ids, cfg.model.clip_skip, max_token_length=max_tokens)

        caption_tokens = CaptionTokens(base.tokenizer, max_tokens)

        def token_ids(captions: list[str]) -> torch.Tensor:
            return _to_device(caption_tokens(captions), device)

        # Data: latents once when cached (the VAE is frozen), validation latents (posterior mean) always.
        data = TrainData(train_items, reg_items or [], cfg.data, seed=tc.seed, batch_size=tc.batch_size,
                         prior_loss_weight=tc.prior_loss_weight)
        noise_gen = torch.Generator(device=device).manual_seed(tc.seed)
        latent_gen = torch.Generator(device=device).manual_seed(tc.seed + 1)
        generators = {"noise": noise_gen, "latent": latent_gen}
        stores = {kind: feature_store(cfg.model.cache_dir, kind, cfg.data.cache_to_disk)
                  for kind in ("latents", "text")}
        cached: dict[str, torch.Tensor] = {}
        if cfg.data.cache_latents:
            entries = data.cache_entries()
            moments = latent_moments(data, entries, base, device, stores["latents"],
                                     device_tag=kernels_tag(device, kernels))
            cached = {e.key: z for e, z in zip(entries, sample_latents(moments, vae, latent_gen), strict=True)}
        frozen_text = None
        if not te_params and not cfg.data.shuffle_caption and not cfg.data.caption_tag_dropout_rate:
            # Static captions under a frozen text encoder: each caption's states are computed once.
            frozen_text = FrozenTextStates(base, encode, token_ids, clip_skip=cfg.model.clip_skip,
                                           max_token_length=max_tokens, device=device, store=stores["text"])
        val_latents = _encode_means(vae, [px for _, px in data.val_pixels(val_items)], device, 16)
        validation = ValidationLoss(val_latents, tokenize(base.tokenizer, [it.caption for it in val_items],
                                                          max_token_length=max_tokens),
                                    list(cfg.validation.timesteps), cfg.validation.repeats, cfg.validation.seed,
                                    base.noise_scheduler, cfg.validation.batch_size).to(device)

        batches_per_epoch = data.num_batches
        total_steps, n_epochs = total_optimizer_steps(cfg, batches_per_epoch)
        plan = Plan(total_steps, n_epochs, batches_per_epoch, warmup_steps(cfg.scheduler, total_steps),
                    data.num_reg_images, data.bucket_info() if cfg.data.buckets.enabled else None)
        optimizer = build_optimizer(cfg.optimizer, unet_params, te_params, loraplus=network.loraplus())
        lr_scheduler = build_lr_scheduler(cfg.scheduler, optimizer, total_steps)
        trained = [m for m, p in ((unet, unet_params), (text_encoder, te_params)) if p]
        prepared = accelerator.prepare(*trained, optimizer, lr_scheduler)
        trained, optimizer, lr_scheduler = list(prepared[:-2]), prepared[-2], prepared[-1]
        unet_fwd = trained[0] if unet_params else unet
        te_fwd = trained[-1] if te_params else text_encoder
        params = unet_params + te_params
        ema = LoraEma(tc.ema, params) if tc.ema.enabled else None
        for module in trained:
            module.train()
        unet_step = torch.compile(unet_fwd) if tc.compile else unet_fwd  # evaluation runs uncompiled (eval mode)

        position = Position(step=0, epoch=1, batch=0)
        if resume is not None:
            optimizer.load_state_dict(resume.training["optimizer"])
            lr_scheduler.load_state_dict(resume.training["scheduler"])
            if resume.training["scaler"] is not None and accelerator.scaler is not None:
                accelerator.scaler.load_state_dict(resume.training["scaler"])
            set_rng_states(resume.training["rng"], generators)
            if ema is not None and resume.training.get("ema") is not None:
                ema.load_state_dict(resume.training["ema"])
            position = resume.position

        val_states = None if frozen_text is None else frozen_text([it.caption for it in val_items])

        def averaged() -> AbstractContextManager[None]:
            """The EMA weights in place of the trained ones, for what a run shows and saves."""
            return ema.applied() if ema is not None else nullcontext()

        def evaluate() -> ValidationScores:
            with averaged():
                return validation.scores(unet_fwd, te_fwd, encode, accelerator.autocast, states=val_states)

        def sample(step: int) -> None:
            if cfg.sampling.enabled:
                with averaged():
                    images = render_samples(
                        cfg.sampling, unet=accelerator.unwrap_model(unet_fwd), vae=vae,
                        text_encoder=accelerator.unwrap_model(te_fwd), tokenizer=base.tokenizer,
                        noise_scheduler=noise_scheduler, size=cfg.data.size, clip_skip=cfg.model.clip_skip,
                        max_token_length=max_tokens, device=device)
                recorder.samples(step, images)

        def lr_values() -> dict[str, float]:
            return {f"lr/{name}": value for name, value in effective_learning_rates(optimizer).items()}

        def trained_tensors(dtype: torch.dtype) -> dict[str, torch.Tensor]:
            return to_kohya_state_dict(accelerator.unwrap_model(unet_fwd) if unet_params else None,
                                       accelerator.unwrap_model(te_fwd) if te_params else None,
                                       alpha=cfg.network.effective_alpha, dtype=dtype)

        def lora_tensors(dtype: torch.dtype) -> dict[str, torch.Tensor]:
            """What LoRA files hold: the EMA weights when ``training.ema`` is on (states keep the trained ones)."""
            with averaged():
                return trained_tensors(dtype)

        saved_states: list[Path] = []

        data_digest = data_fingerprint([*train_items, *(reg_items or [])]) if cfg.output.save_state else None

        def checkpoint(at: Position) -> None:
            if cfg.output.save_state and state_root is not None:
                saved_states.append(save_state(
                    state_root / f"step-{at.step:06d}", cfg=cfg, position=at, lora=trained_tensors(torch.float32),
                    optimizer=optimizer, scheduler=lr_scheduler, scaler=accelerator.scaler, generators=generators,
                    data_digest=data_digest, extra={"val_history": history},
                    ema=None if ema is None else ema.state_dict()))

        step = position.step
        scores: ValidationScores | None = None
        if step == 0:
            scores = evaluate()
            history = [(0, scores.mean)]
            recorder.metrics(0, {**scores.metrics(), **lr_values()})
            sample(0)
        else:
            history = [(int(s), float(v)) for s, v in resume.extra.get("val_history", [])] if resume else []
        val_start = history[0][1] if history else float("nan")

        save_dtype = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.precision.save]
        loss_sum = torch.zeros((), device=device)
        loss_count = 0
        interval_start = fetch_start = time.perf_counter()
        interval_images = 0
        interval_steps = 0
        first_step_at: float | None = None
        data_wait = 0.0  # time the step waited for its batch, this interval
        off_loop = 0.0  # time spent evaluating, sampling and saving, this interval (not training throughput)
        recorder.progress(step, total_steps, None)
        epoch, start_batch = position.epoch, position.batch
        if start_batch > data.num_batches:  # a forced resume into a data set or batch size with fewer batches
            epoch, start_batch = epoch + 1, 0
        every_epochs, every_steps = cfg.output.save_every_n_epochs, cfg.output.save_every_n_steps
        step_save_due = False
        while step < total_steps:
            for batch_index, batch in enumerate(data.loader(epoch, start_batch=start_batch), start=start_batch):
                data_wait += time.perf_counter() - fetch_start
                with accelerator.accumulate(*trained):
                    if batch["cache_keys"] is not None:
                        latents = torch.stack([cached[k] for k in batch["cache_keys"]])
                    else:
                        latents = _encode_pixels(vae, batch["pixels"], device, latent_gen)
                    noise, noisy, timesteps = noisy_latents(noise_scheduler, latents, tc, noise_gen)
                    if frozen_text is not None:
                        states = frozen_text(batch["captions"])
                    elif te_params:
                        states = encode(te_fwd, token_ids(batch["captions"]))
                    else:
                        with torch.no_grad():
                            states = encode(te_fwd, token_ids(batch["captions"]))
                    pred = unet_step(noisy, timesteps, states).sample
                    target = training_target(noise_scheduler, latents, noise, timesteps)
                    loss = training_loss(pred, target, timesteps, _to_device(batch["loss_weight"], device))
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and tc.max_grad_norm is not None:
                        accelerator.clip_grad_norm_(params, tc.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.detach()
                loss_count += 1
                interval_images += latents.shape[0]
                if not accelerator.sync_gradients:
                    fetch_start = time.perf_counter()
                    continue
                step += 1
                interval_steps += 1
                if ema is not None:
                    ema.update(step)
                if first_step_at is None:
                    first_step_at = time.perf_counter()
                last = step == total_steps
                if step % tc.log_every_n_steps == 0 or last:
                    mean_loss = float(loss_sum.item()) / loss_count  # the only host-device sync of the loop
                    if not math.isfinite(mean_loss):
                        raise NonFiniteLossError(f"the training loss became {mean_loss} by step {step}; the "
                                                 "learning rate is probably too high")
                    elapsed = max(time.perf_counter() - interval_start - off_loop, 1e-9)
                    recorder.metrics(step, {"loss": mean_loss, "epoch": epoch, **lr_values(),
                                            "throughput/steps_per_s": interval_steps / elapsed,
                                            "throughput/samples_per_s": interval_images / elapsed,
                                            "throughput/data_wait_share": min(data_wait / elapsed, 1.0),
                                            **({} if ema is None else {"ema/decay": ema.decay})})
                    recorder.progress(step, total_steps, mean_loss)
                    loss_sum.zero_()
                    loss_count = 0
                    interval_images = 0
                    interval_steps = 0
                    data_wait = off_loop = 0.0
                    interval_start = time.perf_counter()
                off_start = time.perf_counter()
                if (cfg.validation.every_n_steps and step % cfg.validation.every_n_steps == 0) or last:
                    scores = evaluate()
                    history.append((step, scores.mean))
                    recorder.metrics(step, scores.metrics())
                if (cfg.sampling.every_n_steps and step % cfg.sampling.every_n_steps == 0) or last:
                    sample(step)
                if last:
                    checkpoint(Position(step, epoch, batch_index + 1))
                    break
                if every_steps and step % every_steps == 0:
                    if batch_index + 1 < data.num_batches:
                        recorder.snapshot(epoch, step, lora_tensors(save_dtype), plan, by_step=True)
                        checkpoint(Position(step, epoch, batch_index + 1))
                    else:  # the epoch's last batch: saved after the epoch's own snapshot, as of the next epoch
                        step_save_due = True
                off_loop += time.perf_counter() - off_start
                fetch_start = time.perf_counter()
            else:  # the epoch ran to its end
                epoch_due = bool(every_epochs and epoch % every_epochs == 0 and step < total_steps)
                if epoch_due or step_save_due:
                    off_start = time.perf_counter()
                    tensors = lora_tensors(save_dtype)
                    if epoch_due:
                        recorder.snapshot(epoch, step, tensors, plan)
                    if step_save_due:
                        recorder.snapshot(epoch, step, tensors, plan, by_step=True)
                    checkpoint(Position(step, epoch + 1, 0))
                    off_loop += time.perf_counter() - off_start
                    fetch_start = time.perf_counter()
                step_save_due = False
            epoch += 1
            start_batch = 0

        return TrainResult(steps=step, val_loss_start=val_start, val_loss=history[-1][1] if history else float("nan"),
                           plan=plan, val_history=history, lora_tensors=lora_tensors(save_dtype), states=saved_states,
                           feature_cache=describe(stores), first_step_at=first_step_at,
                           conv_kernels=kernels, val_per_timestep={} if scores is None else scores.per_timestep)
    finally:
        scope.close()
        _restore(network, (unet, vae, text_encoder))


def lora_file_path(run_dir: Path, name: str, extension: str = "safetensors") -> Path:
    return run_dir / "lora" / f"{name}.{extension}"
