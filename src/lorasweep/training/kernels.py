"""Which convolution kernels a CPU run uses for the UNet and for the VAE (``training.cpu_conv_kernels``).

PyTorch runs float32 CPU convolutions through oneDNN by default. oneDNN converts each weight to its blocked
layout on every call (eager mode keeps no converted copy), and with a frozen base every call converts again.
Where feature maps are small — the UNet's 32/16/8/4-pixel latents of a 256 px image — that conversion costs
more than the convolution: measured on a 2-core AVX2 EPYC, the SD-1.5 UNet's convolutions took 3.6 s per
forward + backward with oneDNN and 2.3 s with PyTorch's native kernels (im2col + MKL GEMM), a whole
forward + backward 6.8 s vs 5.0 s. The VAE encoder's 256…32-pixel maps favour oneDNN (2.8 s vs 5.1 s). So
``auto`` picks native kernels for the UNet's float32 passes and leaves the VAE on oneDNN.

The switch is PyTorch's process-wide ``torch.backends.mkldnn.enabled``, read when a convolution (forward or
backward) dispatches; the contexts below set it and put the previous value back, so nothing outlives a run
of a reused worker. CUDA runs are untouched (cuDNN), and so are bf16/fp16 autocast runs under ``auto``,
where native CPU kernels have no fast reduced-precision path.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

import torch

from lorasweep.config.training import CPU_CONV_KERNELS


@contextmanager
def _onednn(enabled: bool | None) -> Iterator[None]:
    """oneDNN convolutions on or off inside the block; ``None`` leaves the flag as it is."""
    if enabled is None:
        yield
        return
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = previous


class ConvKernels:
    """The kernel choice of one run: ``with kernels.unet():`` around UNet passes (forward and backward),
    ``with kernels.vae():`` around VAE encoding/decoding."""

    def __init__(self, setting: str, device: torch.device, mixed: str) -> None:
        if setting not in CPU_CONV_KERNELS:
            raise ValueError(f"cpu_conv_kernels must be one of {CPU_CONV_KERNELS}, not {setting!r}")
        self.unet_onednn: bool | None = None
        self.vae_onednn: bool | None = None
        if device.type != "cpu":
            return
        if setting == "auto":
            self.vae_onednn = True
            self.unet_onednn = None if mixed != "no" else False
        else:
            self.unet_onednn = self.vae_onednn = setting == "onednn"

    def unet(self) -> AbstractContextManager[None]:
        return _onednn(self.unet_onednn)

    def vae(self) -> AbstractContextManager[None]:
        return _onednn(self.vae_onednn)

    def describe(self) -> dict[str, str]:
        """What the run used, for run.json (``default`` = PyTorch's own choice, i.e. not set)."""
        def name(flag: bool | None) -> str:
            return "default" if flag is None else ("onednn" if flag else "native")

        return {"unet": name(self.unet_onednn), "vae": name(self.vae_onednn)}

