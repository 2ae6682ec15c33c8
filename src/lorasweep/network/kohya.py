"""kohya ``networks.lora`` / LyCORIS file format: key mapping to and from peft adapter layers, and file I/O.

Why kohya and not diffusers/peft keys: the kohya layout (``lora_unet_*`` / ``lora_te_*`` with
``lora_down``/``lora_up``/``alpha``) is what A1111, ComfyUI, kohya's own scripts *and* diffusers'
``load_lora_weights`` all read, so one file works everywhere. LoHa, LoKr and DoRA use the same module keys
with LyCORIS's tensor names (``hada_*``, ``lokr_*``, ``dora_scale``), which A1111 and ComfyUI read too.

Layout per adapted module (``<key>`` = prefix + full module name with ``.`` replaced by ``_``):

* ``<key>.lora_down.weight``: peft ``lora_A`` weight, ``[r, in]`` (``[r, in, k, k]`` for a conv);
* ``<key>.lora_up.weight``: peft ``lora_B`` weight, ``[out, r]`` (``[out, r, 1, 1]``);
* ``<key>.alpha``: 0-dim tensor; the update is scaled by ``alpha / r``;
* the other variants' tensors: see :mod:`lorasweep.network.adapters`.

The ``.``→``_`` mapping is not invertible from the key alone (``transformer_blocks`` contains an
underscore), so the reverse mapping is always built from the module names of the live model.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import safetensors.torch
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lorasweep import _faults
from lorasweep.config.network import NetworkConfig
from lorasweep.errors import UserError, storage_error
from lorasweep.network import adapters
from lorasweep.network.adapters import ALPHA

log = logging.getLogger(__name__)

UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIX = "lora_te_"
ADAPTER_NAME = "lorasweep"
"""peft adapter name we inject under. Not peft's ``"default"``, so it cannot collide with an adapter
diffusers' ``load_lora_weights`` adds (``default_0``, ...) to the same model."""

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


def lora_layers(model: nn.Module | None, adapter_name: str = ADAPTER_NAME) -> Iterator[tuple[str, BaseTunerLayer]]:
    """(full module name, peft adapter layer: LoRA, LoHa or LoKr) for every layer carrying ``adapter_name``,
    in module order.

    The wrapper sits at the original module's path (the base module moves to ``<name>.base_layer``), so
    the yielded names are the base model's module names, exactly what kohya keys are built from.
    """
    yield from adapters.adapter_layers(model, adapter_name)


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
) -> dict[str, BaseTunerLayer]:
    """kohya key (without the ``.lora_down...`` suffix) → adapter layer, UNet first then text encoder."""
    layers: dict[str, BaseTunerLayer] = {}
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
    alpha: float | None = None,
    dtype: torch.dtype | str = torch.float32,
    adapter_name: str = ADAPTER_NAME,
) -> dict[str, torch.Tensor]:
    """The kohya/LyCORIS tensors for every adapter layer of ``adapter_name`` in ``unet`` and ``text_encoder``.

    A component without adapter layers (or ``None``) contributes no keys, so a UNet-only network saves a
    UNet-only file. Each module's ``.alpha`` is the alpha its peft layer was built with, cross-checked against
    the scale peft actually applies, so a file can never claim a scale the model did not train with.
    ``alpha``, when given, must also be that of every module that carries the network alpha (all but LoCon's
    3×3 convolutions, which carry ``conv_alpha``, and full-factor LoKr modules, which have none).
    """
    dtype = resolve_dtype(dtype)
    out: dict[str, torch.Tensor] = {}
    for key, layer in _component_layers(unet, text_encoder, adapter_name).items():
        module_alpha = adapters.alpha(layer, adapter_name)
        scale = adapters.expected_scale(layer, adapter_name)
        if not math.isclose(layer.scaling[adapter_name], scale, rel_tol=1e-6):
            raise ValueError(f"{key}: peft scale {layer.scaling[adapter_name]} != {scale} (alpha {module_alpha}, "
                             f"rank {adapters.rank(layer, adapter_name)}); the file would misstate the network")
        own_alpha = adapters.is_spatial_conv(layer) or adapters.lokr_full(layer, adapter_name)
        if alpha is not None and not own_alpha and not math.isclose(module_alpha, alpha, rel_tol=1e-6):
            raise ValueError(f"{key}: injected with alpha {module_alpha}, but export alpha is {alpha}")
        for leaf, tensor in adapters.file_tensors(layer, adapter_name).items():
            out[f"{key}.{leaf}"] = _export(tensor, dtype)
        out[f"{key}.{ALPHA}"] = torch.tensor(module_alpha, dtype=dtype)
    return out


def _examples(names: list[str], n: int = 3) -> str:
    shown = ", ".join(names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def _file_kind(key: str, leaves: set[str], source: str) -> str:
    kinds = {adapters.LEAF_KIND[leaf] for leaf in leaves if leaf != ALPHA}
    if len(kinds) != 1:
        raise UserError(source, f"{key} mixes or lacks adapter tensors ({', '.join(sorted(leaves))}).",
                        "Is it a LoRA/LoCon, LoHa or LoKr file from kohya or LyCORIS?")
    return kinds.pop()


def from_kohya_state_dict(
    unet: nn.Module | None,
    text_encoder: nn.Module | None,
    tensors: Mapping[str, torch.Tensor],
    *,
    adapter_name: str = ADAPTER_NAME,
    source: str = "LoRA init file",
) -> None:
    """Copy kohya/LyCORIS tensors into the injected adapter layers (inverse of :func:`to_kohya_state_dict`).

    Strict on purpose: initialising from a file that covers different modules, another algorithm, rank or
    alpha would silently train something other than what the config says, so every mismatch is a
    ``UserError`` naming ``source`` and the config key to change. A missing ``.alpha`` means alpha = rank,
    as in kohya; a full-factor LoKr module's alpha is ignored, as every reader does. Nothing is written
    unless the whole file checks out.
    """
    layers = _component_layers(unet, text_encoder, adapter_name)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for full_key, value in tensors.items():
        module_key, _, leaf = full_key.partition(".")
        if leaf != ALPHA and leaf not in adapters.LEAF_KIND:
            raise UserError(
                source, f"unexpected tensor {full_key!r}: not a kohya/LyCORIS LoRA, LoHa or LoKr tensor "
                "(lora_down/lora_up/alpha/dora_scale, hada_*, lokr_*)."
            )
        modules.setdefault(module_key, {})[leaf] = value

    unknown = sorted(set(modules) - set(layers))
    if unknown:
        raise UserError(
            source,
            f"has LoRA weights for {len(unknown)} modules this network does not adapt "
            f"({_examples(unknown)}).",
            "Match network.target / network.conv_dim / network.train_unet / network.train_text_encoder to the "
            "file (lora_te1_/lora_te2_ or input_blocks keys mean an SDXL or original-SD-layout LoRA, which is "
            "not supported).",
        )
    missing = sorted(set(layers) - set(modules))
    if missing:
        raise UserError(
            source,
            f"has no weights for {len(missing)} of the {len(layers)} adapted modules ({_examples(missing)}).",
            "Match network.target / network.conv_dim / network.train_unet / network.train_text_encoder to the "
            "file.",
        )

    staged: list[tuple[torch.Tensor, torch.Tensor]] = []
    for key, layer in layers.items():
        entry = modules[key]
        ours = adapters.adapter_kind(layer)
        theirs = _file_kind(key, set(entry), source)
        if theirs != ours:
            raise UserError("network.algo", f"is {ours} but {source} holds a {adapters.KIND_NAMES[theirs]} "
                            f"({key}).", f"Set network.algo={theirs}.")
        targets = adapters.file_targets(layer, adapter_name)
        has_dora = adapters.DORA_SCALE in targets
        if (adapters.DORA_SCALE in entry) != has_dora:
            raise UserError("network.dora", f"is {str(has_dora).lower()} but {source} "
                            f"{'has no' if has_dora else 'has a'} DoRA magnitude ({key}.dora_scale).",
                            f"Set network.dora={str(not has_dora).lower()}.")
        conv = adapters.is_spatial_conv(layer)
        dim_key, alpha_key = ("network.conv_dim", "network.conv_alpha") if conv else ("network.dim", "network.alpha")
        dim = adapters.rank(layer, adapter_name)
        file_dim = adapters.file_rank(ours, {leaf: tuple(value.shape) for leaf, value in entry.items()})
        if file_dim is not None and file_dim != dim and not adapters.lokr_full(layer, adapter_name):
            raise UserError(dim_key, f"is {dim} but {source} has rank {file_dim} ({key}).",
                            f"Set {dim_key}={file_dim}.")
        wanted = {leaf for leaf in targets}
        if set(entry) - {ALPHA} != wanted:
            lacking = sorted(wanted - set(entry))
            if ours == adapters.LOKR:
                raise UserError(source, f"{key} has the LoKr tensors {', '.join(sorted(set(entry) - {ALPHA}))}, "
                                f"this network needs {', '.join(sorted(wanted))}.",
                                "Match network.dim and network.lokr_factor to the file's factorisation.")
            raise UserError(source, f"{key} lacks {', '.join(lacking)}.")
        if not adapters.lokr_full(layer, adapter_name):
            module_alpha = adapters.alpha(layer, adapter_name)
            file_alpha = float(entry[ALPHA].float().item()) if ALPHA in entry else float(file_dim or dim)
            # Compare in the file's dtype: an fp16/bf16 file stores alpha rounded, so 0.1 must still match 0.1.
            alpha_dtype = entry[ALPHA].dtype if ALPHA in entry else torch.float32
            if torch.tensor(module_alpha, dtype=alpha_dtype).float().item() != file_alpha:
                raise UserError(
                    alpha_key,
                    f"is {module_alpha:g} but {source} was trained with alpha {file_alpha:g}.",
                    f"Set {alpha_key}={file_alpha:g} so the LoRA keeps its scale alpha/dim.",
                )
        for leaf, (param, shape) in targets.items():
            value = entry[leaf]
            if tuple(value.shape) != shape:
                raise UserError(
                    source,
                    f"{key}.{leaf} has shape {tuple(value.shape)}, the model needs {shape}.",
                    "Was it trained for a different base model?",
                )
            staged.append((param, value.reshape(param.shape)))
    with torch.no_grad():
        for param, value in staged:
            param.copy_(value.to(device=param.device, dtype=param.dtype))


_SPATIAL_KEY = re.compile(r"_resnets_\d+_conv[12]$|_(down|up)samplers_\d+_conv$")
"""kohya keys of the SD UNet's 3×3 convolutions, the modules LoCon's ``conv_dim`` governs."""


def check_lora_header(path: Path | str, cfg: NetworkConfig, key: str = "network.init_weights") -> None:
    """Preflight of an init file against ``cfg`` from the safetensors header alone (no tensor is read): readable,
    kohya/LyCORIS keys, the same algorithm (``network.algo``, ``network.dora``) and ranks (``network.dim`` for
    Linear and 1×1 modules, ``network.conv_dim`` for 3×3 convolutions). A bad file would otherwise stop the run
    after the base model has loaded; :func:`from_kohya_state_dict` checks everything else (modules, alphas,
    shapes) when the weights are copied in."""
    path = Path(path).expanduser()
    hint = "Point it at a kohya-format LoRA .safetensors file (e.g. a run's lora/lora.safetensors), or set it to null."
    try:
        with safe_open(str(path), framework="pt") as handle:
            shapes = {name: handle.get_slice(name).get_shape() for name in handle.keys()  # noqa: SIM118
                      if name.startswith(("lora_unet_", "lora_te"))}
    except (SafetensorError, OSError, ValueError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(key, f"{path} is not a readable .safetensors file ({detail}); it may be truncated or "
                        "damaged.", hint) from None
    modules: dict[str, dict[str, list[int]]] = {}
    for name, shape in shapes.items():
        module, _, leaf = name.partition(".")
        if leaf in adapters.LEAF_KIND:
            modules.setdefault(module, {})[leaf] = shape
    if not modules:
        raise UserError(key, f"{path} holds no kohya LoRA weights (no lora_unet_*/lora_te* LoRA, LoHa or LoKr "
                        "tensors).", hint)
    kinds = {adapters.LEAF_KIND[leaf] for entry in modules.values() for leaf in entry}
    if kinds != {cfg.algo}:
        found = " and ".join(adapters.KIND_NAMES[k] for k in sorted(kinds))
        raise UserError(key, f"{path} holds a {found}, but network.algo is {cfg.algo}.",
                        f"Set network.algo={sorted(kinds)[0]} to continue from it, or leave network.init_weights "
                        "null.")
    dora = any(adapters.DORA_SCALE in entry for entry in modules.values())
    if dora != cfg.dora:
        raise UserError(key, f"{path} {'is' if dora else 'is not'} a DoRA (dora_scale tensors), but network.dora "
                        f"is {str(cfg.dora).lower()}.", f"Set network.dora={str(dora).lower()} to continue from it.")
    ranks: dict[bool, set[int]] = {False: set(), True: set()}
    for module, entry in modules.items():
        rank = adapters.file_rank(cfg.algo, entry)
        if rank is not None:
            ranks[bool(module.startswith("lora_unet_") and _SPATIAL_KEY.search(module))].add(rank)
    for spatial, dim_key, dim in ((False, "network.dim", cfg.dim), (True, "network.conv_dim", cfg.conv_dim)):
        found = ranks[spatial]
        if found and found != {dim}:
            label = "rank" if not spatial else "3×3 conv (LoCon) rank"
            raise UserError(key, f"{path} has {label} {', '.join(map(str, sorted(found)))}, but {dim_key} is "
                            f"{'null' if dim is None else dim}.",
                            f"Set {dim_key}={max(found)} to continue from that LoRA, or leave network.init_weights "
                            "null.")


LORA_FORMATS = ("safetensors", "ckpt", "pt")
"""Formats :func:`save_lora` writes (``output.format``); the last two are pickles, written on request only."""

_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default container


def _check_metadata(metadata: Mapping[str, str] | None) -> None:
    if metadata is None:
        return
    bad = {k: type(v).__name__ for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
        raise TypeError(f"safetensors metadata keys and values must be str, got {bad}")


def _contiguous(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in tensors.items()}


def _write_new(path: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` and move the result to ``path``, atomically and never over an existing file.

    The bytes go to a hidden temp name beside ``path`` first, so a crash or a full disk leaves either no
    file or the complete one, never a truncated LoRA that loads as garbage later. The temp file is then
    hard-linked to ``path``, which fails if ``path`` exists, so not even a concurrent writer can be
    overwritten (where the file system has no hard links: an existence check, then ``os.replace``). An
    existing ``path`` is a ``UserError``: LoRA files are results, and silently replacing one (a re-run
    writing into the same folder) would destroy a trial's output.
    """

    def refuse() -> UserError:
        return UserError(str(path), "already exists; refusing to overwrite a saved LoRA.",
                         "Choose a new output folder or name, or delete the file.")

    if path.exists():
        raise refuse()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        try:
            write(tmp)
            _faults.on_write(path, tmp)
        except OSError as exc:
            raise (storage_error(path, exc) or exc) from exc
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise refuse() from None
        except OSError:
            if path.exists():
                raise refuse() from None
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_lora_file(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``tensors`` and exactly ``metadata`` as safetensors at ``path`` (atomic, never overwrites).

    The raw writer: no extension handling and no hashes added. Trained LoRAs go through :func:`save_lora`.
    """
    _check_metadata(metadata)
    _write_new(Path(path), lambda tmp: save_file(_contiguous(tensors), str(tmp), metadata=dict(metadata or {})
                                                  or None))


def kohya_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> tuple[str, str]:
    """(``sshs_model_hash``, ``sshs_legacy_hash``) exactly as kohya's ``precalculate_safetensors_hashes``.

    Both are computed over the safetensors serialisation of ``tensors`` with only the ``ss_*`` part of
    ``metadata`` (user keys added later must not change them): the model hash is the SHA-256 of everything
    after the header (the tensor bytes, so it equals the data-section hash of the file actually written),
    the legacy hash is the first 8 hex digits of the SHA-256 of the 64 KiB at offset 1 MiB (of nothing, for
    files under 1 MiB). A1111's additional-networks extension uses them to index LoRAs without rehashing.
    """
    training = {k: v for k, v in (metadata or {}).items() if k.startswith("ss_")}
    blob = safetensors.torch.save(_contiguous(tensors), training)
    header_len = int.from_bytes(blob[:8], "little")
    model_hash = hashlib.sha256(blob[8 + header_len:]).hexdigest()
    legacy_hash = hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


def lora_path(path: Path | str, fmt: str) -> Path:
    """``path`` with the extension of ``fmt`` (kept when it already has it: ``lora`` and ``lora.safetensors``
    both give ``lora.safetensors``; a dot inside a name such as ``v1.2`` is not taken for an extension)."""
    if fmt not in LORA_FORMATS:
        raise ValueError(f"unknown LoRA format {fmt!r}; use one of {LORA_FORMATS}")
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == f".{fmt}":
        return path
    if suffix in (".safetensors", *_PICKLE_SUFFIXES):
        raise ValueError(f"{path} has the extension {path.suffix} but the format is {fmt}")
    return path.with_name(f"{path.name}.{fmt}")


def save_lora(
    path: Path | str,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None,
    fmt: str = "safetensors",
) -> Path:
    """Write a trained LoRA as kohya does, atomically and never over an existing file; return its path.

    ``path`` may omit the extension (see :func:`lora_path`). ``tensors`` are saved in the dtype they have
    (``precision.save`` is applied when exporting, :meth:`LoraNetwork.state_dict`).

    * ``safetensors``: ``metadata`` (the ``ss_*`` keys of :func:`~lorasweep.network.metadata.kohya_metadata`;
      empty or None for ``output.no_metadata``) plus ``sshs_model_hash``/``sshs_legacy_hash``, which kohya
      adds to every safetensors LoRA, also without metadata.
    * ``ckpt``/``pt``: ``torch.save`` of the plain state dict, as kohya writes them. Pickles have no header,
      so the metadata is dropped, again as in kohya.
    """
    target = lora_path(path, fmt)
    _check_metadata(metadata)
    contiguous = _contiguous(tensors)
    if fmt == "safetensors":
        header = dict(metadata or {})
        header["sshs_model_hash"], header["sshs_legacy_hash"] = kohya_hashes(contiguous, header)
        _write_new(target, lambda tmp: save_file(contiguous, str(tmp), metadata=header))
    else:
        if metadata:
            log.info("%s: the %s format has no header; %d metadata keys are not saved", target, fmt, len(metadata))
        _write_new(target, lambda tmp: torch.save(contiguous, tmp))
    return target


def export_copy(src: Path | str, dest: Path | str) -> Path:
    """Copy a saved LoRA to ``dest`` (``output.export_dir``) with the same guarantees as :func:`save_lora`:
    complete or absent, never over an existing file. Returns ``dest``."""
    dest = Path(dest)
    _write_new(dest, lambda tmp: shutil.copyfile(src, tmp))
    return dest


def _pickle_refusal(path: Path) -> UserError:
    return UserError(
        str(path),
        "is a pickled checkpoint (.ckpt/.pt); lorasweep never loads pickles, because unpickling a file can "
        "run arbitrary code.",
        "Use the LoRA's .safetensors release, or convert the file with a tool you trust.",
    )


def load_lora_file(path: Path | str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors on CPU, metadata) of a safetensors LoRA.

    A missing or unreadable file is a ``UserError``; so is a pickle (``.ckpt``/``.pt``, or a torch zip
    under another name), which is never opened as one.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(str(path), "no such LoRA file.", "Check the path (it must be a .safetensors file).")
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise _pickle_refusal(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        with path.open("rb") as fh:
            if fh.read(4) == _ZIP_MAGIC:
                raise _pickle_refusal(path) from exc
        raise UserError(
            str(path),
            f"is not a readable safetensors file ({exc}).",
            "Was the file truncated, or is it a .ckpt/.pt pickle?",
        ) from exc
    return tensors, metadata
