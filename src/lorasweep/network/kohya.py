"""kohya ``networks.lora`` file format: key mapping to and from peft LoRA layers, and safe file I/O.

Why kohya and not diffusers/peft keys: the kohya layout (``lora_unet_*`` / ``lora_te_*`` with
``lora_down``/``lora_up``/``alpha``) is what A1111, ComfyUI, kohya's own scripts *and* diffusers'
``load_lora_weights`` all read, so one file works everywhere.

Layout per adapted module (``<key>`` = prefix + full module name with ``.`` replaced by ``_``):

* ``<key>.lora_down.weight``: peft ``lora_A`` weight, ``[r, in]`` (``[r, in, 1, 1]`` for a 1×1 conv);
* ``<key>.lora_up.weight``: peft ``lora_B`` weight, ``[out, r]`` (``[out, r, 1, 1]``);
* ``<key>.alpha``: 0-dim tensor; the update is scaled by ``alpha / r``.

The ``.``→``_`` mapping is not invertible from the key alone (``transformer_blocks`` contains an
underscore), so the reverse mapping is always built from the module names of the live model.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from peft.tuners.lora import LoraLayer
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lorasweep.errors import UserError

UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIX = "lora_te_"
ADAPTER_NAME = "lorasweep"
"""peft adapter name we inject under. Not peft's ``"default"``, so it cannot collide with an adapter
diffusers' ``load_lora_weights`` adds (``default_0``, ...) to the same model."""

DOWN = "lora_down.weight"
UP = "lora_up.weight"
ALPHA = "alpha"

_DTYPES: dict[str, torch.dtype] = {
    "float": torch.float32,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Accept a torch dtype or its config spelling (``fp16``, ``bf16``, ...); only the three save dtypes."""
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unsupported LoRA save dtype {dtype!r}; use one of {sorted(_DTYPES)}")
        return _DTYPES[dtype]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"unsupported LoRA save dtype {dtype}; use float32, float16 or bfloat16")
    return dtype


def kohya_key(prefix: str, module_name: str) -> str:
    """``down_blocks.0.attentions.0.proj_in`` → ``lora_unet_down_blocks_0_attentions_0_proj_in``."""
    return prefix + module_name.replace(".", "_")


def lora_layers(model: nn.Module | None, adapter_name: str = ADAPTER_NAME) -> Iterator[tuple[str, LoraLayer]]:
    """(full module name, peft LoRA wrapper) for every layer carrying ``adapter_name``, in module order.

    The wrapper sits at the original module's path (the base module moves to ``<name>.base_layer``), so
    the yielded names are the base model's module names, exactly what kohya keys are built from.
    """
    if model is None:
        return
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            yield name, module


def text_encoder_kohya_name(text_encoder: nn.Module, module_name: str) -> str:
    """The module name kohya uses for a CLIP text-encoder module.

    transformers ≥ 5 flattened ``CLIPTextModel`` (``encoder.layers.0...`` instead of
    ``text_model.encoder.layers.0...``), but every kohya file, A1111 and diffusers' converter spell the
    key ``lora_te_text_model_encoder_layers_0_...``; so the ``text_model.`` level is put back when the
    model lacks it, keeping files identical across transformers versions.
    """
    if hasattr(text_encoder, "text_model") or module_name.startswith("text_model."):
        return module_name
    return f"text_model.{module_name}"


def _component_layers(
    unet: nn.Module | None, text_encoder: nn.Module | None, adapter_name: str
) -> dict[str, LoraLayer]:
    """kohya key (without the ``.lora_down...`` suffix) → LoRA layer, UNet first then text encoder."""
    layers: dict[str, LoraLayer] = {}
    for name, layer in lora_layers(unet, adapter_name):
        layers[kohya_key(UNET_PREFIX, name)] = layer
    if text_encoder is not None:
        for name, layer in lora_layers(text_encoder, adapter_name):
            layers[kohya_key(TEXT_ENCODER_PREFIX, text_encoder_kohya_name(text_encoder, name))] = layer
    return layers


def _export(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A CPU copy in ``dtype``: never shares storage with a live parameter (training may continue after a
    checkpoint), contiguous because safetensors refuses strided views."""
    return tensor.detach().to(device="cpu", dtype=dtype, copy=True).contiguous()


def to_kohya_state_dict(
    unet: nn.Module | None,
    text_encoder: nn.Module | None,
    *,
    alpha: float,
    dtype: torch.dtype | str = torch.float32,
    adapter_name: str = ADAPTER_NAME,
) -> dict[str, torch.Tensor]:
    """The kohya tensors for every LoRA layer of ``adapter_name`` in ``unet`` and ``text_encoder``.

    A component without LoRA layers (or ``None``) contributes no keys, so a UNet-only network saves a
    UNet-only file. ``alpha`` is written as each module's ``.alpha``; it is cross-checked against the
    scale peft actually applies (``alpha / r``) so a file can never claim a scale the model did not train
    with.
    """
    dtype = resolve_dtype(dtype)
    out: dict[str, torch.Tensor] = {}
    for key, layer in _component_layers(unet, text_encoder, adapter_name).items():
        r = layer.r[adapter_name]
        if not math.isclose(layer.scaling[adapter_name], alpha / r, rel_tol=1e-6):
            raise ValueError(
                f"{key}: peft scale {layer.scaling[adapter_name]} != alpha/r = {alpha}/{r}; "
                "export alpha does not match the injected network"
            )
        out[f"{key}.{DOWN}"] = _export(layer.lora_A[adapter_name].weight, dtype)
        out[f"{key}.{UP}"] = _export(layer.lora_B[adapter_name].weight, dtype)
        out[f"{key}.{ALPHA}"] = torch.tensor(float(alpha), dtype=dtype)
    return out


def _examples(names: list[str], n: int = 3) -> str:
    shown = ", ".join(names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def from_kohya_state_dict(
    unet: nn.Module | None,
    text_encoder: nn.Module | None,
    tensors: Mapping[str, torch.Tensor],
    *,
    alpha: float,
    dim: int,
    adapter_name: str = ADAPTER_NAME,
    source: str = "LoRA init file",
) -> None:
    """Copy kohya tensors into the injected LoRA layers (inverse of :func:`to_kohya_state_dict`).

    Strict on purpose: initialising from a file that covers different modules, another rank or another
    alpha would silently train something other than what the config says, so every mismatch is a
    ``UserError`` naming ``source`` and the config key to change. A missing ``.alpha`` means alpha = rank,
    as in kohya. Nothing is written unless the whole file checks out.
    """
    layers = _component_layers(unet, text_encoder, adapter_name)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for full_key, value in tensors.items():
        module_key, _, leaf = full_key.partition(".")
        if leaf not in (DOWN, UP, ALPHA):
            raise UserError(
                source, f"unexpected tensor {full_key!r}: not a kohya LoRA (lora_down/lora_up/alpha)."
            )
        modules.setdefault(module_key, {})[leaf] = value

    unknown = sorted(set(modules) - set(layers))
    if unknown:
        raise UserError(
            source,
            f"has LoRA weights for {len(unknown)} modules this network does not adapt "
            f"({_examples(unknown)}).",
            "Match network.target / network.train_unet / network.train_text_encoder to the file "
            "(lora_te1_/lora_te2_ or input_blocks keys mean an SDXL or original-SD-layout LoRA, "
            "which is not supported).",
        )
    missing = sorted(set(layers) - set(modules))
    if missing:
        raise UserError(
            source,
            f"has no weights for {len(missing)} of the {len(layers)} adapted modules ({_examples(missing)}).",
            "Match network.target / network.train_unet / network.train_text_encoder to the file.",
        )

    staged: list[tuple[torch.Tensor, torch.Tensor]] = []
    for key, layer in layers.items():
        entry = modules[key]
        if DOWN not in entry or UP not in entry:
            raise UserError(source, f"{key} lacks {DOWN if DOWN not in entry else UP}.")
        down, up = entry[DOWN], entry[UP]
        file_dim = int(down.shape[0])
        if file_dim != dim:
            raise UserError(
                "network.dim",
                f"is {dim} but {source} has rank {file_dim} ({key}).",
                f"Set network.dim={file_dim}.",
            )
        file_alpha = float(entry[ALPHA].float().item()) if ALPHA in entry else float(file_dim)
        # Compare in the file's dtype: an fp16/bf16 file stores alpha rounded, so 0.1 must still match 0.1.
        alpha_dtype = entry[ALPHA].dtype if ALPHA in entry else torch.float32
        if torch.tensor(alpha, dtype=alpha_dtype).float().item() != file_alpha:
            raise UserError(
                "network.alpha",
                f"is {alpha:g} but {source} was trained with alpha {file_alpha:g}.",
                f"Set network.alpha={file_alpha:g} so the LoRA keeps its scale alpha/dim.",
            )
        a_param = layer.lora_A[adapter_name].weight
        b_param = layer.lora_B[adapter_name].weight
        for param, value, name in ((a_param, down, DOWN), (b_param, up, UP)):
            if tuple(value.shape) != tuple(param.shape):
                raise UserError(
                    source,
                    f"{key}.{name} has shape {tuple(value.shape)}, the model needs {tuple(param.shape)}.",
                    "Was it trained for a different base model?",
                )
            staged.append((param, value))
    with torch.no_grad():
        for param, value in staged:
            param.copy_(value.to(device=param.device, dtype=param.dtype))


def save_lora_file(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write ``tensors`` as safetensors at ``path``, atomically and never over an existing file.

    The bytes go to ``path.with_suffix('.tmp-<pid>')`` first and are then ``os.replace``d into place, so a
    crash or a full disk leaves either no file or the complete one, never a truncated LoRA that loads as
    garbage later. An existing ``path`` is a ``UserError``: LoRA files are results, silently overwriting one
    (e.g. a re-run writing into the same run folder) would destroy a trial's output.
    """
    path = Path(path)
    if metadata is not None:
        bad = {
            k: type(v).__name__
            for k, v in metadata.items()
            if not isinstance(k, str) or not isinstance(v, str)
        }
        if bad:
            raise TypeError(f"safetensors metadata keys and values must be str, got {bad}")
    if path.exists():
        raise UserError(
            str(path),
            "already exists; refusing to overwrite a saved LoRA.",
            "Choose a new output folder or delete the file.",
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_lora_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors on CPU, metadata) of a safetensors LoRA; a missing or unreadable file is a ``UserError``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(str(path), "no such LoRA file.", "Check the path (it must be a .safetensors file).")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UserError(
            str(path),
            f"is not a readable safetensors file ({exc}).",
            "Was the file truncated, or is it a .ckpt/.pt pickle?",
        ) from exc
    return tensors, metadata
