"""Network variants (issue 8): LoCon (conv_dim), LoHa, LoKr, DoRA, rank/module dropout and LoRA+.

On the untrained tiny SD-1.x model:

* each variant adapts the right modules and saves the kohya/LyCORIS keys A1111/ComfyUI read, with the right
  counts; it starts as the identity, and ``remove()`` gives the base back bitwise;
* the update each module applies equals the readers' formula computed by hand from the saved tensors
  (LoRA/LoCon, LoHa ⊙, LoKr ⊗ with its alpha rule, DoRA's magnitude / row norm), so files mean what we trained;
* save → ``init_weights`` into a fresh injection reproduces tensors and outputs; diffusers loads LoCon with our
  outputs; files of another variant are refused naming the key to change, by the loader and by the
  header-only preflight;
* rank and module dropout follow kohya's statistics, train mode only, reproducible from the seed, and
  gradient checkpointing replays the same masks;
* LoRA+ puts the up matrices in their own groups at lr × ratio;
* every bad value or combination is a ``UserError`` naming its key.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.utils.checkpoint import checkpoint

from lorasweep.app import compose_config
from lorasweep.config import to_train_config
from lorasweep.config.network import NetworkConfig
from lorasweep.config.optimizer import OptimizerConfig
from lorasweep.config.scheduler import SchedulerConfig
from lorasweep.config.train import TrainConfig
from lorasweep.errors import UserError
from lorasweep.network.kohya import check_lora_header, load_lora_file, save_lora
from lorasweep.network.lora import LoraNetwork, init_from_file, inject_lora, unet_target_modules
from lorasweep.network.metadata import TrainingFacts, kohya_metadata
from lorasweep.training.optim import build_lr_scheduler, build_optimizer, effective_learning_rates

pytestmark = pytest.mark.usefixtures("single_thread")

DIM, ALPHA = 4, 2.0
LINEAR = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"  # Linear 32 → 32
CONV = "down_blocks.1.resnets.0.conv1"  # 3×3 conv 32 → 64
SHORTCUT = "down_blocks.1.resnets.0.conv_shortcut"  # 1×1 conv: network dim/alpha, not conv_dim
VARIANTS: dict[str, dict[str, object]] = {
    "locon": {"conv_dim": 2, "conv_alpha": 1.0},
    "dora": {"dora": True, "conv_dim": 4},
    "loha": {"algo": "loha", "conv_dim": 2},
    "lokr": {"algo": "lokr", "conv_dim": 2},
    "lokr_factor": {"algo": "lokr", "lokr_factor": 2},
}
LEAVES = {
    "locon": {"lora_down.weight", "lora_up.weight", "alpha"},
    "dora": {"lora_down.weight", "lora_up.weight", "dora_scale", "alpha"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
}


def _cfg(variant: str, **extra: object) -> NetworkConfig:
    return NetworkConfig(**{"dim": DIM, "alpha": ALPHA, **VARIANTS[variant], **extra})  # type: ignore[arg-type]


def _load(folder: Path) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False,
                                                   local_files_only=True)


@pytest.fixture(scope="module")
def pipe(untrained_tiny: Path) -> StableDiffusionPipeline:
    return _load(untrained_tiny)


@pytest.fixture(scope="module")
def inputs(pipe: StableDiffusionPipeline) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    size = pipe.unet.config.sample_size
    return {"latents": torch.randn(2, 4, size, size, generator=g), "timestep": torch.tensor([30, 600]),
            "context": torch.randn(2, 5, pipe.unet.config.cross_attention_dim, generator=g),
            "input_ids": torch.randint(0, 90, (2, pipe.tokenizer.model_max_length), generator=g)}


@torch.no_grad()
def _outputs(pipe: StableDiffusionPipeline, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return (pipe.unet(x["latents"], x["timestep"], encoder_hidden_states=x["context"]).sample,
            pipe.text_encoder(x["input_ids"])[0])


def _max_diff(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(a, b, strict=True))


@torch.no_grad()
def _randomise(net: LoraNetwork, seed: int = 3, scale: float = 0.1) -> None:
    """Trained-looking adapters: every tensor nudged (the zero-initialised factors become non-zero)."""
    g = torch.Generator().manual_seed(seed)
    for p in net.unet_params() + net.text_encoder_params():
        p.add_(torch.randn(p.shape, generator=g) * scale)


def _facts() -> TrainingFacts:
    return TrainingFacts(model_id="tiny", num_train_images=4, num_batches_per_epoch=1, num_epochs=1, epoch=1,
                         max_train_steps=1, warmup_steps=0, started_at=1.0, tag_frequency={},
                         dataset_dirs={"1_x": {"n_repeats": 1, "img_count": 4}})


# 1. modules, keys, identity, remove ----------------------------------------------------------------------


def test_locon_targets_kohyas_resnet_and_sampler_modules(pipe: StableDiffusionPipeline) -> None:
    plain, conv = unet_target_modules(pipe.unet, "kohya"), unet_target_modules(pipe.unet, "kohya", conv=True)
    extra = [n for n in conv if n not in plain]
    assert [n for n in conv if n in set(plain)] == plain  # module order, the transformer modules unchanged
    assert len(extra) == 31  # 8 resnets × (conv1, conv2, time_emb_proj) + 5 conv_shortcuts + 2 samplers
    assert sum(n.endswith("conv_shortcut") for n in extra) == 5
    assert sorted(n for n in extra if "samplers" in n) == ["down_blocks.0.downsamplers.0.conv",
                                                           "up_blocks.0.upsamplers.0.conv"]
    with torch.device("meta"):  # SD-1.5 shapes: kohya's "create LoRA for U-Net: 278 modules" with conv_dim
        sd15 = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                    block_out_channels=(320, 640, 1280, 1280))
    assert len(unet_target_modules(sd15, "kohya", conv=True)) == 278


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_keys_identity_and_remove(variant: str, pipe: StableDiffusionPipeline, inputs: dict) -> None:
    models = {"unet": pipe.unet, "te": pipe.text_encoder}
    before = {k: {n: t.clone() for n, t in m.state_dict().items()} for k, m in models.items()}
    grads = {k: {n: p.requires_grad for n, p in m.named_parameters()} for k, m in models.items()}
    base = _outputs(pipe, inputs)

    cfg = _cfg(variant)
    net = inject_lora(pipe.unet, pipe.text_encoder, cfg, seed=0)
    n_unet = 79 if cfg.conv_dim else 48
    assert (len(net.unet_modules), len(net.text_encoder_modules)) == (n_unet, 12)
    assert _max_diff(_outputs(pipe, inputs), base) == 0.0  # untrained = identity
    sd = net.state_dict()
    modules = {k.split(".")[0] for k in sd}
    assert len(modules) == n_unet + 12
    leaves = {k.split(".", 1)[1] for k in sd}
    if variant in LEAVES:
        assert leaves == LEAVES[variant] and len(sd) == len(LEAVES[variant]) * len(modules)
    else:  # LoKr: w1 always full; w2 full or low-rank depending on the split
        assert {"lokr_w1", "alpha"} <= leaves <= {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"}
    lin, conv = "lora_unet_" + LINEAR.replace(".", "_"), "lora_unet_" + CONV.replace(".", "_")
    if variant in ("locon", "dora"):
        assert sd[f"{conv}.lora_down.weight"].shape == (cfg.conv_dim, 32, 3, 3)  # kohya's LoCon layout
        assert sd[f"{conv}.lora_up.weight"].shape == (64, cfg.conv_dim, 1, 1)
        assert sd[f"{lin}.lora_down.weight"].shape == (DIM, 32)
        shortcut = "lora_unet_" + SHORTCUT.replace(".", "_")
        assert sd[f"{shortcut}.lora_down.weight"].shape == (DIM, 32, 1, 1)  # 1×1: network dim
        conv_alpha = 1.0 if variant == "locon" else 4 * ALPHA / DIM  # null = the linear modules' scale
        assert float(sd[f"{conv}.alpha"]) == conv_alpha and float(sd[f"{lin}.alpha"]) == ALPHA
    if variant == "dora":
        assert sd[f"{lin}.dora_scale"].shape == (32, 1) and sd[f"{conv}.dora_scale"].shape == (64, 1, 1, 1)
        w = pipe.unet.get_submodule(LINEAR).get_base_layer().weight
        assert torch.allclose(sd[f"{lin}.dora_scale"][:, 0], w.norm(dim=1))  # starts at the row norms
    if variant == "loha":
        assert sd[f"{lin}.hada_w1_a"].shape == (32, DIM) and sd[f"{lin}.hada_w1_b"].shape == (DIM, 32)
        assert sd[f"{conv}.hada_w2_b"].shape == (2, 32 * 9)  # LyCORIS's flattened (non-Tucker) conv layout
    if variant == "lokr":  # 32 = 4 × 8, rank 4 ≥ 8/2: both factors full, so no rank and alpha = r (scale 1)
        assert sd[f"{lin}.lokr_w1"].shape == (4, 4) and sd[f"{lin}.lokr_w2"].shape == (8, 8)
        assert float(sd[f"{lin}.alpha"]) == DIM and pipe.unet.get_submodule(LINEAR).scaling[net.adapter_name] == 1
    if variant == "lokr_factor":  # 32 = 2 × 16, rank 4 < 16/2: w2 is a rank-4 product, scale alpha/r
        assert sd[f"{lin}.lokr_w1"].shape == (2, 2) and sd[f"{lin}.lokr_w2_a"].shape == (16, DIM)
        assert float(sd[f"{lin}.alpha"]) == ALPHA

    _randomise(net)
    assert _max_diff(_outputs(pipe, inputs), base) > 1e-3
    net.remove()
    for key, model in models.items():
        assert all(torch.equal(model.state_dict()[n], t) for n, t in before[key].items())
        assert model.state_dict().keys() == before[key].keys()
        assert {n: p.requires_grad for n, p in model.named_parameters()} == grads[key]
        assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
    assert _max_diff(_outputs(pipe, inputs), base) == 0.0


# 2. what a saved module means: the readers' formulas by hand -------------------------------------------------


def _module_tensors(sd: dict[str, torch.Tensor], module: str) -> dict[str, torch.Tensor]:
    key = "lora_unet_" + module.replace(".", "_") + "."
    return {k.removeprefix(key): v for k, v in sd.items() if k.startswith(key)}


def _delta(t: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """ΔW as A1111/ComfyUI/LyCORIS compute it from a module's saved tensors (before DoRA's normalisation)."""
    if "lora_down.weight" in t:
        down, up = t["lora_down.weight"], t["lora_up.weight"]
        r = down.shape[0]
        return (up.reshape(up.shape[0], r) @ down.reshape(r, -1)).reshape(shape) * float(t["alpha"]) / r
    if "hada_w1_a" in t:
        r = t["hada_w1_b"].shape[0]
        product = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
        return product.reshape(shape) * float(t["alpha"]) / r
    w1 = t["lokr_w1"]
    if "lokr_w2" in t:
        w2, scale = t["lokr_w2"], 1.0  # both factors full: no rank, alpha ignored
    else:
        w2, scale = t["lokr_w2_a"] @ t["lokr_w2_b"], float(t["alpha"]) / t["lokr_w2_b"].shape[0]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2).reshape(shape) * scale


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_saved_tensors_reproduce_each_modules_update(variant: str, pipe: StableDiffusionPipeline) -> None:
    net = inject_lora(pipe.unet, pipe.text_encoder, _cfg(variant, train_text_encoder=False), seed=0)
    _randomise(net, scale=0.3)
    sd = net.state_dict()
    g = torch.Generator().manual_seed(1)
    for name in (LINEAR, CONV) if variant != "lokr_factor" else (LINEAR,):
        layer = pipe.unet.get_submodule(name)
        base = layer.get_base_layer()
        t = _module_tensors(sd, name)
        weight = base.weight + _delta(t, base.weight.shape)
        if "dora_scale" in t:  # m · (W + ΔW) / ‖W + ΔW‖ per output channel
            norm = weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(t["dora_scale"].shape)
            weight = t["dora_scale"] * weight / norm
        with torch.no_grad():
            if isinstance(base, nn.Conv2d):
                x = torch.randn(2, base.in_channels, 6, 6, generator=g)
                want = F.conv2d(x, weight, base.bias, base.stride, base.padding)
            else:
                x = torch.randn(3, 7, base.in_features, generator=g)
                want = F.linear(x, weight, base.bias)
            got, plain = layer(x), base(x)
        assert float((got - plain).abs().max()) > 1e-2  # the update is substantial
        assert torch.allclose(got, want, atol=2e-5, rtol=1e-4), f"{variant} {name}: {(got - want).abs().max()}"
    net.remove()


# 3. files: our loader, metadata, diffusers, refusals -----------------------------------------------------


def test_round_trip_metadata_and_refusals(pipe: StableDiffusionPipeline, untrained_tiny: Path, inputs: dict,
                                          tmp_path: Path) -> None:
    files: dict[str, Path] = {}
    for variant in VARIANTS:
        cfg = TrainConfig()
        cfg.network = _cfg(variant)
        net = inject_lora(pipe.unet, pipe.text_encoder, cfg.network, seed=0)
        _randomise(net)
        want, tensors = _outputs(pipe, inputs), net.state_dict()
        files[variant] = save_lora(tmp_path / variant, tensors, kohya_metadata(cfg, _facts()))
        net.remove()

        again = inject_lora(pipe.unet, pipe.text_encoder, cfg.network, seed=123)
        meta = init_from_file(again, files[variant])
        reloaded = again.state_dict()
        assert reloaded.keys() == tensors.keys() and all(torch.equal(reloaded[k], v) for k, v in tensors.items())
        assert _max_diff(_outputs(pipe, inputs), want) == 0.0
        again.remove()
        args = json.loads(meta["ss_network_args"])
        if variant == "locon":
            assert meta["ss_network_module"] == "networks.lora" and args == {"conv_dim": "2", "conv_alpha": "1.0"}
        else:
            assert meta["ss_network_module"] == "lycoris.kohya"
            assert args["algo"] == cfg.network.algo and args.get("dora_wd") == ("True" if cfg.network.dora else None)
        if variant == "lokr_factor":
            assert args == {"algo": "lokr", "preset": "attn-mlp", "factor": "2"}

    def refused(cfg: NetworkConfig, variant: str, key: str, text: str) -> None:
        net = inject_lora(pipe.unet, pipe.text_encoder, cfg, seed=0)
        try:
            with pytest.raises(UserError, match=text) as err:
                init_from_file(net, files[variant])
            assert err.value.where == key
        finally:
            net.remove()

    refused(_cfg("locon", conv_dim=None), "locon", files["locon"].as_posix(), "does not adapt")
    refused(_cfg("locon", conv_dim=4), "locon", "network.conv_dim", "has rank 2")
    refused(_cfg("locon", conv_alpha=2.0), "locon", "network.conv_alpha", "alpha 1")
    refused(_cfg("locon"), "loha", "network.algo", "holds a LoHa")
    refused(_cfg("dora", dora=False), "dora", "network.dora", "has a DoRA magnitude")
    refused(_cfg("locon", dora=True, conv_alpha=None), "locon", "network.dora", "has no DoRA magnitude")
    refused(_cfg("lokr_factor", lokr_factor=-1), "lokr_factor", files["lokr_factor"].as_posix(), "lokr_factor")

    # the header-only preflight (job's check of network.init_weights) accepts each file with its own config
    for variant, path in files.items():
        check_lora_header(path, _cfg(variant))
    for cfg, variant, text in (
        (_cfg("locon", conv_dim=None), "locon", r"3×3 conv \(LoCon\) rank 2, but network.conv_dim is null"),
        (_cfg("locon", dim=8), "locon", "has rank 4, but network.dim is 8"),
        (_cfg("lokr_factor", dim=2), "lokr_factor", "has rank 4, but network.dim is 2"),
        (_cfg("locon"), "loha", "holds a LoHa, but network.algo is lora"),
        (_cfg("dora", dora=False), "dora", "is a DoRA"),
    ):
        with pytest.raises(UserError, match=text) as err:
            check_lora_header(files[variant], cfg)
        assert err.value.where == "network.init_weights"

    # diffusers reads LoCon (kohya keys with 3×3 down/up convs) with our outputs
    cfg = _cfg("locon")
    net = inject_lora(pipe.unet, pipe.text_encoder, cfg, seed=0)
    init_from_file(net, files["locon"])
    want = _outputs(pipe, inputs)
    net.remove()
    fresh = _load(untrained_tiny)
    fresh.load_lora_weights(str(files["locon"]))
    assert _max_diff(_outputs(fresh, inputs), want) < 1e-5
    tensors, _ = load_lora_file(files["locon"])
    assert sum(k.endswith("conv1.lora_down.weight") for k in tensors) == 8


# 4. rank and module dropout --------------------------------------------------------------------------------


def test_rank_and_module_dropout(pipe: StableDiffusionPipeline) -> None:
    cfg = NetworkConfig(dim=8, alpha=8, rank_dropout=0.3, module_dropout=0.25, train_unet=False)
    net = inject_lora(pipe.unet, pipe.text_encoder, cfg, seed=0)
    _randomise(net)
    layer = pipe.text_encoder.get_submodule(net.text_encoder_modules[0])
    lora_a, lora_b = layer.lora_A[net.adapter_name], layer.lora_B[net.adapter_name]
    hidden: list[torch.Tensor] = []
    handle = lora_b.register_forward_pre_hook(lambda _m, args: hidden.append(args[0].detach()))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(256, 3, lora_a.in_features, generator=g)
    try:
        layer.train()
        torch.manual_seed(0)
        while not hidden:  # a call that module dropout did not skip
            layer(x)
        kept = hidden[-1] != 0
        raw = F.linear(x, lora_a.weight)  # lora_a(x) would run the dropout hook itself
        # kohya: one mask per sample over the r units, the same for every token, survivors scaled by 1/(1-p)
        assert torch.equal(kept, kept[:, :1].expand_as(kept))
        assert abs(1 - kept[:, 0].float().mean().item() - 0.3) < 0.05
        assert torch.allclose(hidden[-1][kept], raw[kept] / 0.7, rtol=1e-5, atol=1e-6)

        base = layer.get_base_layer()
        with torch.no_grad():
            plain = base(x[:1])
            torch.manual_seed(1)
            skipped = [torch.equal(layer(x[:1]), plain) for _ in range(1200)]
            assert abs(sum(skipped) / len(skipped) - 0.25) < 0.04  # module dropout: whole adapter off
            torch.manual_seed(7)
            first = [layer(x[:4]) for _ in range(5)]
            state = torch.get_rng_state()  # what a training state saves
            later = [layer(x[:4]) for _ in range(5)]
            torch.manual_seed(7)
            assert all(torch.equal(a, b) for a, b in zip(first, [layer(x[:4]) for _ in range(5)], strict=True))
            torch.set_rng_state(state)  # a resume continues the same draws
            assert all(torch.equal(a, b) for a, b in zip(later, [layer(x[:4]) for _ in range(5)], strict=True))

        # gradient checkpointing recomputes with the RNG state replayed: same masks, same gradients
        seed = next(s for s in range(100) if torch.manual_seed(s) and float(torch.rand(1)) >= 0.25)  # not skipped
        grads = []
        for use_checkpoint in (False, True):
            torch.manual_seed(seed)
            for p in (lora_a.weight, lora_b.weight):
                p.grad = None
            out = checkpoint(layer, x, use_reentrant=False) if use_checkpoint else layer(x)
            out.square().sum().backward()
            grads.append((lora_a.weight.grad.clone(), lora_b.weight.grad.clone()))
        assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))

        layer.eval()  # evaluation: no dropout, no random draw
        state = torch.get_rng_state()
        with torch.no_grad():
            assert torch.equal(layer(x), layer(x))
        assert torch.equal(torch.get_rng_state(), state)
    finally:
        handle.remove()
        layer.eval()
        net.remove()
    plain_layer = pipe.text_encoder.get_submodule(net.text_encoder_modules[0])  # the base is plain again
    assert type(plain_layer) is nn.Linear and not plain_layer._forward_hooks and not plain_layer._forward_pre_hooks

    for algo in ("loha", "lokr"):  # peft's own (LyCORIS) dropouts: module dropout skips ≈ p, train mode only
        net = inject_lora(pipe.unet, pipe.text_encoder, NetworkConfig(dim=2, algo=algo, module_dropout=0.4,
                                                                      rank_dropout=0.2, train_unet=False), seed=0)
        _randomise(net)
        layer = pipe.text_encoder.get_submodule(net.text_encoder_modules[0])
        base = layer.get_base_layer()
        with torch.no_grad():
            plain = base(x[:1])
            layer.train()
            torch.manual_seed(3)
            share = sum(torch.equal(layer(x[:1]), plain) for _ in range(600)) / 600
            layer.eval()
            assert abs(share - 0.4) < 0.06 and not torch.equal(layer(x[:1]), plain)
        net.remove()


# 5. LoRA+ ------------------------------------------------------------------------------------------------


def test_loraplus_param_groups(pipe: StableDiffusionPipeline) -> None:
    cfg = NetworkConfig(dim=DIM, loraplus_lr_ratio=16, loraplus_text_encoder_lr_ratio=4)
    net = inject_lora(pipe.unet, pipe.text_encoder, cfg, seed=0)
    try:
        _randomise(net)  # B ≠ 0, so both A and B get gradients on the first step
        opt_cfg = OptimizerConfig(lr=1e-4, text_encoder_lr=5e-5)
        unet_params, te_params = net.unet_params(), net.text_encoder_params()
        optimizer = build_optimizer(opt_cfg, unet_params, te_params, loraplus=net.loraplus())
        groups = {g["name"]: g for g in optimizer.param_groups}
        assert list(groups) == ["unet", "unet_plus", "text_encoder", "text_encoder_plus"]
        assert effective_learning_rates(optimizer) == pytest.approx(
            {"unet": 1e-4, "unet_plus": 1.6e-3, "text_encoder": 5e-5, "text_encoder_plus": 2e-4})
        ups = {id(layer.lora_B[net.adapter_name].weight) for name in net.unet_modules
               for layer in [pipe.unet.get_submodule(name)]}
        assert {id(p) for p in groups["unet_plus"]["params"]} == ups
        assert len(groups["unet"]["params"]) == len(groups["unet_plus"]["params"]) == 48
        assert sum(len(g["params"]) for g in optimizer.param_groups) == len(unet_params) + len(te_params)

        a, b = unet_params[0], unet_params[1]  # the first module's down and up
        before = a.detach().clone(), b.detach().clone()
        (sum(p.sum() for p in unet_params + te_params)).backward()
        optimizer.step()  # AdamW's first step moves each element by ≈ its lr
        assert float((a.detach() - before[0]).abs().max()) == pytest.approx(1e-4, rel=0.05)
        assert float((b.detach() - before[1]).abs().max()) == pytest.approx(1.6e-3, rel=0.05)

        scheduler = build_lr_scheduler(SchedulerConfig(name="cosine", warmup_ratio=0.2), optimizer, total_steps=10)
        for _ in range(4):
            optimizer.step()
            scheduler.step()
        lrs = effective_learning_rates(optimizer)
        assert lrs["unet_plus"] == pytest.approx(16 * lrs["unet"]) and lrs["unet"] != 1e-4

        plain = build_optimizer(opt_cfg, unet_params, te_params, loraplus=None)
        assert [g["name"] for g in plain.param_groups] == ["unet", "text_encoder"]
        with pytest.raises(UserError, match="Prodigy") as err:
            build_optimizer(OptimizerConfig(name="prodigy", lr=1.0), unet_params, te_params, loraplus=net.loraplus())
        assert err.value.where == "network.loraplus_lr_ratio"
    finally:
        net.remove()
    assert NetworkConfig().loraplus_ratios == (None, None)
    assert NetworkConfig(loraplus_lr_ratio=8, loraplus_unet_lr_ratio=2).loraplus_ratios == (2, 8)


# 6. validation --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "key", "text"),
    [
        ({"algo": "lycoris"}, "network.algo", "not one of lora, loha, lokr"),
        ({"conv_dim": 0}, "network.conv_dim", "out of range"),
        ({"conv_dim": 4, "conv_alpha": 0.0}, "network.conv_alpha", "out of range"),
        ({"rank_dropout": 1.0}, "network.rank_dropout", "out of range"),
        ({"module_dropout": -0.1}, "network.module_dropout", "out of range"),
        ({"lokr_factor": 0}, "network.lokr_factor", "-1"),
        ({"loraplus_lr_ratio": 0.0}, "network.loraplus_lr_ratio", "out of range"),
        ({"loraplus_unet_lr_ratio": -2.0}, "network.loraplus_unet_lr_ratio", "out of range"),
        ({"dora": True, "algo": "loha"}, "network.dora / network.algo", "not for LoHa"),
        ({"dora": True, "algo": "lokr"}, "network.dora / network.algo", "not for LoKr"),
        ({"algo": "loha", "dropout": 0.1}, "network.dropout / network.algo", "no input dropout"),
        ({"dora": True, "rank_dropout": 0.1}, "network.dora / network.rank_dropout", "identity batch"),
        ({"algo": "lokr", "loraplus_text_encoder_lr_ratio": 4.0}, "network.loraplus_text_encoder_lr_ratio",
         "has none"),
    ],
)
def test_variant_validation(overrides: dict[str, object], key: str, text: str) -> None:
    with pytest.raises(UserError, match=text) as err:
        to_train_config({"network": overrides})
    assert err.value.where == key
    assert "\n" not in str(err.value)


def test_variant_keys_are_overrides_and_prodigy_refuses_loraplus() -> None:
    cfg = to_train_config(compose_config(["network.algo=lokr", "network.conv_dim=4", "network.lokr_factor=8",
                                          "network.module_dropout=0.1"]))
    assert (cfg.network.algo, cfg.network.conv_dim, cfg.network.lokr_factor) == ("lokr", 4, 8)
    assert cfg.network.effective_conv_alpha == 4.0 and math.isclose(cfg.network.module_dropout, 0.1)
    plus = NetworkConfig(loraplus_unet_lr_ratio=16)
    plus.check_with(optimizer="adamw")
    with pytest.raises(UserError, match="Prodigy") as err:
        plus.check_with(optimizer="prodigy")
    assert err.value.where == "network.loraplus_unet_lr_ratio"
