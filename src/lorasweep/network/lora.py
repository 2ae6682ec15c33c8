"""Put peft LoRA adapters on a Stable Diffusion UNet / CLIP text encoder, and take them off again.

Why ``peft.inject_adapter_in_model`` and not ``unet.add_adapter`` / ``text_encoder.add_adapter``:
diffusers' ``add_adapter`` is only inject + bookkeeping (``_hf_peft_config_loaded``, ``set_adapter``), and
transformers' ``add_adapter`` refuses peft 0.21 on transformers 5.24. Calling peft directly behaves the
same on both components and on every version pair we allow.

Why explicit full module names as peft ``target_modules``: peft matches list entries by suffix, so a
pattern such as ``to_q`` or ``proj_out`` could also catch modules outside the transformer blocks (and
``linear_1``-style names would catch the time embedding). Full names make the adapted set exactly the
kohya set, which is also what the exported file's keys must describe.

Determinism: peft creates each ``lora_A`` on the CPU (then moves it next to the base weight) and fills it
with ``kaiming_uniform_`` from torch's *global CPU generator*; ``lora_B`` is zeros. So the init is a
function of the seed the caller passed to ``torch.manual_seed`` and of the module order (UNet first, then
text encoder, each in ``named_modules`` order). Pass ``seed=`` to :func:`inject_lora` to make it a function
of that seed alone, without consuming the caller's global random stream. (A caller that sets
``torch.set_default_device('cuda')`` moves the init onto the CUDA generator instead.) LoHa and LoKr
(peft's LoHaConfig/LoKrConfig, ``network.algo``) and DoRA (``use_dora``) are initialised the same way.

Dropouts while training draw from torch's global random streams, as peft's ``lora_dropout`` and kohya's
``rank_dropout``/``module_dropout`` do: the training loop seeds them (``set_seed``) and saves and restores
them with every training state, and ``torch.utils.checkpoint`` replays them when gradient checkpointing
recomputes a block, so the recomputed masks equal the forward's (a private generator would not be replayed
and would give wrong gradients there).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig, inject_adapter_in_model
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.utils.hooks import RemovableHandle

from lorasweep.config.network import TARGETS, NetworkConfig
from lorasweep.errors import UserError
from lorasweep.network import adapters
from lorasweep.network.kohya import (
    ADAPTER_NAME,
    from_kohya_state_dict,
    load_lora_file,
    lora_layers,
    to_kohya_state_dict,
)

_UNET_ATTENTION = re.compile(r"(^|\.)transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
_TE_BLOCK = re.compile(r"(^|\.)encoder\.layers\.\d+\.(self_attn|mlp)$")
_TE_ATTENTION_LEAVES = ("q_proj", "k_proj", "v_proj", "out_proj")
_CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
"""kohya's ``UNET_TARGET_REPLACE_MODULE_CONV2D_3X3``: the blocks ``conv_dim`` adds (LoCon)."""
_MISSING = object()


def _check_target(target: str) -> None:
    if target not in TARGETS:
        raise UserError("network.target", f"is {target!r}; expected one of {', '.join(TARGETS)}.")


def _base(module: nn.Module) -> nn.Module:
    """The module peft wraps, so target discovery gives the same names before and after injection."""
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def _adaptable(module: nn.Module) -> bool:
    """kohya's rule: a Linear, or a Conv2d with a 1×1 kernel (SD-1.x ``proj_in``/``proj_out``)."""
    module = _base(module)
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1)


def _named_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` that yields a peft wrapper as one leaf instead of descending into its
    ``base_layer``/``lora_A``/``lora_B`` (those are not part of the base model's module tree)."""
    yield prefix, model
    if isinstance(model, BaseTunerLayer):
        return
    for name, child in model.named_children():
        yield from _named_modules(child, f"{prefix}.{name}" if prefix else name)


def unet_target_modules(unet: nn.Module, target: str, *, conv: bool = False) -> list[str]:
    """Full names of the UNet modules that get LoRA, in module order.

    ``kohya``: every Linear and 1×1 Conv2d inside a ``Transformer2DModel`` (kohya's
    ``UNET_TARGET_REPLACE_MODULE``): attn1/attn2 q/k/v/out.0, ff.net.0.proj, ff.net.2, proj_in, proj_out;
    12 per transformer model, 192 on SD-1.5. ``attention``: the attn1/attn2 q/k/v/out.0 projections only
    (8 per transformer model). Time embedding and ResNet ``time_emb_proj`` Linears are never included.

    ``conv`` (``network.conv_dim`` set, LoCon): then, as kohya, every Linear and Conv2d of each
    ``ResnetBlock2D``, ``Downsample2D`` and ``Upsample2D`` too (conv1/conv2 3×3, ``time_emb_proj``,
    ``conv_shortcut``, the samplers' 3×3 ``conv``): 86 more on SD-1.5, 278 in all.
    """
    _check_target(target)
    names: list[str] = []
    seen: set[str] = set()
    for name, module in _named_modules(unet):
        kind = type(module).__name__
        if kind != "Transformer2DModel" and not (conv and kind in _CONV_BLOCKS):
            continue
        for child_name, child in _named_modules(module):
            if not child_name:
                continue
            if kind == "Transformer2DModel":
                if not _adaptable(child) or (target == "attention" and not _UNET_ATTENTION.search(child_name)):
                    continue
            elif not isinstance(_base(child), nn.Linear | nn.Conv2d):
                continue
            full = f"{name}.{child_name}" if name else child_name
            if full not in seen:
                seen.add(full)
                names.append(full)
    return names


def text_encoder_target_modules(text_encoder: nn.Module, target: str) -> list[str]:
    """Full names of the CLIP text-encoder modules that get LoRA, in module order.

    ``kohya``: every Linear of each encoder layer's ``self_attn`` (q/k/v/out_proj) and ``mlp`` (fc1/fc2),
    6 per layer, 72 on SD-1.5; ``attention``: the four ``self_attn`` projections only. Matched on the module
    path rather than kohya's class names (``CLIPAttention``/``CLIPSdpaAttention``), which change across
    transformers versions.
    """
    _check_target(target)
    names: list[str] = []
    for name, module in _named_modules(text_encoder):
        match = _TE_BLOCK.search(name)
        if match is None:
            continue
        for child_name, child in module.named_children():
            if not _adaptable(child):
                continue
            if target == "attention" and (
                match.group(2) != "self_attn" or child_name not in _TE_ATTENTION_LEAVES
            ):
                continue
            names.append(f"{name}.{child_name}")
    return names


@contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Run under ``torch.manual_seed(seed)`` without disturbing the caller's CPU random stream."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _lora_params(model: nn.Module | None, adapter_name: str) -> list[nn.Parameter]:
    params: list[nn.Parameter] = []
    for _, layer in lora_layers(model, adapter_name):
        params.extend(adapters.adapter_parameters(layer, adapter_name))
    return params


def _is_spatial(model: nn.Module, name: str) -> bool:
    module = _base(model.get_submodule(name))
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1)


def _peft_config(cfg: NetworkConfig, targets: list[str], spatial: list[str]) -> PeftConfig:
    """The peft config of ``cfg.algo``; LoCon's 3×3 convs get ``conv_dim``/conv alpha through peft's per-module
    rank and alpha patterns (full names, escaped: peft reads pattern keys as regular expressions)."""
    conv_alpha = cfg.effective_conv_alpha
    ranks = {re.escape(n): cfg.conv_dim for n in spatial} if cfg.conv_dim is not None else {}
    alphas = {re.escape(n): conv_alpha for n in spatial} if conv_alpha is not None else {}
    if cfg.algo == "loha":
        return LoHaConfig(r=cfg.dim, alpha=cfg.effective_alpha, rank_dropout=cfg.rank_dropout,
                          module_dropout=cfg.module_dropout, target_modules=targets, init_weights=True,
                          use_effective_conv2d=False, rank_pattern=ranks, alpha_pattern=alphas)
    if cfg.algo == "lokr":
        # "lycoris": w1 random, w2 (or w2's up factor) zero, LyCORIS's own init; rank_dropout_scale is
        # LyCORIS's default (off).
        return LoKrConfig(r=cfg.dim, alpha=cfg.effective_alpha, rank_dropout=cfg.rank_dropout,
                          module_dropout=cfg.module_dropout, target_modules=targets, init_weights="lycoris",
                          use_effective_conv2d=False, decompose_both=False, decompose_factor=cfg.lokr_factor,
                          rank_dropout_scale=False, rank_pattern=ranks, alpha_pattern=alphas)
    return LoraConfig(
        r=cfg.dim,
        lora_alpha=cfg.effective_alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        init_lora_weights=True,  # A: kaiming-uniform, B: zeros, so the injected model equals the base
        bias="none",
        use_dora=cfg.dora,
        rank_pattern=ranks,
        alpha_pattern=alphas,
    )


def _inject(model: nn.Module, targets: list[str], cfg: NetworkConfig, adapter_name: str) -> None:
    spatial = [n for n in targets if _is_spatial(model, n)]
    inject_adapter_in_model(_peft_config(cfg, targets, spatial), model, adapter_name=adapter_name)
    got = {name: layer for name, layer in lora_layers(model, adapter_name)}
    if sorted(got) != sorted(targets):  # peft matches by suffix; make sure it hit exactly our list
        extra, missing = sorted(set(got) - set(targets)), sorted(set(targets) - set(got))
        raise RuntimeError(f"peft adapted an unexpected module set: extra={extra[:5]} missing={missing[:5]}")
    conv_rank, conv_alpha = cfg.conv_dim or cfg.dim, cfg.effective_conv_alpha or cfg.effective_alpha
    wanted = set(spatial)
    for name, layer in got.items():  # and that its pattern matching gave each module the rank/alpha we meant
        r, alpha = (conv_rank, conv_alpha) if name in wanted else (cfg.dim, cfg.effective_alpha)
        if adapters.rank(layer, adapter_name) != r or adapters.alpha(layer, adapter_name) != alpha:
            raise RuntimeError(f"peft built {name} with rank {adapters.rank(layer, adapter_name)}, alpha "
                               f"{adapters.alpha(layer, adapter_name)}; expected {r}, {alpha}")
        adapters.lokr_fix_full_scale(layer, adapter_name)


class _ModuleDropout:
    """kohya's ``module_dropout``: with probability p a module's adapter sits out one training forward, so the
    module acts as its base layer. One draw per module and forward from the global CPU stream, as kohya's
    ``torch.rand(1) < p``; peft's own switch (``disable_adapters``) skips the adapter."""

    def __init__(self, p: float) -> None:
        self.p = p
        self.skipping: set[int] = set()

    def before(self, layer: nn.Module, args: Any) -> None:
        if layer.training and bool(torch.rand(1) < self.p):
            layer._disable_adapters = True
            self.skipping.add(id(layer))

    def after(self, layer: nn.Module, args: Any, output: Any) -> None:
        if id(layer) in self.skipping:
            self.skipping.discard(id(layer))
            layer._disable_adapters = False


def _rank_dropout_hook(p: float, conv: bool) -> Any:
    """kohya's ``rank_dropout`` as a forward hook on peft's ``lora_A`` (so the saved keys do not change): each
    sample's r hidden units are kept with probability 1-p and the kept ones scaled by 1/(1-p), which is
    kohya's ``scale / (1 - rank_dropout)``. Training mode only."""

    def hook(module: nn.Module, args: Any, hidden: torch.Tensor) -> torch.Tensor | None:
        if not module.training:
            return None
        rank = hidden.shape[1] if conv else hidden.shape[-1]
        keep = torch.rand((hidden.shape[0], rank), device=hidden.device) > p
        shape = (hidden.shape[0], rank, *([1] * (hidden.dim() - 2))) if conv else (
            hidden.shape[0], *([1] * (hidden.dim() - 2)), rank)
        return hidden * keep.to(hidden.dtype).view(shape) / (1.0 - p)

    return hook


def _dropout_hooks(model: nn.Module, cfg: NetworkConfig, adapter_name: str) -> list[RemovableHandle]:
    """rank/module dropout for ``algo=lora`` (peft's LoHa/LoKr layers do both themselves)."""
    handles: list[RemovableHandle] = []
    if cfg.algo != "lora" or not (cfg.rank_dropout or cfg.module_dropout):
        return handles
    skip = _ModuleDropout(cfg.module_dropout)
    for _, layer in lora_layers(model, adapter_name):
        if cfg.module_dropout:
            handles.append(layer.register_forward_pre_hook(skip.before))
            handles.append(layer.register_forward_hook(skip.after, always_call=True))
        if cfg.rank_dropout:
            lora_a = layer.lora_A[adapter_name]
            handles.append(lora_a.register_forward_hook(
                _rank_dropout_hook(cfg.rank_dropout, isinstance(lora_a, nn.Conv2d))))
    return handles


@dataclass(eq=False)  # identity semantics: it holds live models
class LoraNetwork:
    """Handles on the LoRA injected by :func:`inject_lora`; also the only way to take it off again."""

    unet: nn.Module
    text_encoder: nn.Module
    cfg: NetworkConfig
    unet_modules: list[str]
    """Full names of the adapted UNet modules (empty when ``cfg.train_unet`` is false)."""
    text_encoder_modules: list[str]
    """Full names of the adapted text-encoder modules (empty when ``cfg.train_text_encoder`` is false)."""
    adapter_name: str = ADAPTER_NAME
    _requires_grad: list[tuple[nn.Parameter, bool]] = field(default_factory=list, repr=False)
    _hooks: list[RemovableHandle] = field(default_factory=list, repr=False)
    _peft_config: dict[int, object] = field(default_factory=dict, repr=False)
    removed: bool = False

    def _check_live(self) -> None:
        if self.removed:
            raise RuntimeError("this LoRA network was removed; inject a new one")

    def unet_params(self) -> list[nn.Parameter]:
        """Trainable UNet adapter tensors (LoRA: lora_A, lora_B[, DoRA magnitude] per module), for their own
        optimizer param group."""
        self._check_live()
        return _lora_params(self.unet if self.unet_modules else None, self.adapter_name)

    def text_encoder_params(self) -> list[nn.Parameter]:
        """Trainable text-encoder LoRA tensors, separate so the TE can get its own learning rate."""
        self._check_live()
        return _lora_params(self.text_encoder if self.text_encoder_modules else None, self.adapter_name)

    def loraplus(self) -> dict[str, tuple[list[nn.Parameter], float]]:
        """LoRA+ for :func:`~lorasweep.training.optim.build_optimizer`: per trained component (``unet``,
        ``text_encoder``) its up matrices and their lr ratio; empty when LoRA+ is off."""
        self._check_live()
        unet_ratio, te_ratio = self.cfg.loraplus_ratios
        out: dict[str, tuple[list[nn.Parameter], float]] = {}
        for label, model, names, ratio in (("unet", self.unet, self.unet_modules, unet_ratio),
                                           ("text_encoder", self.text_encoder, self.text_encoder_modules, te_ratio)):
            if names and ratio is not None:
                out[label] = ([p for _, layer in lora_layers(model, self.adapter_name)
                               for p in adapters.up_parameters(layer, self.adapter_name)], ratio)
        return out

    def state_dict(self, dtype: torch.dtype | str = torch.float32) -> dict[str, torch.Tensor]:
        """The network in kohya/LyCORIS format (``lora_unet_*``/``lora_te_*``), ready for ``save_lora_file``."""
        self._check_live()
        return to_kohya_state_dict(
            self.unet if self.unet_modules else None,
            self.text_encoder if self.text_encoder_modules else None,
            alpha=self.cfg.effective_alpha,
            dtype=dtype,
            adapter_name=self.adapter_name,
        )

    def load_kohya_state_dict(
        self, tensors: Mapping[str, torch.Tensor], source: str = "LoRA init file"
    ) -> None:
        """Initialise the network from a kohya/LyCORIS file's tensors; algorithm, ranks, alphas and modules must
        match the config."""
        self._check_live()
        from_kohya_state_dict(
            self.unet if self.unet_modules else None,
            self.text_encoder if self.text_encoder_modules else None,
            tensors,
            adapter_name=self.adapter_name,
            source=source,
        )

    def remove(self) -> None:
        """Unload the adapters and put the pristine base modules back.

        Every peft wrapper is replaced by the very module object it wrapped (no merge, no copy), so the
        base ``state_dict`` is bitwise what it was before injection and one loaded base model can serve
        many trials. ``requires_grad`` flags and any previous ``peft_config`` attribute are restored too.
        Idempotent.
        """
        if self.removed:
            return
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        for model in (self.unet, self.text_encoder):
            wrapped = [name for name, module in _named_modules(model) if isinstance(module, BaseTunerLayer)]
            for name in wrapped:
                parent_name, _, child_name = name.rpartition(".")
                parent = model.get_submodule(parent_name)
                setattr(parent, child_name, _base(getattr(parent, child_name)))
            previous = self._peft_config.get(id(model), _MISSING)
            if previous is _MISSING:
                if "peft_config" in vars(model):
                    del model.peft_config
            else:
                model.peft_config = previous
        for param, flag in self._requires_grad:
            param.requires_grad_(flag)
        self._requires_grad.clear()
        self.removed = True


def inject_lora(
    unet: nn.Module,
    text_encoder: nn.Module,
    cfg: NetworkConfig,
    *,
    seed: int | None = None,
    adapter_name: str = ADAPTER_NAME,
) -> LoraNetwork:
    """Freeze both models and add the adapter ``cfg`` describes (``algo``: LoRA/LoCon, LoHa or LoKr, with
    DoRA, dropouts) to the components it trains.

    The initial network is the identity (LoRA's ``lora_B``, one LoHa factor, one LoKr factor are zero; DoRA's
    magnitude is the base weight's norm), so the injected model's outputs equal the base model's. Adapter
    tensors are float32 whatever the base dtype: with an fp16 base, fp16 trainable tensors would make AMP's
    grad scaler refuse to unscale (and lose small updates). ``seed``: see the module doc.
    """
    cfg.validate()  # also refuses train_unet = train_text_encoder = false: nothing to train
    for label, model in (("UNet", unet), ("text encoder", text_encoder)):
        if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
            raise RuntimeError(
                f"the {label} already carries LoRA layers; remove() the previous network first"
            )

    unet_names = unet_target_modules(unet, cfg.target, conv=cfg.conv_dim is not None) if cfg.train_unet else []
    te_names = text_encoder_target_modules(text_encoder, cfg.target) if cfg.train_text_encoder else []
    if cfg.train_unet and not unet_names:
        raise UserError(
            "network.target",
            f"found no {cfg.target} modules in the UNet.",
            "Is this an SD-1.x/2.x UNet2DConditionModel with Transformer2DModel blocks?",
        )
    if cfg.train_text_encoder and not te_names:
        raise UserError(
            "network.target",
            f"found no {cfg.target} modules in the text encoder.",
            "Is this a CLIP text encoder (text_model.encoder.layers.N)?",
        )

    network = LoraNetwork(
        unet=unet,
        text_encoder=text_encoder,
        cfg=cfg,
        unet_modules=unet_names,
        text_encoder_modules=te_names,
        adapter_name=adapter_name,
    )
    for model in (unet, text_encoder):
        network._requires_grad.extend((p, p.requires_grad) for p in model.parameters())
        network._peft_config[id(model)] = vars(model).get("peft_config", _MISSING)
        model.requires_grad_(False)

    try:
        with _seeded(seed):
            if unet_names:
                _inject(unet, unet_names, cfg, adapter_name)
            if te_names:
                _inject(text_encoder, te_names, cfg, adapter_name)
        for model in (unet, text_encoder):
            network._hooks.extend(_dropout_hooks(model, cfg, adapter_name))
    except BaseException:
        network.remove()
        raise

    for param in network.unet_params() + network.text_encoder_params():
        param.data = param.data.float()
        param.requires_grad_(True)
    return network


def init_from_file(network: LoraNetwork, path: Path | str) -> dict[str, str]:
    """``network.init_weights``: copy a kohya/LyCORIS file's weights into ``network``; return its metadata.

    Weights only (the optimizer starts fresh, kohya ``--network_weights``). The file must be safetensors
    (pickles are refused) and match the config exactly: algorithm (``network.algo``, ``network.dora``), rank
    (``network.dim``/``conv_dim``), alpha (``network.alpha``/``conv_alpha``; a module without ``.alpha`` means
    alpha = rank, as in kohya) and the adapted modules (``network.target`` / ``conv_dim`` / ``train_unet`` /
    ``train_text_encoder``); any mismatch is a ``UserError`` and leaves the network as it
    was. Any dtype is accepted (kohya saves fp16 by default); the values are cast to the LoRA's float32.
    """
    tensors, metadata = load_lora_file(path)
    network.load_kohya_state_dict(tensors, source=str(path))
    return metadata
