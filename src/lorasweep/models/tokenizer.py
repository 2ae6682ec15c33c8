"""An offline CLIP tokenizer for the tiny embedded model.

Why: the embedded default must run with no model hub, yet the pipeline is the real SD-1.x one, whose
tokenizer is CLIP's byte-level BPE. Rather than ship OpenAI's 49 408-entry vocabulary we *train* a tiny
BPE with CLIP's exact conventions, so every code path (``CLIPTokenizer``, padding to 77, ``</w>`` word
ends, bos/eos ids, kohya's caption handling) is exercised exactly as with a real checkpoint:

* the base alphabet is GPT-2's ``bytes_to_unicode`` map (256 printable stand-ins for all bytes), each also
  with ``</w>``, so *any* text tokenises — unknown words fall back to characters, never to ``unk``;
* merges are learned on the synthetic world's words (plus a few common ones) until each is one token, so
  ``"zorb, on the left"`` is four whole-word tokens and the LoRA's trigger word has its own embedding;
* specials ``<|startoftext|>`` and ``<|endoftext|>`` come last, pad = ``<|endoftext|>`` as SD-1.x uses,
  ``model_max_length`` 77.

The vocabulary stays ~0.7k ids, so the tiny text encoder's embedding table stays small.
"""

from __future__ import annotations

import json
from collections import Counter
from functools import cache
from itertools import pairwise
from pathlib import Path

from transformers import CLIPTokenizer

from lorasweep.data.synthetic import WORDS

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "EXTRA_WORDS",
    "MODEL_MAX_LENGTH",
    "VOCAB_WORDS",
    "build_tokenizer",
    "bytes_to_unicode",
    "learn_merges",
]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
#: SD-1.x pads and truncates prompts to 77 tokens (75 + bos + eos); the tiny model keeps that contract.
MODEL_MAX_LENGTH = 77

#: Common prompt words beyond the synthetic captions, so hand-written prompts ("a photo of an orange
#: star") stay whole-word too. ``orange`` and ``star`` are in the vocabulary but never in base-world
#: captions, so their embeddings stay untrained — the concept is reachable only through ``zorb``.
EXTRA_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "on", "in", "with", "and", "at", "background", "photo", "picture",
    "image", "shape", "orange", "star", "small", "large", "big", "style",
)  # fmt: skip

#: Every word that is a single token, in the order used for learning merges.
VOCAB_WORDS: tuple[str, ...] = tuple(dict.fromkeys((*WORDS, *EXTRA_WORDS)))

_END = "</w>"


@cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable-unicode map (the BPE's base alphabet).

    Printable latin-1 bytes map to themselves; the rest are shifted past 255 so no symbol is whitespace
    or a control character. Identical to CLIP's so ids follow CLIP's layout.
    """
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _symbols(word: str) -> list[str]:
    table = bytes_to_unicode()
    chars = [table[b] for b in word.encode("utf-8")]
    chars[-1] += _END
    return chars


def learn_merges(words: tuple[str, ...] = VOCAB_WORDS) -> list[tuple[str, str]]:
    """Learn BPE merges until every word in ``words`` is a single symbol.

    Classic BPE training (each word counted once): repeatedly merge the most frequent adjacent pair,
    ties broken by the pair's text, so the result is deterministic. Shared pieces (``"ck"`` in black,
    ``"ro"`` in cross) are merged first, which keeps encoding consistent with training.
    """
    seqs = [_symbols(w) for w in dict.fromkeys(words) if w]
    merges: list[tuple[str, str]] = []
    while True:
        counts: Counter[tuple[str, str]] = Counter()
        for seq in seqs:
            counts.update(pairwise(seq))
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        joined = best[0] + best[1]
        for i, seq in enumerate(seqs):
            out: list[str] = []
            j = 0
            while j < len(seq):
                if j + 1 < len(seq) and (seq[j], seq[j + 1]) == best:
                    out.append(joined)
                    j += 2
                else:
                    out.append(seq[j])
                    j += 1
            seqs[i] = out


def _vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's id layout: bytes, bytes + ``</w>``, merges in order, then the two specials."""
    base = list(bytes_to_unicode().values())
    tokens = base + [b + _END for b in base] + [a + b for a, b in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab


def build_tokenizer(dest: Path) -> CLIPTokenizer:
    """Write ``vocab.json``, ``merges.txt``, ``tokenizer.json`` and ``tokenizer_config.json`` into ``dest``.

    The returned tokenizer is loaded from ``dest`` (not built in memory), so what callers get is exactly
    what ``CLIPTokenizer.from_pretrained(dest)`` — and therefore a pipeline loading the folder — gets.
    The files are a pure function of :data:`VOCAB_WORDS`, byte-identical on every build.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    merges = learn_merges()
    vocab = _vocab(merges)
    (dest / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (dest / "merges.txt").write_text(merges_text, encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
    }
    (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
    (dest / "tokenizer.json").unlink(missing_ok=True)  # a stale fast-tokenizer file would take precedence
    slow_files_tokenizer = CLIPTokenizer.from_pretrained(str(dest), local_files_only=True)
    # tokenizer.json too: transformers ≥ 5 loads it directly, older versions use vocab.json + merges.txt.
    slow_files_tokenizer.backend_tokenizer.save(str(dest / "tokenizer.json"))
    tokenizer = CLIPTokenizer.from_pretrained(str(dest), local_files_only=True)
    _check(tokenizer)
    return tokenizer


def _check(tokenizer: CLIPTokenizer) -> None:
    """Fail loudly at build time if the BPE does not make every vocabulary word one token."""
    broken = [w for w in VOCAB_WORDS if len(tokenizer(w, add_special_tokens=False)["input_ids"]) != 1]
    if broken:
        raise RuntimeError(f"offline CLIP tokenizer splits words it was built for: {broken}")
