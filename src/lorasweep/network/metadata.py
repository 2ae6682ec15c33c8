"""The ``ss_*`` training metadata kohya's sd-scripts writes into a LoRA file (read by A1111, ComfyUI and
the civitai uploader). Every value is a string, as the safetensors header requires."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from lorasweep.config.train import TrainConfig


@dataclass(frozen=True)
class TrainingFacts:
    """What the metadata needs that is not in the config: counted or measured during the run."""

    model_id: str
    num_train_images: int
    num_batches_per_epoch: int
    num_epochs: int
    epoch: int
    max_train_steps: int
    warmup_steps: int
    started_at: float
    tag_frequency: dict[str, dict[str, int]]
    dataset_dirs: dict[str, dict[str, int]]


def kohya_metadata(cfg: TrainConfig, facts: TrainingFacts) -> dict[str, str]:
    res = cfg.data.resolution
    meta = {
        "ss_session_id": str(cfg.training.seed),
        "ss_training_started_at": str(facts.started_at),
        "ss_training_finished_at": str(time.time()),
        "ss_output_name": cfg.output.name,
        "ss_learning_rate": str(cfg.optimizer.lr),
        "ss_unet_lr": str(cfg.optimizer.unet_learning_rate),
        "ss_text_encoder_lr": str(cfg.optimizer.text_encoder_learning_rate),
        "ss_num_train_images": str(facts.num_train_images),
        "ss_num_reg_images": "0",
        "ss_num_batches_per_epoch": str(facts.num_batches_per_epoch),
        "ss_num_epochs": str(facts.num_epochs),
        "ss_epoch": str(facts.epoch),
        "ss_batch_size_per_device": str(cfg.training.batch_size),
        "ss_total_batch_size": str(cfg.training.batch_size * cfg.training.grad_accum_steps),
        "ss_gradient_accumulation_steps": str(cfg.training.grad_accum_steps),
        "ss_gradient_checkpointing": str(cfg.training.gradient_checkpointing),
        "ss_max_train_steps": str(facts.max_train_steps),
        "ss_lr_warmup_steps": str(facts.warmup_steps),
        "ss_lr_scheduler": cfg.scheduler.name,
        "ss_optimizer": f"torch.optim.AdamW(weight_decay={cfg.optimizer.weight_decay},"
                        f"betas=({cfg.optimizer.beta1}, {cfg.optimizer.beta2}))",
        "ss_max_grad_norm": str(cfg.training.max_grad_norm),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(cfg.network.dim),
        "ss_network_alpha": str(cfg.network.effective_alpha),
        "ss_network_dropout": str(cfg.network.dropout),
        "ss_network_args": json.dumps({"target": cfg.network.target}),
        "ss_network_train_unet_only": str(not cfg.network.train_text_encoder),
        "ss_network_train_text_encoder_only": str(not cfg.network.train_unet),
        "ss_mixed_precision": cfg.precision.mixed,
        "ss_full_fp16": "False",
        "ss_v2": "False",
        "ss_base_model_version": "sd_v1",
        "ss_clip_skip": str(cfg.model.clip_skip),
        "ss_max_token_length": "None",
        "ss_cache_latents": str(cfg.data.cache_latents),
        "ss_seed": str(cfg.training.seed),
        "ss_noise_offset": "None",
        "ss_prior_loss_weight": "1.0",
        "ss_sd_model_name": facts.model_id,
        "ss_resolution": f"({res}, {res})",
        "ss_enable_bucket": "False",
        "ss_tag_frequency": json.dumps(facts.tag_frequency),
        "ss_dataset_dirs": json.dumps(facts.dataset_dirs),
    }
    if cfg.output.comment:
        meta["ss_training_comment"] = cfg.output.comment
    return meta
