"""training.cpu_conv_kernels: which CPU convolution kernels the UNet and the VAE run on, and that the
process-wide switch is put back (a reused worker must not carry one run's choice into the next)."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from lorasweep.training.kernels import ConvKernels

CPU = torch.device("cpu")


def _conv_ops(fn: object) -> set[str]:
    """The ATen convolution kernels that ran inside ``fn`` (forward and backward)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()  # type: ignore[operator]
    return {e.key for e in prof.key_averages() if "conv" in e.key and e.key.startswith("aten::")}


def _conv_pass(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    conv(x).square().sum().backward()
    assert x.grad is not None
    return x.grad


@pytest.mark.parametrize(("setting", "mixed", "device", "expected"), [
    ("auto", "no", CPU, {"unet": "native", "vae": "onednn"}),
    ("auto", "bf16", CPU, {"unet": "default", "vae": "onednn"}),
    ("onednn", "no", CPU, {"unet": "onednn", "vae": "onednn"}),
    ("native", "bf16", CPU, {"unet": "native", "vae": "native"}),
    ("auto", "no", torch.device("cuda"), {"unet": "default", "vae": "default"}),
    ("native", "fp16", torch.device("cuda"), {"unet": "default", "vae": "default"}),
])
def test_choice_per_model(setting: str, mixed: str, device: torch.device, expected: dict[str, str]) -> None:
    assert ConvKernels(setting, device, mixed).describe() == expected


def test_contexts_switch_the_kernels_and_put_the_flag_back() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(64, 64, 3, padding=1).requires_grad_(False)  # frozen, as the base is
    x = torch.randn(1, 64, 32, 32)  # PyTorch's heuristic leaves very small maps off oneDNN anyway
    kernels = ConvKernels("auto", CPU, "no")
    before = torch.backends.mkldnn.enabled
    assert before  # PyTorch's default on a CPU build with oneDNN

    with kernels.unet():
        assert torch.backends.mkldnn.enabled is False
        native = _conv_ops(lambda: _conv_pass(conv, x))
        with kernels.vae():
            assert torch.backends.mkldnn.enabled is True
            onednn = _conv_ops(lambda: _conv_pass(conv, x))
        assert torch.backends.mkldnn.enabled is False
    assert torch.backends.mkldnn.enabled is before
    assert "aten::_slow_conv2d_forward" in native and "aten::mkldnn_convolution" not in native
    assert "aten::mkldnn_convolution" in onednn and "aten::_slow_conv2d_forward" not in onednn

    with pytest.raises(RuntimeError), kernels.unet():
        raise RuntimeError("a failing run")
    assert torch.backends.mkldnn.enabled is before


def test_native_and_onednn_agree_to_float_rounding() -> None:
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(32, 48, 3, padding=1).requires_grad_(False)
    x = torch.randn(2, 32, 16, 16)
    with ConvKernels("native", CPU, "no").unet():
        native = (conv(x), _conv_pass(conv, x))
    with ConvKernels("onednn", CPU, "no").unet():
        onednn = (conv(x), _conv_pass(conv, x))
    for a, b in zip(native, onednn, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_unknown_setting_is_refused() -> None:
    with pytest.raises(ValueError, match="cpu_conv_kernels"):
        ConvKernels("fast", CPU, "no")
