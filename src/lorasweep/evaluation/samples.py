"""Sample images: fixed prompts × fixed seeds, so runs and steps can be compared by eye."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from lorasweep.config.sampling import SamplingConfig


@dataclass(frozen=True)
class Sample:
    prompt_index: int
    prompt: str
    seed: int
    image: Image.Image

    @property
    def file_name(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.prompt.lower()).strip("-")[:40] or "empty"
        return f"{self.prompt_index:02d}_{slug}_s{self.seed}.png"

    @property
    def key(self) -> str:
        return f"sample_p{self.prompt_index}_s{self.seed}"


@torch.no_grad()
def render_samples(cfg: SamplingConfig, *, unet: Any, vae: Any, text_encoder: Any, tokenizer: Any,
                   noise_scheduler: Any, size: tuple[int, int], clip_skip: int, max_token_length: int,
                   device: torch.device) -> list[Sample]:
    """Render with a DDIM sampler built from the training scheduler's config (deterministic, eta=0). A
    zero-terminal-SNR schedule (``training.zero_terminal_snr``) is sampled with trailing timestep spacing, so
    sampling starts at the last timestep, the pure noise it was trained on (Lin et al. 2023, as diffusers
    documents for ``rescale_betas_zero_snr``).

    The models are used as they are (LoRA active), in eval mode; their training mode is restored after.
    ``size`` is (width, height). Prompts are encoded exactly as training encodes captions (``clip_skip``,
    ``max_token_length`` chunks) and handed to the pipeline as embeddings, so a 150-token prompt is not cut
    to 77 tokens.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from lorasweep.models.text import encode_tokens, tokenize

    spacing = {"timestep_spacing": "trailing"} if noise_scheduler.config.get("rescale_betas_zero_snr") else {}
    modes = [(m, m.training) for m in (unet, text_encoder, vae)]
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler.from_config(noise_scheduler.config, **spacing),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    samples = []
    try:
        for module, _ in modes:
            module.eval()
        def embed(text: str) -> torch.Tensor:
            ids = tokenize(tokenizer, [text], max_token_length=max_token_length).to(device)
            return encode_tokens(text_encoder, ids, clip_skip, max_token_length=max_token_length)

        negative = embed(cfg.negative_prompt)
        for p_idx, prompt in enumerate(cfg.prompts):
            positive = embed(prompt)
            for seed in cfg.seeds:
                generator = torch.Generator(device=device).manual_seed(seed)
                image = pipe(prompt_embeds=positive, negative_prompt_embeds=negative, height=size[1],
                             width=size[0], num_inference_steps=cfg.num_inference_steps,
                             guidance_scale=cfg.guidance_scale, generator=generator, output_type="pil").images[0]
                samples.append(Sample(p_idx, prompt, seed, image))
    finally:
        for module, mode in modes:
            module.train(mode)
    return samples
