"""The ``ss_*`` training metadata kohya's sd-scripts writes into a LoRA file (read by A1111's LoRA browser,
ComfyUI, civitai's uploader and kohya's own tools).

Keys, spellings and value formats follow sd-scripts ``train_network.py`` (its ``metadata`` dict for the
classic ``--train_data_dir`` layout): every value is ``str(value)`` of kohya's Python value, so ``None`` is
``"None"``, booleans ``"True"``/``"False"``, dicts JSON. Keys kohya writes for features lorasweep does not
have (noise offset variants, fp8, huber loss, ...) are left out rather than guessed. The ``sshs_*`` hashes
are added when the file is written (:func:`lorasweep.network.kohya.save_lora`), since they hash the saved
tensors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorasweep.config.network import LORAPLUS_KEYS, NetworkConfig
from lorasweep.config.train import TrainConfig

NETWORK_MODULE = "networks.lora"
"""kohya's module for this file layout; readers use it to pick the loader."""
LYCORIS_MODULE = "lycoris.kohya"
"""LyCORIS's kohya entry point (``--network_module lycoris.kohya``): LoHa, LoKr and DoRA files."""


def network_module(net: NetworkConfig) -> str:
    """``ss_network_module``: kohya's ``networks.lora`` trains LoRA and LoCon; LoHa, LoKr and DoRA come from
    LyCORIS, so their files name it, as the tools that made them would."""
    return NETWORK_MODULE if net.algo == "lora" and not net.dora else LYCORIS_MODULE


def network_args(net: NetworkConfig) -> dict[str, str]:
    """``ss_network_args``: the non-default ``--network_args`` the module would need for this network, as
    strings (kohya stores the ``key=value`` strings it was given). ``target`` is lorasweep's own (an
    ``attention`` target has no kohya argument)."""
    args: dict[str, object] = {}
    lycoris = network_module(net) == LYCORIS_MODULE
    if lycoris:
        args["algo"] = net.algo
        if net.conv_dim is None:
            args["preset"] = "attn-mlp"  # LyCORIS adapts the convs by default; this preset is kohya's set
    if net.conv_dim is not None:
        args["conv_dim"] = net.conv_dim
        args["conv_alpha"] = net.effective_conv_alpha
    if net.dora:
        args["dora_wd"] = True
    if net.algo == "lokr":
        args["factor"] = net.lokr_factor
    for name in ("rank_dropout", "module_dropout"):
        if getattr(net, name):
            args[name] = getattr(net, name)
    if net.algo == "loha" and net.rank_dropout:
        args["rank_dropout_scale"] = True  # peft's LoHa always rescales the kept rows
    for name in LORAPLUS_KEYS:
        if getattr(net, name) is not None:
            args[name] = getattr(net, name)
    if net.target != "kohya":
        args["target"] = net.target
    return {key: str(value) for key, value in args.items()}


@dataclass(frozen=True)
class TrainingFacts:
    """What the metadata needs that is not in the config: counted or measured during the run."""

    model_id: str
    """The base model as given (path or hub id); a path is stored by its base name, as kohya does."""
    num_train_images: int
    """Training images × repeats (kohya ``ss_num_train_images``)."""
    num_batches_per_epoch: int
    num_epochs: int
    epoch: int
    """Epoch of this save (``ss_epoch``)."""
    max_train_steps: int
    warmup_steps: int
    started_at: float
    """Unix time training started (``ss_training_started_at``)."""
    tag_frequency: dict[str, dict[str, int]]
    """Per concept folder (``10_shiroko``), how many captions carry each tag (``ss_tag_frequency``)."""
    dataset_dirs: dict[str, dict[str, int]]
    """Per training folder, ``{"n_repeats": r, "img_count": n}`` (``ss_dataset_dirs``)."""
    steps: int | None = None
    """Optimizer steps done at this save (``ss_steps``); None = ``max_train_steps`` (the final save)."""
    finished_at: float | None = None
    """Unix time of this save (``ss_training_finished_at``); None = now."""
    num_validation_images: int = 0
    """Held-out validation images (``ss_num_validation_images``)."""
    num_reg_images: int = 0
    """Regularisation images × repeats from ``data.reg_dir`` (``ss_num_reg_images``)."""
    reg_dataset_dirs: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per regularisation folder, ``{"n_repeats": r, "img_count": n}`` (``ss_reg_dataset_dirs``)."""
    bucket_info: dict[str, Any] | None = None
    """kohya's ``{"buckets": {i: {"resolution": [w, h], "count": n}}, "mean_img_ar_error": e}`` of the
    buckets actually used (counts include repeats); None without bucketing (``ss_bucket_info`` = null)."""
    model_hash: str | None = None
    """A1111's old 8-hex hash of a single-file base checkpoint (``ss_sd_model_hash``, see
    :func:`legacy_model_hash`); None (a diffusers folder or hub id) leaves the key out."""
    new_model_hash: str | None = None
    """SHA-256 of that file (``ss_new_sd_model_hash``, :func:`sha256_file`); None leaves the key out."""
    vae_hash: str | None = None
    """Legacy hash of a single-file ``model.vae`` (``ss_vae_hash``); None leaves the key out."""
    new_vae_hash: str | None = None
    """SHA-256 of that VAE file (``ss_new_vae_hash``); None leaves the key out."""


def legacy_model_hash(path: Path | str) -> str | None:
    """kohya's ``model_hash`` / A1111's old model hash: first 8 hex digits of the SHA-256 of the 64 KiB at
    offset 1 MiB of a file. None for a folder (kohya would store the string ``IsADirectory``) or no file."""
    path = Path(path)
    if not path.is_file():
        return None
    with path.open("rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def sha256_file(path: Path | str) -> str | None:
    """kohya's ``calculate_sha256`` / A1111's new model hash (the full SHA-256); None for a non-file."""
    path = Path(path)
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def base_model_version(v2: bool, v_parameterization: bool) -> str:
    """kohya's ``get_model_version_str_for_sd1_sd2``: ``sd_v1``, ``sd_v2``, ``sd_v2_v`` (768-v), ``sd_v1_v``."""
    return ("sd_v2" if v2 else "sd_v1") + ("_v" if v_parameterization else "")


def session_id(cfg: TrainConfig) -> int:
    """``ss_session_id``: kohya draws ``random.randint(0, 2**32)`` per training session, so the epoch
    snapshots of one run share it. lorasweep derives it from the whole resolved config (seed, trial number
    and all), so the same config always writes the same id and its files stay reproducible, while runs that
    differ in anything, such as two sweep trials, get different ids."""
    canonical = json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str)
    return random.Random(hashlib.sha256(canonical.encode()).digest()).randint(0, 2**32)


def optimizer_description(cfg: TrainConfig) -> str:
    """``ss_optimizer``: kohya writes the optimizer class's full name plus its extra arguments."""
    try:
        from lorasweep.training.optim import optimizer_description as describe
    except ImportError:  # optim.py without it: describe the AdamW this project builds
        opt = cfg.optimizer
        return f"torch.optim.AdamW(weight_decay={opt.weight_decay},betas=({opt.beta1}, {opt.beta2}))"
    return str(describe(cfg.optimizer))


def _name(path_or_id: str) -> str:
    """kohya stores an existing path by its base name and anything else (a hub id) as given."""
    return os.path.basename(os.path.normpath(path_or_id)) if os.path.exists(path_or_id) else path_or_id


def _resolution(resolution: int | Sequence[int]) -> tuple[int, int]:
    """kohya's ``args.resolution`` after parsing: ``(width, height)``, a single size repeated."""
    if isinstance(resolution, int):
        return resolution, resolution
    width, height = resolution
    return int(width), int(height)


def kohya_metadata(cfg: TrainConfig, facts: TrainingFacts) -> dict[str, str]:
    """The ``ss_*`` header of a LoRA saved with ``cfg`` at the state ``facts`` describes.

    Empty with ``output.no_metadata`` (unlike kohya, which keeps its six "minimum" keys: no training
    information is written at all). Pass the result to :func:`~lorasweep.network.kohya.save_lora`.
    """
    if cfg.output.no_metadata:
        return {}
    data, buckets, net, opt = cfg.data, cfg.data.buckets, cfg.network, cfg.optimizer
    meta: dict[str, object] = {
        "ss_session_id": session_id(cfg),
        "ss_training_started_at": facts.started_at,
        "ss_training_finished_at": time.time() if facts.finished_at is None else facts.finished_at,
        "ss_output_name": cfg.output.name,
        "ss_learning_rate": opt.lr,
        "ss_text_encoder_lr": opt.text_encoder_lr,  # None = same as learning_rate, as in kohya
        "ss_unet_lr": opt.unet_lr,
        "ss_num_train_images": facts.num_train_images,
        "ss_num_validation_images": facts.num_validation_images,
        "ss_num_reg_images": facts.num_reg_images,
        "ss_num_batches_per_epoch": facts.num_batches_per_epoch,
        "ss_num_epochs": facts.num_epochs,
        "ss_epoch": facts.epoch,
        "ss_steps": facts.max_train_steps if facts.steps is None else facts.steps,
        "ss_gradient_checkpointing": cfg.training.gradient_checkpointing,
        "ss_gradient_accumulation_steps": cfg.training.grad_accum_steps,
        "ss_max_train_steps": facts.max_train_steps,
        "ss_lr_warmup_steps": facts.warmup_steps,
        "ss_lr_scheduler": cfg.scheduler.name,
        "ss_network_module": network_module(net),
        "ss_network_dim": net.dim,
        "ss_network_alpha": net.effective_alpha,
        "ss_network_dropout": net.dropout,
        "ss_mixed_precision": cfg.precision.mixed,
        "ss_full_fp16": False,  # LoRA weights always train in float32 (see inject_lora)
        "ss_v2": cfg.model.v2,
        "ss_base_model_version": base_model_version(cfg.model.v2, cfg.model.v_parameterization),
        "ss_clip_skip": cfg.model.clip_skip,
        # kohya's --max_token_length is None for the default 75
        "ss_max_token_length": None if cfg.model.max_token_length == 75 else cfg.model.max_token_length,
        "ss_cache_latents": data.cache_latents,
        "ss_seed": cfg.training.seed,
        "ss_training_comment": cfg.output.comment,
        "ss_optimizer": optimizer_description(cfg),
        "ss_max_grad_norm": 0.0 if cfg.training.max_grad_norm is None else cfg.training.max_grad_norm,
        "ss_caption_dropout_rate": data.caption_dropout_rate,
        "ss_caption_dropout_every_n_epochs": data.caption_dropout_every_n_epochs or 0,  # kohya: 0 = never
        "ss_caption_tag_dropout_rate": data.caption_tag_dropout_rate,
        "ss_prior_loss_weight": cfg.training.prior_loss_weight,
        # The objective's knobs; 0 ("off" here) is kohya's None.
        "ss_noise_offset": cfg.training.noise_offset or None,
        "ss_noise_offset_random_strength": cfg.training.noise_offset_random_strength,
        "ss_adaptive_noise_scale": cfg.training.adaptive_noise_scale or None,
        "ss_multires_noise_iterations": cfg.training.multires_noise_iterations or None,
        "ss_multires_noise_discount": cfg.training.multires_noise_discount,
        "ss_ip_noise_gamma": cfg.training.ip_noise_gamma or None,
        "ss_ip_noise_gamma_random_strength": cfg.training.ip_noise_gamma_random_strength,
        "ss_zero_terminal_snr": cfg.training.zero_terminal_snr,
        "ss_min_snr_gamma": cfg.training.min_snr_gamma,
        "ss_debiased_estimation": cfg.training.debiased_estimation,
        "ss_loss_type": cfg.training.loss_type,
        "ss_huber_schedule": cfg.training.huber_schedule,
        "ss_huber_c": cfg.training.huber_c,
        "ss_huber_scale": cfg.training.huber_scale,
        "ss_validation_seed": cfg.validation.seed,
        "ss_validation_split": cfg.validation.split,
        "ss_batch_size_per_device": cfg.training.batch_size,
        "ss_total_batch_size": cfg.training.batch_size * cfg.training.grad_accum_steps,
        "ss_resolution": _resolution(data.resolution),
        "ss_color_aug": data.color_aug,
        "ss_flip_aug": data.flip_aug,
        "ss_random_crop": data.random_crop,
        "ss_shuffle_caption": data.shuffle_caption,
        "ss_enable_bucket": buckets.enabled,
        # kohya leaves these None / False when bucketing is off
        "ss_bucket_no_upscale": buckets.enabled and buckets.no_upscale,
        # rounded outwards to multiples of the step, as kohya's adjust_min_max_bucket_reso_by_steps does
        "ss_min_bucket_reso": buckets.min_side - buckets.min_side % buckets.step if buckets.enabled else None,
        "ss_max_bucket_reso": buckets.max_side + (-buckets.max_side) % buckets.step if buckets.enabled else None,
        "ss_keep_tokens": data.keep_tokens,
        "ss_dataset_dirs": json.dumps(facts.dataset_dirs),
        "ss_reg_dataset_dirs": json.dumps(facts.reg_dataset_dirs),
        "ss_tag_frequency": json.dumps(facts.tag_frequency),
        "ss_bucket_info": json.dumps(facts.bucket_info if buckets.enabled else None),
        "ss_sd_model_name": _name(facts.model_id),
    }
    args = network_args(net)
    if args:  # kohya writes ss_network_args only when network arguments were given
        meta["ss_network_args"] = json.dumps(args)
    for key, value in (("ss_sd_model_hash", facts.model_hash), ("ss_new_sd_model_hash", facts.new_model_hash)):
        if value is not None:
            meta[key] = value
    if cfg.model.vae is not None:
        meta["ss_vae_name"] = _name(cfg.model.vae)
        for key, value in (("ss_vae_hash", facts.vae_hash), ("ss_new_vae_hash", facts.new_vae_hash)):
            if value is not None:
                meta[key] = value
    return {key: str(value) for key, value in meta.items()}
