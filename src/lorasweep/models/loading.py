"""Load the frozen base model's parts: UNet, VAE, text encoder, tokenizer and noise scheduler.

``model.base`` is ``tiny`` (the embedded model, built locally), a diffusers folder, a single-file SD 1.x/2.x
checkpoint (converted offline by :mod:`lorasweep.models.single_file`), or a hub id (online, or already in
the local hub cache). ``model.vae`` replaces the base's VAE, ``model.v2`` must agree with the model, and
``model.v_parameterization`` sets the noise scheduler's ``prediction_type`` so the training target and
sampling agree. Every user mistake is found by :func:`resolve_base` (cheap: headers and config files only)
before any folder or run exists, and reported as a :class:`~lorasweep.errors.UserError`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorasweep.config.model import ModelConfig
from lorasweep.config.paths import cache_root
from lorasweep.errors import UserError

log = logging.getLogger(__name__)

TINY = "tiny"
#: Where a single-file checkpoint's tokenizer comes from when ``model.tokenizer`` is unset: the local hub
#: cache's copy of the tokenizer the model was trained with (the same ones kohya uses), as (repo, subfolder).
V1_TOKENIZER = ("openai/clip-vit-large-patch14", "")
V2_TOKENIZER = ("stabilityai/stable-diffusion-2", "tokenizer")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")
# The "old" model hash of A1111 that kohya writes as ss_sd_model_hash: sha256 of 64 KiB at 1 MiB, 8 hex digits.
_HASH_OFFSET, _HASH_LENGTH = 0x100000, 0x10000


@dataclass
class BaseModel:
    """The parts of an SD 1.x/2.x pipeline that training needs, plus a stable identity for caches/metadata."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any
    model_id: str
    source_dir: Path | None
    """The local diffusers folder or single file the weights came from; None for a hub id."""
    model_hash: str = ""
    """kohya's ``ss_sd_model_hash`` (see :func:`model_hash`)."""
    v2: bool = False
    """An SD 2.x model (OpenCLIP text encoder); ``model.v2`` was checked against the weights."""
    vae_hash: str | None = None
    """:func:`model_hash` of ``model.vae`` when it replaced the base's VAE (kohya's ``ss_vae_hash``)."""


@dataclass(frozen=True)
class _Base:
    kind: str  # "tiny", "folder", "file" or "hub"
    model_id: str
    path: Path | None


# --------------------------------------------------------------------------------------------------------
# identity


def _hash_window(path: Path) -> bytes:
    size = path.stat().st_size
    with path.open("rb") as handle:
        if size < _HASH_OFFSET + _HASH_LENGTH:  # smaller than any real checkpoint: the whole file
            return handle.read()
        handle.seek(_HASH_OFFSET)
        return handle.read(_HASH_LENGTH)


def model_hash(path: Path) -> str:
    """A cheap fingerprint for ``ss_sd_model_hash``: 8 hex digits, reading at most 64 KiB per weight file.

    A file gets kohya's ``model_hash`` exactly (A1111's "old" hash: sha256 of the 64 KiB at offset 1 MiB);
    files smaller than that window are hashed whole. A folder (diffusers model) gets the sha256 over each
    weight file's relative path, size and that same window, in sorted order — kohya writes "IsADirectory".
    """
    path = Path(path)
    if path.is_file():
        return hashlib.sha256(_hash_window(path)).hexdigest()[:8]
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.suffix in _WEIGHT_SUFFIXES and p.is_file()):
        digest.update(f"{file.relative_to(path).as_posix()}\0{file.stat().st_size}\0".encode())
        digest.update(_hash_window(file))
    return digest.hexdigest()[:8]


# --------------------------------------------------------------------------------------------------------
# cheap checks (preflight)


def _looks_like_hub_id(base: str) -> bool:
    """``owner/name`` with no path prefix and no file extension (a missing local path is reported as such)."""
    parts = base.split("/")
    return (len(parts) == 2 and all(parts) and not base.startswith((".", "~"))
            and Path(parts[1]).suffix == "" and not Path(parts[0]).exists())


def _hub_cache() -> str:
    """The hub cache, read at call time (``HF_HUB_CACHE`` wins, as in huggingface_hub)."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _cached(repo: str, filename: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename, cache_dir=_hub_cache())
    return found if isinstance(found, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _is_sd2(text_hidden_size: Any, cross_attention_dim: Any) -> bool:
    """SD 2.x's OpenCLIP-H text encoder is 1024 wide (SD 1.x's CLIP-L: 768)."""
    return 1024 in (text_hidden_size, cross_attention_dim)


def _check_v2(sd2: bool, v2: bool, what: str) -> None:
    if sd2 and not v2:
        raise UserError("model.v2", f"{what} is an SD 2.x model (1024-wide OpenCLIP text encoder), but model.v2 is "
                        "false.", "Set model.v2=true (and model.v_parameterization=true for a 768-v model).")
    if v2 and not sd2:
        raise UserError("model.v2", f"model.v2 is true, but {what} is an SD 1.x model (768-wide CLIP text encoder).",
                        "Set model.v2=false.")


def _refuse_pickle(path: Path, key: str, allow_pickle: bool) -> None:
    from lorasweep.models.single_file import PICKLE_SUFFIXES

    if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        raise UserError(key, f"{path} is a pickle checkpoint ({path.suffix}); unpickling a file can run any code it "
                        "carries, so it is refused by default.",
                        "Convert it to .safetensors, or, if you trust it, set model.allow_pickle=true (it is then "
                        "read with torch.load(weights_only=True), which loads tensors only).")


def _resolve(cfg: ModelConfig) -> _Base:
    """Classify ``model.base`` and check what can be checked without loading weights."""
    from lorasweep.models import single_file

    base = cfg.base
    if base == TINY:
        from lorasweep.models import TINY_VERSION

        _check_v2(False, cfg.v2, "the embedded `tiny` model")
        return _Base("tiny", f"lorasweep/tiny-sd1-v{TINY_VERSION}", None)
    path = Path(base).expanduser()
    if path.is_file():
        path = path.resolve()
        _refuse_pickle(path, "model.base", cfg.allow_pickle)
        if path.suffix.lower() not in (".safetensors", *single_file.PICKLE_SUFFIXES):
            raise UserError("model.base", f"{path} is neither a .safetensors nor a .ckpt checkpoint.",
                            "Give a diffusers folder, a .safetensors checkpoint, a hub id, or `tiny`.")
        keys = single_file.read_keys(path, "model.base", allow_pickle=cfg.allow_pickle)
        single_file.check_layout(single_file.checkpoint_layout(keys), path, v2=cfg.v2)
        return _Base("file", str(path), path)
    if path.is_dir():
        path = path.resolve()
        if not (path / "model_index.json").is_file() and not (path / "unet").is_dir():
            raise UserError("model.base", f"{path} is not a diffusers model folder (no model_index.json, no "
                            "unet/).", "Point it at a folder with unet/, vae/, text_encoder/, tokenizer/ and "
                            "scheduler/ sub-folders, or at a single-file checkpoint.")
        text = _read_json(path / "text_encoder" / "config.json")
        unet = _read_json(path / "unet" / "config.json")
        if text or unet:
            _check_v2(_is_sd2(text.get("hidden_size"), unet.get("cross_attention_dim")), cfg.v2, str(path))
        return _Base("folder", str(path), path)
    if _looks_like_hub_id(base):
        if _cached(base, "model_index.json") is None and _hub_offline():
            raise UserError("model.base", f"{base!r} is a hub id, but the hub is offline (HF_HUB_OFFLINE is set) and "
                            f"the model is not in the local hub cache ({_hub_cache()}).",
                            f"Download it where there is network (`hf download {base}`), or point model.base at a "
                            "local diffusers folder or single-file checkpoint, or use `tiny`.")
        return _Base("hub", base, None)
    raise UserError("model.base", f"{base} does not exist.",
                    "Give the path of a diffusers model folder or a single-file .safetensors checkpoint, a hub id "
                    "such as stable-diffusion-v1-5/stable-diffusion-v1-5 (needs network), or `tiny`.")


def _has_tokenizer_files(folder: Path) -> bool:
    return (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file()


def _tokenizer_location(cfg: ModelConfig, base: _Base) -> tuple[str, str, bool] | None:
    """(folder or hub id, subfolder, from the hub cache) of the tokenizer to use; None = the model's own."""
    if cfg.tokenizer:
        path = Path(cfg.tokenizer).expanduser()
        if _has_tokenizer_files(path / "tokenizer"):
            return str(path), "tokenizer", False
        if _has_tokenizer_files(path):
            return str(path), "", False
        raise UserError("model.tokenizer", f"{path} is not a tokenizer folder (no vocab.json or tokenizer.json, "
                        "neither there nor in a tokenizer/ sub-folder).",
                        "Point it at a CLIP tokenizer folder, e.g. the tokenizer/ folder of a diffusers SD model.")
    if base.kind != "file":
        return None
    repo, sub = V2_TOKENIZER if cfg.v2 else V1_TOKENIZER
    prefix = f"{sub}/" if sub else ""
    if _cached(repo, f"{prefix}vocab.json") is None and _cached(repo, f"{prefix}tokenizer.json") is None:
        where = f"{repo} (sub-folder {sub})" if sub else repo
        raise UserError("model.tokenizer", f"{base.path} is a single-file checkpoint, which carries no tokenizer, "
                        f"and the tokenizer of {where} is not in the local hub cache ({_hub_cache()}).",
                        f"Set model.tokenizer to a local CLIP tokenizer folder (e.g. the tokenizer/ folder of a "
                        f"diffusers SD {'2' if cfg.v2 else '1.5'} model), or download it once with "
                        f"`hf download {repo}`.")
    return repo, sub, True


def _check_vae(cfg: ModelConfig) -> Path | None:
    """``model.vae`` as a resolved path (None when unset), checked without loading weights."""
    from lorasweep.models import single_file

    if not cfg.vae:
        return None
    path = Path(cfg.vae).expanduser().resolve()
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "vae" / "config.json").is_file():
            raise UserError("model.vae", f"{path} is not a diffusers VAE folder (no config.json, no vae/config.json).",
                            "Point it at a VAE folder, a diffusers model folder, or a single .safetensors VAE file.")
        return path
    if not path.is_file():
        raise UserError("model.vae", f"{cfg.vae} does not exist.",
                        "Give a diffusers VAE folder or a .safetensors VAE file, or null to keep the base's VAE.")
    _refuse_pickle(path, "model.vae", cfg.allow_pickle)
    if path.suffix.lower() not in (".safetensors", *single_file.PICKLE_SUFFIXES):
        raise UserError("model.vae", f"{path} is neither a .safetensors nor a .ckpt file.",
                        "Give a diffusers VAE folder or a .safetensors VAE file.")
    keys = single_file.read_keys(path, "model.vae", allow_pickle=cfg.allow_pickle)
    starts = ("encoder.", f"{single_file.VAE_PREFIX}encoder.", "vae.encoder.")
    if not any(name.startswith(starts) for name in keys):
        raise UserError("model.vae", f"{path} holds no VAE weights (no encoder.* tensors).",
                        "Point it at a VAE file in the original layout, or a full SD checkpoint.")
    return path


def resolve_base(cfg: ModelConfig) -> tuple[str, Path | None]:
    """Return (identity, local folder or single file; None for a hub id and for `tiny`); raise a UserError for
    any bad ``model.*`` input that can be seen without loading weights.

    Done before any heavy import so a wrong path fails in well under a second.
    """
    base = _resolve(cfg)
    _tokenizer_location(cfg, base)
    _check_vae(cfg)
    return base.model_id, base.path


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
    model_id, path = resolve_base(cfg)
    if cfg.base == TINY:
        from lorasweep.models.tiny import ensure_tiny_model

        path = ensure_tiny_model(cache_root(cfg.cache_dir))
    return model_id, path


# --------------------------------------------------------------------------------------------------------
# loading


def _load_diffusers(source: str, local: bool) -> tuple[Any, Any, Any, Any, dict[str, Any]]:
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    try:
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", local_files_only=local,
                                                    torch_dtype=torch.float32)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", local_files_only=local, torch_dtype=torch.float32)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", local_files_only=local,
                                                     dtype=torch.float32)
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", local_files_only=local)
        scheduler = DDPMScheduler.load_config(source, subfolder="scheduler", local_files_only=local)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = ("Check that the folder is a complete SD 1.x/2.x diffusers model." if local else
                "Without network access only models already in the local hub cache, local folders and files, and "
                "`tiny` work; download the model first, or point model.base at its folder.")
        raise UserError("model.base", f"could not load {source}: {first}", hint) from None
    return unet, vae, text_encoder, tokenizer, dict(scheduler)


def _load_tokenizer(location: tuple[str, str, bool]) -> Any:
    from transformers import CLIPTokenizer

    source, sub, from_hub = location
    kwargs: dict[str, Any] = {"local_files_only": True}
    if sub:
        kwargs["subfolder"] = sub
    if from_hub:
        kwargs["cache_dir"] = _hub_cache()
    try:
        return CLIPTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError("model.tokenizer", f"could not load the tokenizer from {source}{f' ({sub})' if sub else ''}: "
                        f"{first}", "Point model.tokenizer at a complete CLIP tokenizer folder.") from None


def _load_vae(path: Path, allow_pickle: bool) -> Any:
    import torch
    from diffusers import AutoencoderKL

    from lorasweep.models.single_file import load_vae_file

    if path.is_file():
        return load_vae_file(path, allow_pickle=allow_pickle, key="model.vae")
    subfolder = "vae" if (path / "vae" / "config.json").is_file() else None
    try:
        vae = AutoencoderKL.from_pretrained(str(path), subfolder=subfolder, local_files_only=True,
                                            torch_dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise UserError("model.vae", f"could not load the VAE in {path}: {str(exc).strip().splitlines()[0]}",
                        "Check that the folder is a complete diffusers VAE (config.json and weights).") from None
    return vae


def _scheduler(config: dict[str, Any] | None, v_parameterization: bool) -> Any:
    """A DDPM scheduler whose ``prediction_type`` follows ``model.v_parameterization`` (as kohya: the flag
    decides, whatever the model's own scheduler config declares)."""
    from diffusers import DDPMScheduler

    from lorasweep.models.single_file import sd_scheduler_config

    prediction = "v_prediction" if v_parameterization else "epsilon"
    if config is not None and config.get("prediction_type", "epsilon") != prediction:
        log.warning("the base model's scheduler declares prediction_type=%s, but model.v_parameterization=%s "
                    "trains with %s", config.get("prediction_type"), v_parameterization, prediction)
    return DDPMScheduler.from_config(config or sd_scheduler_config(), prediction_type=prediction)


def _check_text_parts(cfg: ModelConfig, tokenizer: Any, text_encoder: Any) -> None:
    if len(tokenizer) > text_encoder.config.vocab_size:
        raise UserError("model.tokenizer", f"the tokenizer has {len(tokenizer)} tokens but the text encoder knows "
                        f"only {text_encoder.config.vocab_size}: it belongs to another model.",
                        "Use the tokenizer of the base model's family (CLIP ViT-L/14 for SD 1.x, SD 2's for 2.x).")
    layers = text_encoder.config.num_hidden_layers
    if cfg.clip_skip > layers:
        raise UserError("model.clip_skip", f"{cfg.clip_skip} skips more layers than the text encoder's {layers}.",
                        f"Use a value from 1 to {layers}.")


def check_loaded(base: BaseModel, cfg: ModelConfig) -> None:
    """The checks of ``cfg`` against a loaded model (a cached model loaded for another ``clip_skip``)."""
    _check_text_parts(cfg, base.tokenizer, base.text_encoder)


def load_base_model(cfg: ModelConfig) -> BaseModel:
    """Load every part in float32 on the CPU; the trainer moves them to the device and dtype it needs."""
    from lorasweep.models.single_file import load_checkpoint

    quiet_libraries()
    base = _resolve(cfg)
    tokenizer_location = _tokenizer_location(cfg, base)
    vae_path = _check_vae(cfg)
    tokenizer = _load_tokenizer(tokenizer_location) if tokenizer_location else None
    path = base.path
    scheduler_config: dict[str, Any] | None
    if base.kind == "file":
        assert path is not None
        parts = load_checkpoint(path, v2=cfg.v2, v_parameterization=cfg.v_parameterization,
                                allow_pickle=cfg.allow_pickle, tokenizer=tokenizer)
        unet, vae, text_encoder, scheduler_config = parts.unet, parts.vae, parts.text_encoder, parts.scheduler_config
    else:
        if base.kind == "tiny":
            _, path = prepare_base(cfg)
        source = str(path) if path is not None else cfg.base
        unet, vae, text_encoder, own_tokenizer, scheduler_config = _load_diffusers(source, local=path is not None)
        _check_v2(_is_sd2(text_encoder.config.hidden_size, unet.config.cross_attention_dim), cfg.v2, source)
        tokenizer = tokenizer or own_tokenizer
    assert tokenizer is not None
    _check_text_parts(cfg, tokenizer, text_encoder)
    vae_hash = None
    if vae_path is not None:
        vae = _load_vae(vae_path, cfg.allow_pickle)
        vae_hash = model_hash(vae_path)
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    if path is not None:
        fingerprint = model_hash(path)
    else:
        snapshot = _cached(cfg.base, "model_index.json")
        fingerprint = model_hash(Path(snapshot).parent) if snapshot else ""
    return BaseModel(unet, vae, text_encoder, tokenizer, _scheduler(scheduler_config, cfg.v_parameterization),
                     base.model_id, path, model_hash=fingerprint, v2=cfg.v2, vae_hash=vae_hash)
