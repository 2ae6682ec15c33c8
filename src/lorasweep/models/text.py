"""Turn captions into the text encoder's hidden states, honouring ``clip_skip`` and long captions as kohya does.

CLIP sees 77 positions (BOS, 75 tokens, EOS). ``model.max_token_length`` 150 or 225 (kohya's
``--max_token_length``) lets a caption run to 150/225 tokens: it is tokenized to ``max_token_length + 2``
ids, cut into 75-token chunks that each get their own BOS/EOS (77 ids), every chunk is encoded on its own,
and the chunks' hidden states are joined keeping the first chunk's BOS, every chunk's 75 token positions
and the last chunk's EOS: 1 + 75·n + 1 = 77 / 152 / 227 positions for the UNet's cross-attention.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from lorasweep.config.model import MAX_TOKEN_LENGTHS

__all__ = ["MAX_TOKEN_LENGTHS", "CaptionTokens", "encode_tokens", "tokenize"]


def tokenize(tokenizer: Any, captions: Sequence[str], max_token_length: int = 75) -> torch.Tensor:
    """Token ids: ``(batch, 77)`` for 75 tokens, ``(batch, n, 77)`` chunks for 150 (n = 2) or 225 (n = 3).

    75 pads/truncates to the tokenizer's 77 positions, as SD was trained. For longer captions each chunk is
    BOS + 75 ids + the last id of the long tokenization (EOS, or padding). Where padding is not EOS (the SD 2
    tokenizer pads with ``!``), kohya's two fixes apply: a chunk whose 75 ids are all text ends in EOS, and
    an all-padding chunk starts with EOS, so every chunk reads as a caption to CLIP.
    """
    window = tokenizer.model_max_length  # 77
    body = window - 2
    if max_token_length == body:
        return tokenizer(list(captions), padding="max_length", max_length=window, truncation=True,
                         return_tensors="pt").input_ids
    if max_token_length % body or not body < max_token_length <= 3 * body:
        raise ValueError(f"max_token_length must be one of {MAX_TOKEN_LENGTHS}, got {max_token_length}")
    ids = tokenizer(list(captions), padding="max_length", max_length=max_token_length + 2, truncation=True,
                    return_tensors="pt").input_ids
    bos, last = ids[:, :1], ids[:, -1:]
    chunks = torch.stack([torch.cat([bos, ids[:, 1 + k * body: 1 + (k + 1) * body], last], dim=1)
                          for k in range(max_token_length // body)], dim=1)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if pad != eos:
        text_to_the_end = (chunks[:, :, -2] != eos) & (chunks[:, :, -2] != pad)
        chunks[:, :, -1] = torch.where(text_to_the_end, eos, chunks[:, :, -1])
        empty = chunks[:, :, 1] == pad
        chunks[:, :, 1] = torch.where(empty, eos, chunks[:, :, 1])
    return chunks


class CaptionTokens:
    """:func:`tokenize` with a bounded memo per caption, for the training loop.

    A data set has few distinct captions (a few hundred), but the loop asks for each one every epoch;
    the tokenizer's Python work is ≈1 ms a batch, a few per cent of a small model's step. Each caption is
    tokenized alone, which gives the same ids as in a batch (every row is padded to the same fixed length).
    Shuffled or dropped-out captions are mostly new strings, so the memo is bounded (least recently used).
    """

    def __init__(self, tokenizer: Any, max_token_length: int = 75, maxsize: int = 8192) -> None:
        self.tokenizer = tokenizer
        self.max_token_length = max_token_length
        self.maxsize = maxsize
        self._ids: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        missing = list(dict.fromkeys(c for c in captions if c not in self._ids))
        if missing:
            for caption, ids in zip(missing, tokenize(self.tokenizer, missing, self.max_token_length), strict=True):
                self._ids[caption] = ids
        rows = []
        for caption in captions:
            self._ids.move_to_end(caption)
            rows.append(self._ids[caption])
        while len(self._ids) > self.maxsize:
            self._ids.popitem(last=False)
        return torch.stack(rows)


def encode_tokens(text_encoder: Any, input_ids: torch.Tensor, clip_skip: int,
                  max_token_length: int | None = None) -> torch.Tensor:
    """Hidden states for the UNet's cross-attention: ``(batch, 77 | 152 | 227, width)``.

    ``input_ids`` is what :func:`tokenize` returned; its shape says how many chunks there are, so
    ``max_token_length`` is optional and, when given, only checked against it.
    ``clip_skip = k`` takes the k-th-from-last layer's output and, as kohya does, applies the final layer
    norm to it (the last layer's output already has it).
    """
    if input_ids.ndim == 2:
        if max_token_length not in (None, input_ids.shape[1] - 2):
            raise ValueError(f"ids of {input_ids.shape[1]} positions do not hold {max_token_length} tokens")
        return _encode(text_encoder, input_ids, clip_skip)
    batch, n_chunks, window = input_ids.shape
    if max_token_length not in (None, n_chunks * (window - 2)):
        raise ValueError(f"{n_chunks} chunks of {window} do not hold {max_token_length} tokens")
    states = _encode(text_encoder, input_ids.reshape(batch * n_chunks, window), clip_skip)
    states = states.reshape(batch, n_chunks * window, states.shape[-1])
    # kohya's v2 branch differs only in a step that compares ids with the EOS *string* and so never runs.
    parts = [states[:, :1]]
    parts += [states[:, k * window + 1: (k + 1) * window - 1] for k in range(n_chunks)]
    parts.append(states[:, -1:])
    return torch.cat(parts, dim=1)


def _encode(text_encoder: Any, input_ids: torch.Tensor, clip_skip: int) -> torch.Tensor:
    if clip_skip == 1:
        return text_encoder(input_ids).last_hidden_state
    out = text_encoder(input_ids, output_hidden_states=True)
    hidden = out.hidden_states[-clip_skip]
    return _text_model(text_encoder).final_layer_norm(hidden)


def _text_model(text_encoder: Any) -> Any:
    """The module that owns ``final_layer_norm`` (through accelerate/DDP wrappers): the inner
    ``CLIPTextTransformer`` in transformers 4, the ``CLIPTextModel`` itself in transformers ≥ 5."""
    module = getattr(text_encoder, "module", text_encoder)
    return getattr(module, "text_model", module)
