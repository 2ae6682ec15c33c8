"""Each peft adapter kind in the kohya/LyCORIS file layout: which tensors a module saves, under which names.

One adapted module ``<key>`` (``lora_unet_...``/``lora_te_...``, see :mod:`lorasweep.network.kohya`) saves:

* LoRA and LoCon (peft ``LoraLayer``): ``lora_down.weight`` = ``lora_A`` [r, in] ([r, in, k, k] for a conv),
  ``lora_up.weight`` = ``lora_B`` [out, r] ([out, r, 1, 1]), and with DoRA ``dora_scale`` = the magnitude
  vector shaped [out, 1] ([out, 1, 1, 1]), LyCORIS's ``wd_on_output`` layout; ΔW = alpha/r · up·down.
* LoHa (peft ``LoHaLayer``): ``hada_w1_a`` [out, r], ``hada_w1_b`` [r, in·k·k], ``hada_w2_a``, ``hada_w2_b``;
  ΔW = alpha/r · (w1_a·w1_b) ⊙ (w2_a·w2_b), reshaped to the weight's shape. peft and LyCORIS (without
  Tucker/"CP" convs) use the same shapes, so the tensors are saved as they are.
* LoKr (peft ``LoKrLayer``): ``lokr_w1`` or its factors ``lokr_w1_a``/``lokr_w1_b``, and ``lokr_w2`` or
  ``lokr_w2_a``/``lokr_w2_b``; ΔW = scale · w1 ⊗ w2 with scale = alpha/r when a factor is low-rank and 1 when
  both are full (LyCORIS, ComfyUI and diffusers ignore alpha then; :func:`lokr_fix_full_scale` makes peft
  agree).

and ``alpha`` (0-dim) in every case. These are exactly the keys A1111's and ComfyUI's LoRA loaders and
LyCORIS's ``create_network_from_weights`` look for.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

LORA, LOHA, LOKR = "lora", "loha", "lokr"
DOWN, UP, ALPHA, DORA_SCALE = "lora_down.weight", "lora_up.weight", "alpha", "dora_scale"
LOHA_LEAVES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR_LEAVES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
LEAF_KIND: dict[str, str] = {DOWN: LORA, UP: LORA, DORA_SCALE: LORA, **dict.fromkeys(LOHA_LEAVES, LOHA),
                             **dict.fromkeys(LOKR_LEAVES, LOKR)}
"""Every per-module tensor name lorasweep reads (besides ``alpha``), and the adapter kind it belongs to."""
KIND_NAMES = {LORA: "LoRA", LOHA: "LoHa", LOKR: "LoKr"}


def adapter_kind(layer: BaseTunerLayer) -> str:
    """``lora``, ``loha`` or ``lokr``, from the peft layer's parameter names (no import of each tuner)."""
    names = layer.adapter_layer_names
    if "lora_A" in names:
        return LORA
    if "hada_w1_a" in names:
        return LOHA
    if "lokr_w1" in names:
        return LOKR
    raise TypeError(f"unsupported adapter layer {type(layer).__name__}")


def carries(layer: nn.Module, adapter_name: str) -> bool:
    """Whether ``layer`` is a peft tuner layer holding ``adapter_name`` (of any kind)."""
    return isinstance(layer, BaseTunerLayer) and any(
        adapter_name in getattr(layer, name, {}) for name in layer.adapter_layer_names
    )


def adapter_layers(model: nn.Module | None, adapter_name: str) -> Iterator[tuple[str, BaseTunerLayer]]:
    """(full module name, peft layer) for every layer carrying ``adapter_name``, in module order. The layer
    sits at the original module's path, so the names are the base model's, which kohya keys are built from."""
    if model is None:
        return
    for name, module in model.named_modules():
        if carries(module, adapter_name):
            yield name, module


def adapter_parameters(layer: BaseTunerLayer, adapter_name: str) -> list[nn.Parameter]:
    """The trainable tensors of ``adapter_name`` in ``layer``, in registration order (LoRA: A, B[, magnitude])."""
    params = []
    for name, param in layer.named_parameters():
        if name.startswith("base_layer."):
            continue
        if adapter_name in name.split("."):
            params.append(param)
    return params


def up_parameters(layer: BaseTunerLayer, adapter_name: str) -> list[nn.Parameter]:
    """LoRA's up (``lora_B``) weights, which LoRA+ steps faster; none for LoHa/LoKr."""
    if adapter_kind(layer) != LORA:
        return []
    return list(layer.lora_B[adapter_name].parameters())


def rank(layer: BaseTunerLayer, adapter_name: str) -> int:
    return int(layer.r[adapter_name])


def alpha(layer: BaseTunerLayer, adapter_name: str) -> float:
    """The alpha the module was built with (peft keeps it per module: ``lora_alpha`` or ``alpha``)."""
    values = layer.lora_alpha if adapter_kind(layer) == LORA else layer.alpha
    return float(values[adapter_name])


def is_spatial_conv(layer: BaseTunerLayer) -> bool:
    """A conv with a kernel larger than 1×1: LoCon's ``conv_dim``/``conv_alpha`` apply to it, not dim/alpha."""
    base = layer.get_base_layer()
    return isinstance(base, nn.Conv2d) and tuple(base.kernel_size) != (1, 1)


def lokr_full(layer: BaseTunerLayer, adapter_name: str) -> bool:
    """A LoKr module whose two Kronecker factors are both full matrices (no rank, so no alpha)."""
    return (adapter_kind(layer) == LOKR and adapter_name in layer.lokr_w1 and adapter_name in layer.lokr_w2)


def lokr_fix_full_scale(layer: BaseTunerLayer, adapter_name: str) -> None:
    """Give a full-factor LoKr module scale 1 and alpha r, as LyCORIS does (``if use_w1 and use_w2: alpha =
    lora_dim``) and as every reader applies it; peft would scale it by alpha/r, which no reader reproduces."""
    if lokr_full(layer, adapter_name):
        layer.alpha[adapter_name] = float(layer.r[adapter_name])
        layer.scaling[adapter_name] = 1.0


def expected_scale(layer: BaseTunerLayer, adapter_name: str) -> float:
    """The factor readers apply to the module's product: alpha/r, or 1 for a full-factor LoKr module."""
    return 1.0 if lokr_full(layer, adapter_name) else alpha(layer, adapter_name) / rank(layer, adapter_name)


def _dora_file_shape(layer: BaseTunerLayer) -> tuple[int, ...]:
    weight = layer.get_base_layer().weight
    return (int(weight.shape[0]), *([1] * (weight.dim() - 1)))


def file_tensors(layer: BaseTunerLayer, adapter_name: str) -> dict[str, torch.Tensor]:
    """Leaf name → live tensor in the file's shape, without ``alpha`` (the caller copies and casts)."""
    kind = adapter_kind(layer)
    if kind == LORA:
        out = {DOWN: layer.lora_A[adapter_name].weight, UP: layer.lora_B[adapter_name].weight}
        if adapter_name in layer.lora_magnitude_vector:
            out[DORA_SCALE] = layer.lora_magnitude_vector[adapter_name].weight.reshape(_dora_file_shape(layer))
        return out
    leaves = LOHA_LEAVES if kind == LOHA else LOKR_LEAVES
    return {leaf: getattr(layer, leaf)[adapter_name] for leaf in leaves if adapter_name in getattr(layer, leaf)}


def file_targets(layer: BaseTunerLayer, adapter_name: str) -> dict[str, tuple[nn.Parameter, tuple[int, ...]]]:
    """Leaf name → (the parameter a file's tensor is copied into, the shape the file must have)."""
    kind = adapter_kind(layer)
    if kind == LORA:
        a, b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        out = {DOWN: (a, tuple(a.shape)), UP: (b, tuple(b.shape))}
        if adapter_name in layer.lora_magnitude_vector:
            out[DORA_SCALE] = (layer.lora_magnitude_vector[adapter_name].weight, _dora_file_shape(layer))
        return out
    leaves = LOHA_LEAVES if kind == LOHA else LOKR_LEAVES
    return {leaf: (getattr(layer, leaf)[adapter_name], tuple(getattr(layer, leaf)[adapter_name].shape))
            for leaf in leaves if adapter_name in getattr(layer, leaf)}


def file_rank(kind: str, shapes: Mapping[str, Sequence[int]]) -> int | None:
    """The rank a file's module was trained with, from its tensors' shapes (leaf → shape) as the readers read
    it; None for a full-factor LoKr module, which has none."""
    if kind == LORA:
        return int(shapes[DOWN][0]) if DOWN in shapes else None
    if kind == LOHA:
        return int(shapes["hada_w1_b"][0]) if "hada_w1_b" in shapes else None
    for leaf in ("lokr_w2_b", "lokr_w1_b"):  # ComfyUI's order: w2's rank wins
        if leaf in shapes:
            return int(shapes[leaf][0])
    return None
