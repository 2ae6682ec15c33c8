"""training.cpu_conv_kernels: which CPU convolution kernels run, decided per call by size under ``auto``,
and that the process-wide switches are put back (a reused worker must not carry one run's choice on)."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from lorasweep.training.kernels import (
    NATIVE_MAX_POSITIONS,
    NATIVE_MIN_WEIGHT,
    WINOGRAD_MAX_THREADS,
    WINOGRAD_MIN_POSITIONS,
    WINOGRAD_MIN_WEIGHT,
    conv_kernels,
    kernel_mode,
    kernels_tag,
)

CPU = torch.device("cpu")
NATIVE = "aten::_slow_conv2d_forward"
ONEDNN = "aten::mkldnn_convolution"
WINOGRAD = "aten::_nnpack_spatial_convolution"


def _kernels_of(conv: torch.nn.Module, x: torch.Tensor) -> set[str]:
    """The ATen convolution kernels of one forward + backward (input gradient of a frozen conv)."""
    x = x.clone().requires_grad_(True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        conv(x).square().sum().backward()
    return {e.key for e in prof.key_averages() if e.key.startswith("aten::") and "conv" in e.key}


@pytest.mark.parametrize(("setting", "mixed", "device", "expected"), [
    ("auto", "no", CPU, "size"),
    ("auto", "bf16", CPU, "default"),
    ("onednn", "no", CPU, "onednn"),
    ("native", "bf16", CPU, "native"),
    ("auto", "no", torch.device("cuda"), "default"),
    ("native", "fp16", torch.device("cuda"), "default"),
])
def test_mode_per_run(setting: str, mixed: str, device: torch.device, expected: str) -> None:
    assert kernel_mode(setting, device, mixed) == expected


def test_auto_picks_the_kernel_per_call_by_size_and_puts_everything_back() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(512, 256, 3, padding=1).requires_grad_(False)  # frozen, as the base is
    small = torch.randn(4, 512, 8, 8)  # 256 positions
    large = torch.randn(1, 512, 32, 32)  # 1024 positions
    assert small.shape[0] * small.shape[2] * small.shape[3] <= NATIVE_MAX_POSITIONS
    assert conv.weight.numel() >= NATIVE_MIN_WEIGHT
    light = torch.nn.Conv2d(64, 64, 3, padding=1).requires_grad_(False)  # small weight: oneDNN converts it cheaply
    forward, flag = torch.nn.Conv2d._conv_forward, torch.backends.mkldnn.enabled
    assert ONEDNN in _kernels_of(conv, small)  # PyTorch's own choice for both sizes

    with conv_kernels("auto", CPU, "no") as applied:
        assert applied == {"mode": "size", "native_max_positions": NATIVE_MAX_POSITIONS,
                           "native_min_weight": NATIVE_MIN_WEIGHT, "winograd_min_positions": WINOGRAD_MIN_POSITIONS,
                           "winograd_min_weight": WINOGRAD_MIN_WEIGHT}
        on_small, on_large = _kernels_of(conv, small), _kernels_of(conv, large)
        on_light = _kernels_of(light, torch.randn(4, 64, 8, 8))
    assert ONEDNN in on_light and NATIVE not in on_light
    assert NATIVE in on_small and ONEDNN not in on_small
    assert "aten::_slow_conv2d_backward" in on_small  # the backward follows the forward's kernel
    assert ONEDNN in on_large and NATIVE not in on_large
    assert torch.nn.Conv2d._conv_forward is forward and torch.backends.mkldnn.enabled is flag

    with conv_kernels("native", CPU, "no"):
        assert torch.backends.mkldnn.enabled is False
        assert ONEDNN not in _kernels_of(conv, large)
    with pytest.raises(RuntimeError), conv_kernels("auto", CPU, "no"):
        raise RuntimeError("a run that fails")
    assert torch.nn.Conv2d._conv_forward is forward and torch.backends.mkldnn.enabled is flag


def test_native_and_onednn_agree_to_float_rounding() -> None:
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(32, 48, 3, padding=1, stride=2)
    x = torch.randn(2, 32, 8, 8)

    def run(setting: str) -> list[torch.Tensor]:
        conv.zero_grad()
        inputs = x.clone().requires_grad_(True)
        with conv_kernels(setting, CPU, "no"):
            out = conv(inputs)
            out.square().sum().backward()
        assert inputs.grad is not None and conv.weight.grad is not None
        return [out.detach(), inputs.grad, conv.weight.grad.clone()]

    for a, b in zip(run("auto"), run("onednn"), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_unknown_setting_is_refused() -> None:
    with pytest.raises(ValueError, match="cpu_conv_kernels"):
        kernel_mode("fast", CPU, "no")


def _forward_kernels(conv: torch.nn.Module, x: torch.Tensor) -> tuple[set[str], torch.Tensor]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = conv(x)
    return {e.key for e in prof.key_averages() if e.key.startswith("aten::") and "conv" in e.key}, out


def test_auto_runs_winograd_on_large_maps_where_no_gradient_is_needed() -> None:
    """The frozen VAE's case: no_grad, 3×3, stride 1, a large map. Deterministic, within float rounding of
    PyTorch's own kernel; never with a gradient, on small maps, small weights or strided convolutions."""
    torch.manual_seed(2)
    conv = torch.nn.Conv2d(128, 128, 3, padding=1).requires_grad_(False)
    strided = torch.nn.Conv2d(128, 128, 3, padding=1, stride=2).requires_grad_(False)
    light = torch.nn.Conv2d(16, 16, 3, padding=1).requires_grad_(False)
    large = torch.randn(1, 128, 64, 64)
    assert large.shape[2] * large.shape[3] == WINOGRAD_MIN_POSITIONS and conv.weight.numel() >= WINOGRAD_MIN_WEIGHT
    with torch.no_grad():
        reference = conv(large)
    with conv_kernels("auto", CPU, "no") as applied, torch.no_grad():
        used, out = _forward_kernels(conv, large)
        _, again = _forward_kernels(conv, large)
        assert WINOGRAD in used and ONEDNN not in used
        assert WINOGRAD not in _forward_kernels(conv, torch.randn(1, 128, 32, 32))[0]
        assert WINOGRAD not in _forward_kernels(strided, large)[0]
        assert WINOGRAD not in _forward_kernels(light, torch.randn(1, 16, 64, 64))[0]
    assert torch.equal(out, again)
    assert 0 < (out - reference).abs().max() <= 1e-4 * reference.abs().max()
    with conv_kernels("auto", CPU, "no"):
        assert WINOGRAD not in _kernels_of(conv, large)  # training: the input needs its gradient
    with conv_kernels("onednn", CPU, "no"), torch.no_grad():
        assert WINOGRAD not in _forward_kernels(conv, large)[0]
    assert "winograd_min_positions=4096" in kernels_tag(CPU, applied)


def test_no_winograd_in_runs_of_many_threads() -> None:
    """NNPACK's own thread pool beside OpenMP's made it slower at 16 threads: ``auto`` leaves it out there."""
    conv = torch.nn.Conv2d(128, 128, 3, padding=1).requires_grad_(False)
    threads = torch.get_num_threads()
    torch.set_num_threads(WINOGRAD_MAX_THREADS + 1)
    try:
        with conv_kernels("auto", CPU, "no") as applied, torch.no_grad():
            assert applied["mode"] == "size" and "winograd_min_positions" not in applied
            assert WINOGRAD not in _forward_kernels(conv, torch.randn(1, 128, 64, 64))[0]
    finally:
        torch.set_num_threads(threads)


def test_kernels_tag_names_what_encoded() -> None:
    assert kernels_tag(CPU, {"mode": "onednn"}) == kernels_tag(CPU, {"mode": "default"}) == "cpu"
    assert kernels_tag(CPU, {"mode": "native"}) == "cpu:mode=native"
    assert kernels_tag(torch.device("cuda"), {"mode": "default"}) == "cuda"
