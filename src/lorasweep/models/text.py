"""Turn captions into the text encoder's hidden states, honouring ``clip_skip`` as kohya does."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def tokenize(tokenizer: Any, captions: Sequence[str]) -> torch.Tensor:
    """Pad/truncate to the tokenizer's 77 positions (75 tokens + BOS/EOS), as SD-1.x was trained."""
    return tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def encode_tokens(text_encoder: Any, input_ids: torch.Tensor, clip_skip: int) -> torch.Tensor:
    """Hidden states for the UNet's cross-attention.

    ``clip_skip = k`` takes the k-th-from-last layer's output and, as kohya does, applies the final layer
    norm to it (the last layer's output already has it).
    """
    if clip_skip == 1:
        return text_encoder(input_ids).last_hidden_state
    out = text_encoder(input_ids, output_hidden_states=True)
    hidden = out.hidden_states[-clip_skip]
    return _text_model(text_encoder).final_layer_norm(hidden)


def _text_model(text_encoder: Any) -> Any:
    """The inner ``CLIPTextTransformer`` (through accelerate/peft wrappers)."""
    module = getattr(text_encoder, "module", text_encoder)
    return module.text_model
