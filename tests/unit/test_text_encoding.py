"""Caption → hidden states: kohya's 75/150/225-token chunking and clip_skip, on the tiny model's real tokenizer."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers imports huggingface_hub

from pathlib import Path

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from lorasweep.data.synthetic import WORDS
from lorasweep.models.text import CaptionTokens, encode_tokens, tokenize
from lorasweep.models.tokenizer import build_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")


SHORT = "zorb, on the left, blue background"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(tok_dir: Path) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)


@pytest.fixture(scope="module")
def v2_tokenizer(tok_dir: Path) -> CLIPTokenizer:
    """The same vocabulary padded with ``!`` instead of EOS, as SD 2's tokenizer pads."""
    tok = CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True, pad_token="!")
    assert tok.pad_token_id != tok.eos_token_id
    return tok


@pytest.fixture(scope="module")
def text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                            num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return CLIPTextModel(config).eval()


def words(n: int) -> str:
    """A caption of exactly ``n`` tokens (every synthetic-world word is one token)."""
    vocab = sorted(WORDS)
    return " ".join(vocab[i % len(vocab)] for i in range(n))


def test_75_pads_to_77_as_before(tokenizer: CLIPTokenizer) -> None:
    ids = tokenize(tokenizer, [SHORT, words(200)])
    expected = tokenizer([SHORT, words(200)], padding="max_length", max_length=77, truncation=True,
                         return_tensors="pt").input_ids
    assert ids.shape == (2, 77)
    assert torch.equal(ids, expected)
    assert ids[1, -1] == tokenizer.eos_token_id  # truncated, still ends in EOS


def test_150_and_225_chunk_the_long_tokenization(tokenizer: CLIPTokenizer) -> None:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    long = tokenizer(words(120), add_special_tokens=False).input_ids
    assert len(long) == 120
    ids = tokenize(tokenizer, [words(120), SHORT], max_token_length=150)
    assert ids.shape == (2, 2, 77)
    assert (ids[:, :, 0] == bos).all() and (ids[:, :, -1] == eos).all()  # every chunk is BOS … EOS
    assert ids[0, 0, 1:76].tolist() == long[:75]
    assert ids[0, 1, 1:46].tolist() == long[75:120] and ids[0, 1, 46] == eos
    # A short caption's first chunk is exactly its 75-token tokenization; the second chunk is empty.
    assert torch.equal(ids[1, 0], tokenize(tokenizer, [SHORT])[0])
    assert (ids[1, 1, 1:] == eos).all()

    ids = tokenize(tokenizer, [words(300)], max_token_length=225)
    long = tokenizer(words(300), add_special_tokens=False).input_ids
    assert ids.shape == (1, 3, 77)
    assert [ids[0, k, 1:76].tolist() for k in range(3)] == [long[:75], long[75:150], long[150:225]]
    assert ids[0, 2, -1] == eos  # truncated after 225 tokens, the last chunk still ends in EOS


def test_v2_padding_rules(v2_tokenizer: CLIPTokenizer) -> None:
    """SD 2 pads with ``!``: a chunk full of text ends in EOS, an empty chunk starts with EOS (kohya)."""
    tok = v2_tokenizer
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    ids = tokenize(tok, [words(100), "red circle"], max_token_length=150)
    long = tok(words(100), add_special_tokens=False).input_ids
    assert ids[0, 0].tolist() == [bos, *long[:75], eos]  # the long tokenization's last id here is padding
    assert ids[0, 1].tolist() == [bos, *long[75:100], eos] + [pad] * 50
    short = tok("red circle", add_special_tokens=False).input_ids
    assert ids[1, 0].tolist() == [bos, *short, eos] + [pad] * 73
    assert ids[1, 1].tolist() == [bos, eos] + [pad] * 75


def test_bad_lengths_are_refused(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel) -> None:
    with pytest.raises(ValueError, match="max_token_length"):
        tokenize(tokenizer, [SHORT], max_token_length=100)
    ids = tokenize(tokenizer, [SHORT], max_token_length=150)
    with pytest.raises(ValueError, match="225"):
        encode_tokens(text_encoder, ids, 1, max_token_length=225)


@torch.no_grad()
def test_long_encoding_follows_kohya(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel) -> None:
    captions = [SHORT, words(140)]
    ids75 = tokenize(tokenizer, captions)
    ids150 = tokenize(tokenizer, captions, max_token_length=150)
    states75 = encode_tokens(text_encoder, ids75, 1)
    states150 = encode_tokens(text_encoder, ids150, 1, max_token_length=150)
    assert states75.shape == (2, 77, 32)
    assert states150.shape == (2, 152, 32)
    # BOS + 75 positions of chunk 1, 75 of chunk 2, chunk 2's EOS: each chunk encoded on its own.
    chunk = [text_encoder(ids150[:, k]).last_hidden_state for k in range(2)]
    expected = torch.cat([chunk[0][:, :76], chunk[1][:, 1:76], chunk[1][:, 76:]], dim=1)
    torch.testing.assert_close(states150, expected, rtol=0, atol=1e-6)
    # BOS and the first 75 tokens read the same ids as the 75-token encoding (CLIP attends causally, so
    # what follows cannot change them), for the short and for the long caption.
    torch.testing.assert_close(states150[:, :76], states75[:, :76], rtol=0, atol=1e-6)
    # Position 76: the long caption's 76th token (from chunk 2) where the 75-token encoding has its EOS.
    assert not torch.allclose(states150[1, 76], states75[1, 76])
    states225 = encode_tokens(text_encoder, tokenize(tokenizer, captions, max_token_length=225), 2)
    assert states225.shape == (2, 227, 32)


@torch.no_grad()
def test_clip_skip_is_penultimate_layer_plus_final_norm(tokenizer: CLIPTokenizer,
                                                        text_encoder: CLIPTextModel) -> None:
    ids = tokenize(tokenizer, [SHORT, words(30)])
    out = text_encoder(ids, output_hidden_states=True)
    final_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm  # transformers 4 / ≥ 5
    torch.testing.assert_close(encode_tokens(text_encoder, ids, 2), final_norm(out.hidden_states[-2]),
                               rtol=0, atol=0)
    torch.testing.assert_close(encode_tokens(text_encoder, ids, 1), out.last_hidden_state, rtol=0, atol=0)
    assert not torch.allclose(encode_tokens(text_encoder, ids, 2), out.last_hidden_state)
    # Chunked ids take the same layer from every chunk.
    ids150 = tokenize(tokenizer, [SHORT], max_token_length=150)
    first = final_norm(text_encoder(ids150[:, 0], output_hidden_states=True).hidden_states[-2])
    torch.testing.assert_close(encode_tokens(text_encoder, ids150, 2)[:, :76], first[:, :76], rtol=0, atol=1e-6)



class CountingTokenizer:
    """The tokenizer, recording how many captions each call tokenizes."""

    def __init__(self, tokenizer: CLIPTokenizer) -> None:
        self.tokenizer = tokenizer
        self.calls: list[int] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self.tokenizer, name)

    def __call__(self, texts: list[str], **kwargs: object) -> object:
        self.calls.append(len(texts))
        return self.tokenizer(texts, **kwargs)


@pytest.mark.parametrize("length", [75, 150])
def test_caption_tokens_equal_batch_tokenization_and_tokenize_each_caption_once(
        tokenizer: CLIPTokenizer, length: int) -> None:
    captions = [SHORT, words(140), SHORT, "", words(20)]
    counting = CountingTokenizer(tokenizer)
    memo = CaptionTokens(counting, length)
    assert torch.equal(memo(captions), tokenize(tokenizer, captions, length))
    assert counting.calls == [4]  # the repeated caption once
    assert torch.equal(memo(list(reversed(captions))), tokenize(tokenizer, list(reversed(captions)), length))
    assert counting.calls == [4]  # all known: no tokenizer call


def test_caption_tokens_memo_is_bounded_least_recently_used(tokenizer: CLIPTokenizer) -> None:
    counting = CountingTokenizer(tokenizer)
    memo = CaptionTokens(counting, 75, maxsize=2)
    for caption in ["a zorb", "blue", "a zorb", "red"]:  # "red" evicts "blue", the least recently used
        memo([caption])
    assert counting.calls == [1, 1, 1]
    memo(["a zorb"])
    assert counting.calls == [1, 1, 1]
    assert torch.equal(memo(["blue"]), tokenize(tokenizer, ["blue"]))
    assert counting.calls == [1, 1, 1, 1]
