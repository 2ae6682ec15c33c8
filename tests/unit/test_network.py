"""LoRA injection, kohya export/import and LoRA file I/O on a tiny, offline SD-1.x pipeline.

The export test is the important one: it loads our kohya file with diffusers' own
``StableDiffusionPipeline.load_lora_weights`` into a fresh pipeline and requires the same UNet and
text-encoder outputs as the peft-injected model, so key naming, up/down orientation, conv shapes and the
alpha/dim scale are all checked against an independent reader.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from lorasweep.config.network import NetworkConfig
from lorasweep.errors import UserError
from lorasweep.models.tokenizer import bytes_to_unicode
from lorasweep.network.kohya import (
    load_lora_file,
    save_lora_file,
    to_kohya_state_dict,
)
from lorasweep.network.lora import (
    LoraNetwork,
    inject_lora,
    text_encoder_target_modules,
    unet_target_modules,
)

pytestmark = pytest.mark.usefixtures("single_thread")


UNET_BLOCK_KOHYA = {
    "proj_in",
    "proj_out",
    *(
        f"transformer_blocks.0.{a}.{p}"
        for a in ("attn1", "attn2")
        for p in ("to_q", "to_k", "to_v", "to_out.0")
    ),
    "transformer_blocks.0.ff.net.0.proj",
    "transformer_blocks.0.ff.net.2",
}
TE_LAYER_KOHYA = {
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "mlp.fc1",
    "mlp.fc2",
}
# The tiny UNet: down_blocks.0 (1 transformer), mid_block (1), up_blocks.1 (layers_per_block + 1 = 2).
TRANSFORMER_MODELS = [
    "down_blocks.0.attentions.0",
    "mid_block.attentions.0",
    "up_blocks.1.attentions.0",
    "up_blocks.1.attentions.1",
]


def _write_tokenizer(folder: Path) -> CLIPTokenizer:
    """A character-level CLIP tokenizer (no merges): a real CLIPTokenizer without any download."""
    folder.mkdir(parents=True)
    chars = list(bytes_to_unicode().values())
    tokens = [*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True, model_max_length=16)


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SD-1.x pipeline saved as a diffusers folder, so every test loads it like a real model."""
    root = tmp_path_factory.mktemp("tiny_sd")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
        use_linear_projection=False,  # SD-1.x: proj_in/proj_out are 1×1 convs
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64),
        norm_num_groups=32,
        latent_channels=4,
        sample_size=32,
    )
    tokenizer = _write_tokenizer(root / "tok_src")
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            vocab_size=1000,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDPMScheduler(num_train_timesteps=1000),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(root / "pipe"), safe_serialization=True)
    return root / "pipe"


def _load(pipe_dir: Path) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(
        str(pipe_dir), safety_checker=None, requires_safety_checker=False, local_files_only=True
    )


@pytest.fixture
def pipe(pipe_dir: Path) -> StableDiffusionPipeline:
    return _load(pipe_dir)


@pytest.fixture(scope="module")
def inputs(pipe_dir: Path) -> dict[str, torch.Tensor]:
    """Fixed UNet/TE inputs: the comparisons must see identical latents, timestep, conditioning, tokens."""
    g = torch.Generator().manual_seed(1234)
    tokenizer = CLIPTokenizer.from_pretrained(str(pipe_dir / "tokenizer"), local_files_only=True)
    ids = tokenizer(
        ["a photo of sks dog"], padding="max_length", max_length=16, truncation=True, return_tensors="pt"
    ).input_ids
    assert int(ids.max()) < 1000
    return {
        "latents": torch.randn(1, 4, 8, 8, generator=g),
        "timestep": torch.tensor([10]),
        "encoder_hidden_states": torch.randn(1, 7, 32, generator=g),
        "input_ids": ids,
    }


@torch.no_grad()
def _unet_out(unet: nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    return unet(x["latents"], x["timestep"], encoder_hidden_states=x["encoder_hidden_states"]).sample


@torch.no_grad()
def _te_out(text_encoder: nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    return text_encoder(x["input_ids"])[0]


@torch.no_grad()
def _randomise(net: LoraNetwork, seed: int = 7) -> None:
    """Give every LoRA tensor (A and B) seeded non-zero values, as if trained, so the update is visible."""
    g = torch.Generator().manual_seed(seed)
    for p in net.unet_params() + net.text_encoder_params():
        p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _n_lora_layers(model: nn.Module) -> int:
    return sum(isinstance(m, BaseTunerLayer) for m in model.modules())


# 1. target modules --------------------------------------------------------------------------------------


def test_target_module_names_and_counts(pipe: StableDiffusionPipeline) -> None:
    unet, te = pipe.unet, pipe.text_encoder
    kohya = unet_target_modules(unet, "kohya")
    assert len(kohya) == 12 * len(TRANSFORMER_MODELS) == 48
    for block in TRANSFORMER_MODELS:
        assert {n.removeprefix(block + ".") for n in kohya if n.startswith(block + ".")} == UNET_BLOCK_KOHYA
    attention = unet_target_modules(unet, "attention")
    assert len(attention) == 8 * len(TRANSFORMER_MODELS)
    assert all(".attn1." in n or ".attn2." in n for n in attention)
    assert set(attention) < set(kohya)
    for name in kohya:
        assert ".attentions." in name  # never the time embedding, resnets' time_emb_proj, conv_in/out
        assert "time_emb" not in name and "resnets" not in name
    assert any("time_emb_proj" in n for n, m in unet.named_modules() if isinstance(m, nn.Linear))
    assert isinstance(unet.get_submodule("down_blocks.0.attentions.0.proj_in"), nn.Conv2d)

    te_kohya = text_encoder_target_modules(te, "kohya")
    assert len(te_kohya) == 6 * 2
    layer_prefix = te_kohya[0].split("layers.0.")[0] + "layers."
    for i in range(2):
        got = {n.removeprefix(f"{layer_prefix}{i}.") for n in te_kohya if n.startswith(f"{layer_prefix}{i}.")}
        assert got == TE_LAYER_KOHYA
    te_attention = text_encoder_target_modules(te, "attention")
    assert len(te_attention) == 4 * 2 and all(".self_attn." in n for n in te_attention)
    with pytest.raises(UserError, match=r"network\.target"):
        unet_target_modules(unet, "everything")


def test_sd15_sized_counts() -> None:
    """Real SD-1.5 / CLIP ViT-L shapes (built on the meta device: no weights, no download): the default
    kohya target is exactly 264 modules, 192 UNet (16 Transformer2DModels × 12) + 72 text encoder (12 × 6),
    i.e. every Linear and 1×1 conv inside the transformer blocks and nothing else."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=64,
            cross_attention_dim=768,
            attention_head_dim=8,
            block_out_channels=(320, 640, 1280, 1280),
        )
        te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12))
    unet_kohya = unet_target_modules(unet, "kohya")
    te_kohya = text_encoder_target_modules(te, "kohya")
    assert (len(unet_kohya), len(te_kohya)) == (192, 72)
    assert len(set(unet_kohya)) == 192 and len(set(te_kohya)) == 72

    # the same set, enumerated independently: every Linear / 1×1 Conv2d below a Transformer2DModel
    expected: list[str] = []
    for name, module in unet.named_modules():
        if type(module).__name__ == "Transformer2DModel":
            expected += [f"{name}.{c}" for c, m in module.named_modules()
                         if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1))]
    assert sorted(unet_kohya) == sorted(expected)
    convs = [n for n in unet_kohya if isinstance(unet.get_submodule(n), nn.Conv2d)]
    assert len(convs) == 32 and all(n.endswith(("proj_in", "proj_out")) for n in convs)  # SD-1.x: 1×1 convs
    layers = te_kohya[0].split("layers.0.")[0] + "layers"
    assert sorted(te_kohya) == sorted(f"{layers}.{i}.{leaf}" for i in range(12) for leaf in TE_LAYER_KOHYA)
    assert all(isinstance(te.get_submodule(n), nn.Linear) for n in te_kohya)

    unet_attention = unet_target_modules(unet, "attention")
    te_attention = text_encoder_target_modules(te, "attention")
    assert (len(unet_attention), len(te_attention)) == (128, 48)  # narrower: q/k/v/out only
    assert set(unet_attention) < set(unet_kohya) and set(te_attention) < set(te_kohya)


def test_kohya_export_keys_and_conv_shapes(pipe: StableDiffusionPipeline) -> None:
    net = inject_lora(pipe.unet, pipe.text_encoder, NetworkConfig(dim=4, alpha=2), seed=0)
    sd = net.state_dict()
    assert len(sd) == 3 * (48 + 12)
    key = "lora_unet_down_blocks_0_attentions_0_proj_in"
    assert sd[f"{key}.lora_down.weight"].shape == (4, 32, 1, 1)
    assert sd[f"{key}.lora_up.weight"].shape == (32, 4, 1, 1)
    assert sd[f"{key}.alpha"].ndim == 0 and float(sd[f"{key}.alpha"]) == 2.0
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q"
    assert sd[f"{q}.lora_down.weight"].shape == (4, 32) and sd[f"{q}.lora_up.weight"].shape == (32, 4)
    # kohya spelling of the text encoder, whatever transformers' module tree looks like
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in sd
    assert "lora_te_text_model_encoder_layers_1_mlp_fc2.lora_up.weight" in sd
    assert all(t.is_contiguous() and t.dtype == torch.float32 for t in sd.values())
    net.remove()


# 2. initial identity ------------------------------------------------------------------------------------


def test_initial_lora_is_identity_then_changes_outputs(pipe: StableDiffusionPipeline, inputs: dict) -> None:
    base_unet, base_te = _unet_out(pipe.unet, inputs), _te_out(pipe.text_encoder, inputs)
    net = inject_lora(pipe.unet, pipe.text_encoder, NetworkConfig(dim=4, alpha=2), seed=0)
    assert all(float(p.detach().abs().sum()) > 0 for p in net.unet_params()[0::2])  # lora_A is initialised
    assert all(float(p.detach().abs().sum()) == 0 for p in net.unet_params()[1::2])  # lora_B is zero
    assert torch.equal(_unet_out(pipe.unet, inputs), base_unet)
    assert torch.equal(_te_out(pipe.text_encoder, inputs), base_te)
    _randomise(net)
    assert (_unet_out(pipe.unet, inputs) - base_unet).abs().max() > 1e-3
    assert (_te_out(pipe.text_encoder, inputs) - base_te).abs().max() > 1e-3
    net.remove()


def test_only_lora_is_trainable(pipe: StableDiffusionPipeline) -> None:
    net = inject_lora(pipe.unet, pipe.text_encoder, NetworkConfig(dim=4, train_text_encoder=False), seed=0)
    trainable = {id(p) for m in (pipe.unet, pipe.text_encoder) for p in m.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in net.unet_params()}
    assert len(net.unet_params()) == 2 * 48 and net.text_encoder_params() == []
    assert all(p.dtype == torch.float32 for p in net.unet_params())
    net.remove()


def test_nothing_to_train_is_user_error(pipe: StableDiffusionPipeline) -> None:
    cfg = NetworkConfig(train_unet=False, train_text_encoder=False)
    with pytest.raises(UserError, match="network"):
        inject_lora(pipe.unet, pipe.text_encoder, cfg)
    assert _n_lora_layers(pipe.unet) == 0


def test_init_is_governed_by_seed(pipe: StableDiffusionPipeline) -> None:
    def lora_a(**kwargs: int) -> list[torch.Tensor]:
        net = inject_lora(pipe.unet, pipe.text_encoder, NetworkConfig(dim=4), **kwargs)
        out = [p.detach().clone() for p in net.unet_params()[0::2] + net.text_encoder_params()[0::2]]
        net.remove()
        return out

    torch.manual_seed(3)
    first = lora_a()
    torch.manual_seed(3)
    assert all(torch.equal(a, b) for a, b in zip(first, lora_a(), strict=True))
    with_seed = lora_a(seed=11)
    assert all(torch.equal(a, b) for a, b in zip(with_seed, lora_a(seed=11), strict=True))
    assert not torch.equal(with_seed[0], lora_a(seed=12)[0])
    before = torch.random.get_rng_state()
    lora_a(seed=11)
    assert torch.equal(before, torch.random.get_rng_state())  # seed= leaves the caller's stream alone


# 3. export correctness against diffusers' own loader ----------------------------------------------------

CASES = {
    "kohya-both": NetworkConfig(dim=4, alpha=2, target="kohya"),
    "attention-both": NetworkConfig(dim=4, alpha=2, target="attention"),
    "kohya-unet-only": NetworkConfig(dim=4, alpha=2, target="kohya", train_text_encoder=False),
    "kohya-te-only": NetworkConfig(dim=4, alpha=2, target="kohya", train_unet=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_export_loads_in_diffusers_with_same_outputs(
    case: str, pipe_dir: Path, inputs: dict, tmp_path: Path
) -> None:
    cfg = CASES[case]
    trained = _load(pipe_dir)
    base_unet, base_te = _unet_out(trained.unet, inputs), _te_out(trained.text_encoder, inputs)
    net = inject_lora(trained.unet, trained.text_encoder, cfg, seed=0)
    _randomise(net)
    want_unet, want_te = _unet_out(trained.unet, inputs), _te_out(trained.text_encoder, inputs)

    tensors = to_kohya_state_dict(
        trained.unet if cfg.train_unet else None,
        trained.text_encoder if cfg.train_text_encoder else None,
        alpha=cfg.effective_alpha,
        dtype=torch.float32,
    )
    assert tensors.keys() == net.state_dict().keys()
    assert any(k.startswith("lora_unet_") for k in tensors) == cfg.train_unet
    assert any(k.startswith("lora_te_") for k in tensors) == cfg.train_text_encoder
    path = tmp_path / "lora.safetensors"
    save_lora_file(
        path, tensors, {"ss_network_dim": str(cfg.dim), "ss_network_alpha": str(cfg.effective_alpha)}
    )

    fresh = _load(pipe_dir)
    fresh.load_lora_weights(str(path))
    assert _n_lora_layers(fresh.unet) == len(net.unet_modules)
    assert _n_lora_layers(fresh.text_encoder) == len(net.text_encoder_modules)
    got_unet, got_te = _unet_out(fresh.unet, inputs), _te_out(fresh.text_encoder, inputs)
    diff_unet = float((got_unet - want_unet).abs().max())
    diff_te = float((got_te - want_te).abs().max())
    print(f"{case}: max|Δ| unet={diff_unet:.3g} te={diff_te:.3g}")
    assert diff_unet < 1e-5 and diff_te < 1e-5
    # the LoRA must actually do something where it was trained, and nothing elsewhere
    assert ((want_unet - base_unet).abs().max() > 1e-3) == cfg.train_unet
    assert ((want_te - base_te).abs().max() > 1e-3) == cfg.train_text_encoder
    net.remove()


# 4. remove / reload -------------------------------------------------------------------------------------


def test_remove_restores_base_bitwise(pipe: StableDiffusionPipeline, inputs: dict) -> None:
    models = {"unet": pipe.unet, "te": pipe.text_encoder}
    before = {k: {n: t.clone() for n, t in m.state_dict().items()} for k, m in models.items()}
    types = {k: {n: type(mod) for n, mod in m.named_modules()} for k, m in models.items()}
    grads = {k: {n: p.requires_grad for n, p in m.named_parameters()} for k, m in models.items()}
    base_out = _unet_out(pipe.unet, inputs)

    net = inject_lora(pipe.unet, pipe.text_encoder, NetworkConfig(dim=4, alpha=2), seed=0)
    _randomise(net)
    with torch.no_grad():  # a training step's worth of change that must not leak into the base
        net.unet_params()[0].add_(1.0)
    net.remove()
    net.remove()  # idempotent

    for key, model in models.items():
        after = model.state_dict()
        assert after.keys() == before[key].keys()
        assert all(torch.equal(after[n], t) for n, t in before[key].items())
        assert {n: type(mod) for n, mod in model.named_modules()} == types[key]
        assert {n: p.requires_grad for n, p in model.named_parameters()} == grads[key]
        assert "peft_config" not in vars(model)
    assert torch.equal(_unet_out(pipe.unet, inputs), base_out)
    with pytest.raises(RuntimeError, match="removed"):
        net.state_dict()
    inject_lora(pipe.unet, pipe.text_encoder, NetworkConfig(dim=2), seed=0).remove()  # base is reusable


def test_inject_twice_without_remove_is_refused(pipe: StableDiffusionPipeline) -> None:
    net = inject_lora(pipe.unet, pipe.text_encoder, NetworkConfig(dim=2), seed=0)
    with pytest.raises(RuntimeError, match="already carries LoRA"):
        inject_lora(pipe.unet, pipe.text_encoder, NetworkConfig(dim=2), seed=0)
    net.remove()


def test_load_kohya_state_dict_round_trip(
    pipe: StableDiffusionPipeline, pipe_dir: Path, tmp_path: Path
) -> None:
    cfg = NetworkConfig(dim=4, alpha=2)
    net = inject_lora(pipe.unet, pipe.text_encoder, cfg, seed=0)
    _randomise(net)
    saved = net.state_dict()
    path = tmp_path / "init.safetensors"
    save_lora_file(path, saved, {"note": "round trip"})
    tensors, metadata = load_lora_file(path)
    assert metadata == {"note": "round trip"}

    other = _load(pipe_dir)
    net2 = inject_lora(other.unet, other.text_encoder, cfg, seed=99)
    net2.load_kohya_state_dict(tensors, source=str(path))
    reloaded = net2.state_dict()
    assert reloaded.keys() == saved.keys()
    assert all(torch.equal(reloaded[k], v) for k, v in saved.items())

    net2.remove()
    fresh = _load(pipe_dir)
    wrong_alpha = inject_lora(fresh.unet, fresh.text_encoder, NetworkConfig(dim=4, alpha=4), seed=0)
    with pytest.raises(UserError, match=r"network\.alpha") as err:
        wrong_alpha.load_kohya_state_dict(tensors, source=str(path))
    assert "alpha 2" in str(err.value)
    untouched = wrong_alpha.unet_params()[1]
    assert float(untouched.detach().abs().sum()) == 0  # a refused file writes nothing
    wrong_alpha.remove()

    wrong_dim = inject_lora(fresh.unet, fresh.text_encoder, NetworkConfig(dim=8, alpha=2), seed=0)
    with pytest.raises(UserError, match=r"network\.dim"):
        wrong_dim.load_kohya_state_dict(tensors)
    wrong_dim.remove()

    unet_only = inject_lora(
        fresh.unet, fresh.text_encoder, NetworkConfig(dim=4, alpha=2, train_text_encoder=False)
    )
    with pytest.raises(UserError, match="does not adapt"):
        unet_only.load_kohya_state_dict(tensors)
    unet_only.remove()


# 5. file I/O --------------------------------------------------------------------------------------------


def test_save_lora_file_is_atomic_and_refuses_overwrite(
    pipe: StableDiffusionPipeline, tmp_path: Path
) -> None:
    net = inject_lora(pipe.unet, pipe.text_encoder, NetworkConfig(dim=4, alpha=0.1), seed=0)
    path = tmp_path / "out" / "lora.safetensors"
    save_lora_file(path, net.state_dict(dtype=torch.float16), {"ss_network_dim": "4"})
    assert sorted(p.name for p in path.parent.iterdir()) == ["lora.safetensors"]  # no temp file left

    size = path.stat().st_size
    with pytest.raises(UserError, match="already exists") as err:
        save_lora_file(path, net.state_dict(), None)
    assert str(path) in str(err.value)
    assert path.stat().st_size == size
    assert sorted(p.name for p in path.parent.iterdir()) == ["lora.safetensors"]

    tensors, _ = load_lora_file(path)
    assert all(t.dtype == torch.float16 for t in tensors.values())
    bf16 = net.state_dict(dtype="bf16")
    assert all(t.dtype == torch.bfloat16 for t in bf16.values())

    # an fp16 file stores alpha 0.1 rounded; it must still be accepted for network.alpha=0.1
    net.load_kohya_state_dict(tensors)
    with pytest.raises(TypeError, match="str"):
        save_lora_file(tmp_path / "x.safetensors", net.state_dict(), {"ss_network_dim": 4})  # type: ignore[dict-item]
    assert not (tmp_path / "x.safetensors").exists()
    net.remove()


def test_load_lora_file_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such LoRA file"):
        load_lora_file(tmp_path / "missing.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(UserError, match="not a readable safetensors"):
        load_lora_file(corrupt)


def test_alpha_scales_the_update_by_alpha_over_dim(pipe: StableDiffusionPipeline, inputs: dict) -> None:
    """kohya's network_alpha: the same down/up weights change a layer's output by (alpha/dim)·up·down·x, so
    alpha = dim/2 gives exactly half the update of alpha = dim, and the saved ``.alpha`` says so."""
    proj = "down_blocks.0.attentions.0.proj_in"
    x = torch.randn(1, pipe.unet.get_submodule(proj).in_channels, 4, 4, generator=torch.Generator().manual_seed(0))
    deltas = {}
    for alpha in (4.0, 2.0):
        net = inject_lora(pipe.unet, pipe.text_encoder, NetworkConfig(dim=4, alpha=alpha), seed=0)
        _randomise(net)
        layer = pipe.unet.get_submodule(proj)
        with torch.no_grad():
            deltas[alpha] = layer(x) - layer.get_base_layer()(x)
        saved = net.state_dict()
        assert float(saved["lora_unet_" + proj.replace(".", "_") + ".alpha"]) == alpha
        net.remove()
    torch.testing.assert_close(deltas[2.0], deltas[4.0] / 2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("cfg", "prefixes"), [
    (NetworkConfig(dim=4, train_text_encoder=False), {"lora_unet_"}),  # seed: unet_only
    (NetworkConfig(dim=4, train_unet=False), {"lora_te_"}),  # seed: text_only
    (NetworkConfig(dim=4), {"lora_unet_", "lora_te_"}),
])
def test_unet_only_and_text_only_decide_what_is_trained_and_saved(pipe: StableDiffusionPipeline,
                                                                  cfg: NetworkConfig, prefixes: set[str]) -> None:
    net = inject_lora(pipe.unet, pipe.text_encoder, cfg, seed=0)
    trainable = {id(p) for m in (pipe.unet, pipe.text_encoder) for p in m.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in net.unet_params() + net.text_encoder_params()}
    assert bool(net.unet_params()) == cfg.train_unet
    assert bool(net.text_encoder_params()) == cfg.train_text_encoder
    saved = {key.split("_", 2)[0] + "_" + key.split("_", 2)[1] + "_" for key in net.state_dict()}
    assert saved == prefixes
    net.remove()
