"""Load the frozen base model's parts: UNet, VAE, text encoder, tokenizer and noise scheduler.

``model.base`` is ``tiny`` (the embedded model, built locally), a diffusers folder, or a hub id (online).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorasweep.config.model import ModelConfig
from lorasweep.config.paths import cache_root
from lorasweep.errors import UserError

TINY = "tiny"


@dataclass
class BaseModel:
    """The parts of an SD-1.x pipeline that training needs, plus a stable identity for caches/metadata."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any
    model_id: str
    source_dir: Path | None


def _looks_like_hub_id(base: str) -> bool:
    """``owner/name`` with no path prefix and no file extension (a missing local path is reported as such)."""
    parts = base.split("/")
    return (len(parts) == 2 and all(parts) and not base.startswith((".", "~"))
            and Path(parts[1]).suffix == "" and not Path(parts[0]).exists())


def resolve_base(cfg: ModelConfig) -> tuple[str, Path | None]:
    """Return (identity, local diffusers folder or None for a hub id); raise a UserError for bad paths.

    Done before any heavy import so a wrong path fails in well under a second.
    """
    base = cfg.base
    if base == TINY:
        from lorasweep.models.tiny import TINY_VERSION

        return f"lorasweep/tiny-sd1-v{TINY_VERSION}", None
    path = Path(base).expanduser()
    if path.exists():
        if path.is_file():
            raise UserError("model.base", f"{path} is a single-file checkpoint; this version loads diffusers "
                            "folders only.", "Convert it to a diffusers folder (diffusers' "
                            "convert_original_stable_diffusion_to_diffusers.py) and point model.base there.")
        if not (path / "model_index.json").is_file() and not (path / "unet").is_dir():
            raise UserError("model.base", f"{path} is not a diffusers model folder (no model_index.json, no "
                            "unet/).", "Point it at a folder with unet/, vae/, text_encoder/, tokenizer/ and "
                            "scheduler/ sub-folders.")
        return str(path.resolve()), path.resolve()
    if _looks_like_hub_id(base):
        return base, None
    raise UserError("model.base", f"{base} does not exist.",
                    "Give the path of a diffusers model folder, a hub id such as "
                    "stable-diffusion-v1-5/stable-diffusion-v1-5 (needs network), or `tiny`.")


def quiet_libraries() -> None:
    """Keep diffusers/transformers' load-time progress bars and advice out of the training output."""
    import diffusers
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


def prepare_base(cfg: ModelConfig) -> tuple[str, Path | None]:
    """``resolve_base``, and build the embedded tiny model when it is the base and not cached yet.

    A sweep calls it once before its trials start, so the one-time build runs with every core instead of
    inside a trial that got a share of them (the other trials would wait on its file lock meanwhile).
    """
    model_id, folder = resolve_base(cfg)
    if cfg.base == TINY:
        from lorasweep.models.tiny import ensure_tiny_model

        folder = ensure_tiny_model(cache_root(cfg.cache_dir))
    return model_id, folder


def load_base_model(cfg: ModelConfig) -> BaseModel:
    """Load every part in float32 on the CPU; the trainer moves them to the device and dtype it needs."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    quiet_libraries()

    model_id, folder = prepare_base(cfg)
    source: str = str(folder) if folder is not None else cfg.base
    local = folder is not None
    try:
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", local_files_only=local,
                                                    torch_dtype=torch.float32)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", local_files_only=local, torch_dtype=torch.float32)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", local_files_only=local,
                                                     dtype=torch.float32)
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", local_files_only=local)
        noise_scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", local_files_only=local)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = ("Check that the folder is a complete SD-1.x diffusers model." if local else
                "Without network access only local folders and `tiny` work; download the model first and "
                "point model.base at its folder.")
        raise UserError("model.base", f"could not load {source}: {first}", hint) from None
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    return BaseModel(unet, vae, text_encoder, tokenizer, noise_scheduler, model_id, folder)
