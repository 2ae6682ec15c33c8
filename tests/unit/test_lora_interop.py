"""Our LoRA files against independent readers and writers, on the project's own (untrained) tiny SD-1.x model.

* A LoRA saved by :func:`save_lora` (safetensors with full kohya metadata, and the ``pt`` pickle) loaded by
  diffusers' ``load_lora_weights`` gives the same UNet and text-encoder outputs as our peft-injected model.
* ``network.init_weights`` (:func:`init_from_file`) reproduces a saved file's tensors bit for bit.
* A file written by kohya's conventions, built here from the key spec rather than by our writer (fp16,
  0-dim fp16 alphas, some alphas missing), loads into our network and into diffusers with equal outputs,
  and every mismatch with the config is a ``UserError`` naming the key or the file.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file
from torch import nn

from lorasweep.config.network import NetworkConfig
from lorasweep.config.train import TrainConfig
from lorasweep.errors import UserError
from lorasweep.network.kohya import kohya_hashes, load_lora_file, save_lora
from lorasweep.network.lora import LoraNetwork, init_from_file, inject_lora
from lorasweep.network.metadata import TrainingFacts, kohya_metadata

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tiny_dir(untrained_tiny: Path) -> Path:
    return untrained_tiny


DIM = 4
TE_LEAVES = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")


def _load(folder: Path) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(
        str(folder), safety_checker=None, requires_safety_checker=False, local_files_only=True
    )


@pytest.fixture(scope="module")
def inputs(tiny_dir: Path) -> dict[str, torch.Tensor]:
    pipe = _load(tiny_dir)
    g = torch.Generator().manual_seed(99)
    size = pipe.unet.config.sample_size
    ids = pipe.tokenizer(["a red circle on a blue square"], padding="max_length", truncation=True,
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    return {
        "latents": torch.randn(2, 4, size, size, generator=g),
        "timestep": torch.tensor([50, 700]),
        "context": torch.randn(2, 5, pipe.unet.config.cross_attention_dim, generator=g),
        "input_ids": ids,
    }


@torch.no_grad()
def _outputs(pipe_or_net: StableDiffusionPipeline | LoraNetwork, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor,
                                                                                                       torch.Tensor]:
    unet, te = pipe_or_net.unet, pipe_or_net.text_encoder
    return (unet(x["latents"], x["timestep"], encoder_hidden_states=x["context"]).sample,
            te(x["input_ids"])[0])


def _max_diff(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(a, b, strict=True))


@torch.no_grad()
def _randomise_fp16_exact(net: LoraNetwork, seed: int = 3) -> None:
    """Non-zero LoRA weights, as if trained, that an fp16 file stores exactly (so outputs can be compared
    with a model loaded from the fp16 file without rounding slack)."""
    g = torch.Generator().manual_seed(seed)
    for p in net.unet_params() + net.text_encoder_params():
        p.copy_((torch.randn(p.shape, generator=g) * 0.2).half().float())


def _facts() -> TrainingFacts:
    return TrainingFacts(model_id="tiny", num_train_images=8, num_batches_per_epoch=2, num_epochs=1, epoch=1,
                         max_train_steps=2, warmup_steps=0, started_at=1.0, tag_frequency={"1_x": {"x": 1}},
                         dataset_dirs={"1_x": {"n_repeats": 1, "img_count": 8}})


def _n_lora(model: nn.Module) -> int:
    return sum(isinstance(m, BaseTunerLayer) for m in model.modules())


@pytest.fixture(scope="module")
def saved(tiny_dir: Path, inputs: dict[str, torch.Tensor], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Our trained-looking LoRA (kohya target, both components, dim 4, alpha 2) saved as fp16 safetensors
    with full metadata and as a ``pt`` pickle, plus the injected model's outputs."""
    cfg = TrainConfig()
    cfg.network = NetworkConfig(dim=DIM, alpha=2)
    pipe = _load(tiny_dir)
    base = _outputs(pipe, inputs)
    net = inject_lora(pipe.unet, pipe.text_encoder, cfg.network, seed=0)
    assert (len(net.unet_modules), len(net.text_encoder_modules)) == (48, 12)
    _randomise_fp16_exact(net)
    out = tmp_path_factory.mktemp("saved")
    tensors = net.state_dict(dtype=cfg.precision.save)
    metadata = kohya_metadata(cfg, _facts())
    files = {fmt: save_lora(out / cfg.output.name, tensors, metadata, fmt) for fmt in ("safetensors", "pt")}
    result = {"cfg": cfg, "base": base, "want": _outputs(pipe, inputs), "tensors": tensors, "metadata": metadata,
              "files": files}
    net.remove()
    return result


# (a) diffusers reads what we write ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_diffusers_loads_our_file_with_our_outputs(fmt: str, saved: dict, tiny_dir: Path, inputs: dict) -> None:
    path = saved["files"][fmt]
    assert path.suffix == f".{fmt}"
    pipe = _load(tiny_dir)
    if fmt == "safetensors":
        pipe.load_lora_weights(str(path))
    else:  # a pickle: only the test loads it, to show it is the same plain kohya state dict
        pipe.load_lora_weights(torch.load(path, weights_only=True))
    assert (_n_lora(pipe.unet), _n_lora(pipe.text_encoder)) == (48, 12)
    got = _outputs(pipe, inputs)
    assert _max_diff(got, saved["want"]) < 1e-5
    # and the LoRA really acts on both components
    assert float((got[0] - saved["base"][0]).abs().max()) > 1e-3
    assert float((got[1] - saved["base"][1]).abs().max()) > 1e-3


def test_saved_safetensors_header(saved: dict) -> None:
    tensors, header = load_lora_file(saved["files"]["safetensors"])
    assert all(t.dtype == torch.float16 for t in tensors.values())  # precision.save default: fp16
    assert {k: header[k] for k in saved["metadata"]} == saved["metadata"]
    assert (header["sshs_model_hash"], header["sshs_legacy_hash"]) == kohya_hashes(tensors, saved["metadata"])
    assert header["ss_network_dim"] == str(DIM) and header["ss_network_alpha"] == "2.0"
    conv = "lora_unet_down_blocks_0_attentions_0_proj_in"
    assert tensors[f"{conv}.lora_down.weight"].shape[2:] == (1, 1)
    assert tensors[f"{conv}.alpha"].ndim == 0


# (b) network.init_weights ------------------------------------------------------------------------------


def test_init_from_file_reproduces_the_file(saved: dict, tiny_dir: Path, inputs: dict) -> None:
    path = saved["files"]["safetensors"]
    pipe = _load(tiny_dir)
    net = inject_lora(pipe.unet, pipe.text_encoder, saved["cfg"].network, seed=123)
    metadata = init_from_file(net, path)
    assert metadata["ss_network_module"] == "networks.lora" and "sshs_model_hash" in metadata
    again = net.state_dict(dtype="fp16")
    assert again.keys() == saved["tensors"].keys()
    assert all(torch.equal(again[k], v) for k, v in saved["tensors"].items())
    as_float = net.state_dict(dtype="float")
    assert all(torch.equal(as_float[k], v.float()) for k, v in saved["tensors"].items())
    assert _max_diff(_outputs(pipe, inputs), saved["want"]) == 0.0
    with pytest.raises(UserError, match="never loads pickles"):
        init_from_file(net, saved["files"]["pt"])
    net.remove()


# (c) a file written by kohya's conventions -------------------------------------------------------------


def _kohya_unet_modules(unet: nn.Module) -> dict[str, nn.Module]:
    """kohya's rule, independently: every Linear and 1×1 Conv2d inside a Transformer2DModel."""
    found: dict[str, nn.Module] = {}
    for name, module in unet.named_modules():
        if type(module).__name__ != "Transformer2DModel":
            continue
        for child_name, child in module.named_modules():
            if isinstance(child, nn.Linear) or (isinstance(child, nn.Conv2d) and child.kernel_size == (1, 1)):
                found["lora_unet_" + f"{name}.{child_name}".replace(".", "_")] = child
    return found


def _kohya_file(pipe: StableDiffusionPipeline, path: Path, *, dim: int = DIM, with_te: bool = True) -> dict:
    """A LoRA as sd-scripts saves it with ``--save_precision fp16``: fp16 weights, 0-dim fp16 alphas (every
    third module without one, which means alpha = dim), kohya's key names and metadata."""
    g = torch.Generator().manual_seed(11)
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    for key, module in _kohya_unet_modules(pipe.unet).items():
        if isinstance(module, nn.Conv2d):
            shapes[key] = ((dim, module.in_channels, 1, 1), (module.out_channels, dim, 1, 1))
        else:
            shapes[key] = ((dim, module.in_features), (module.out_features, dim))
    if with_te:
        te = pipe.text_encoder.config
        for i in range(te.num_hidden_layers):
            for leaf in TE_LEAVES:
                n_in = te.intermediate_size if leaf == "mlp_fc2" else te.hidden_size
                n_out = te.intermediate_size if leaf == "mlp_fc1" else te.hidden_size
                shapes[f"lora_te_text_model_encoder_layers_{i}_{leaf}"] = ((dim, n_in), (n_out, dim))
    tensors: dict[str, torch.Tensor] = {}
    for i, (key, (down, up)) in enumerate(shapes.items()):
        tensors[f"{key}.lora_down.weight"] = (torch.randn(down, generator=g) * 0.2).half()
        tensors[f"{key}.lora_up.weight"] = (torch.randn(up, generator=g) * 0.2).half()
        if i % 3:
            tensors[f"{key}.alpha"] = torch.tensor(float(dim), dtype=torch.float16)
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(dim), "ss_network_alpha": f"{dim:.1f}",
                "ss_v2": "False", "ss_base_model_version": "sd_v1", "ss_session_id": "3141592653",
                "ss_output_name": "kohya", "ss_tag_frequency": "{}"}
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = kohya_hashes(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)
    return tensors


def test_kohya_written_file_loads_into_ours_and_diffusers(tiny_dir: Path, inputs: dict, tmp_path: Path) -> None:
    ours = _load(tiny_dir)
    base = _outputs(ours, inputs)
    path = tmp_path / "kohya_lora.safetensors"
    tensors = _kohya_file(ours, path)
    assert len(tensors) == 48 * 3 + 12 * 3 - (48 + 12 + 2) // 3  # some alphas missing

    net = inject_lora(ours.unet, ours.text_encoder, NetworkConfig(dim=DIM), seed=0)  # alpha null = dim
    init_from_file(net, path)
    exported = net.state_dict(dtype="fp16")
    assert all(torch.equal(exported[k], v) for k, v in tensors.items())
    assert exported.keys() == {*tensors, *(k.replace("lora_down.weight", "alpha") for k in tensors
                                          if k.endswith("lora_down.weight"))}
    want = _outputs(ours, inputs)
    assert _max_diff(want, base) > 1e-3

    theirs = _load(tiny_dir)
    theirs.load_lora_weights(str(path))
    assert _max_diff(_outputs(theirs, inputs), want) < 1e-5
    net.remove()


def test_mismatched_files_are_user_errors(tiny_dir: Path, tmp_path: Path) -> None:
    pipe = _load(tiny_dir)
    path = tmp_path / "kohya_lora.safetensors"
    _kohya_file(pipe, path)
    unet_only = tmp_path / "unet_only.safetensors"
    _kohya_file(pipe, unet_only, with_te=False)

    def refused(cfg: NetworkConfig, file: Path, where: str, text: str) -> None:
        net = inject_lora(pipe.unet, pipe.text_encoder, cfg, seed=0)
        with pytest.raises(UserError) as err:
            init_from_file(net, file)
        assert err.value.where == where and text in str(err.value), str(err.value)
        assert all(float(p.detach().abs().sum()) == 0 for p in net.unet_params()[1::2])  # nothing was loaded
        net.remove()

    refused(NetworkConfig(dim=8), path, "network.dim", "rank 4")
    refused(NetworkConfig(dim=DIM, alpha=2), path, "network.alpha", "alpha 4")
    refused(NetworkConfig(dim=DIM, train_text_encoder=False), path, str(path), "does not adapt")
    refused(NetworkConfig(dim=DIM, target="attention"), path, str(path), "does not adapt")
    refused(NetworkConfig(dim=DIM), unet_only, str(unet_only), "has no weights for 12")
    # the same UNet-only file is right for a UNet-only network
    net = inject_lora(pipe.unet, pipe.text_encoder, NetworkConfig(dim=DIM, train_text_encoder=False), seed=0)
    init_from_file(net, unet_only)
    net.remove()
