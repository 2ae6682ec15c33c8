"""The ``model`` group: which base Stable Diffusion model to train on."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from lorasweep.config._checks import check_range
from lorasweep.errors import UserError

log = logging.getLogger(__name__)

#: ``max_token_length`` choices: one, two or three 75-token CLIP windows (kohya accepts exactly these).
MAX_TOKEN_LENGTHS = (75, 150, 225)


@dataclass
class ModelConfig:
    """Base model. kohya: ``--pretrained_model_name_or_path``, ``--clip_skip``."""

    base: str = "tiny"
    """A diffusers folder, a single-file SD 1.x/2.x checkpoint in the original layout (``.safetensors``; a
    ``.ckpt`` only with ``allow_pickle``), a hub id (online, or already in the local hub cache), or ``tiny``:
    the embedded SD-1.x-architecture model built locally from fixed seeds (no download)."""

    clip_skip: int = 1
    """Use the N-th-from-last CLIP layer's output (1 = last, 2 = penultimate, with the final layer norm
    applied as kohya does). An int, not a bool."""

    cache_dir: str | None = None
    """Where built/converted models are cached. null = ``$LORASWEEP_CACHE_DIR`` or ``~/.cache/lorasweep``.
    Does not change results, only where files live."""

    vae: str | None = None
    """A replacement VAE (diffusers folder or single ``.safetensors`` file) used to encode latents and decode
    samples. kohya: ``--vae``."""

    v2: bool = False
    """The base is SD 2.x (OpenCLIP-H text encoder, 1024-dim cross-attention). kohya: ``--v2``."""

    v_parameterization: bool = False
    """The model predicts v (SD 2.x 768-v models), so the training target is v = α·ε − σ·x₀, not ε.
    kohya: ``--v_parameterization``."""

    tokenizer: str | None = None
    """A local tokenizer folder for single-file checkpoints (they carry no tokenizer); null = the
    tokenizer of the local hub cache (openai/clip-vit-large-patch14, or the SD 2 one with ``v2``)."""

    max_token_length: int = 75
    """Caption length in CLIP tokens: 75, 150 or 225. Longer than 75 is encoded in 75-token chunks whose
    hidden states are concatenated, as kohya does. Seed: ``max_clip_token_length``."""

    allow_pickle: bool = False
    """Allow a pickle checkpoint (``.ckpt``/``.pt``) as ``base`` or ``vae``. Unpickling can run any code a file
    carries, so such files are refused unless this is true; even then they are read with
    ``torch.load(weights_only=True)``, which accepts tensors and plain containers only. Prefer ``.safetensors``."""

    def validate(self, key: str = "model") -> None:
        check_range(f"{key}.clip_skip", self.clip_skip, low=1, high=12)
        if self.max_token_length not in MAX_TOKEN_LENGTHS:
            raise UserError(f"{key}.max_token_length", f"{self.max_token_length!r} is not one of "
                            f"{', '.join(map(str, MAX_TOKEN_LENGTHS))} (one, two or three 75-token CLIP windows).",
                            f"Set `{key}.max_token_length=150`, for example.")
        if self.v_parameterization and not self.v2:
            log.warning("%s.v_parameterization is true but %s.v2 is false: v-prediction SD 1.x models are rare; "
                        "check that the base model really predicts v.", key, key)
