"""The ``training`` group: the loop's length, batch, seed and device."""

from __future__ import annotations

from dataclasses import dataclass

from lorasweep.config._checks import check_choice, check_range
from lorasweep.errors import UserError

DEVICES = ("auto", "cpu", "cuda")
ATTENTION = ("sdpa", "xformers", "eager")
CPU_CONV_KERNELS = ("auto", "onednn", "native")


@dataclass
class TrainingConfig:
    """Loop settings. kohya: ``--max_train_steps``, ``--max_train_epochs``, ``--train_batch_size``,
    ``--gradient_accumulation_steps``, ``--seed``."""

    max_steps: int | None = 300
    """Total optimizer steps; overrides ``epochs`` when set."""

    epochs: int = 1
    """Passes over the repeated data set; used when ``max_steps`` is null."""

    batch_size: int = 4
    """Images per micro-step."""

    grad_accum_steps: int = 1
    """Micro-steps per optimizer step (effective batch = batch_size × grad_accum_steps)."""

    max_grad_norm: float | None = 1.0
    """Clip the gradient norm of the LoRA parameters to this value; null = no clipping."""

    seed: int = 42
    """The training seed (LoRA init, data order, noise, timesteps). Seed name ``test_seed``."""

    device: str = "auto"
    """``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda``."""

    attention: str = "sdpa"
    """UNet attention backend: ``sdpa`` (PyTorch scaled_dot_product_attention), ``xformers`` (needs the
    xformers package and CUDA) or ``eager``. Seed: ``xformers``."""

    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory (slower: about one more forward pass)."""

    channels_last: bool | None = None
    """UNet convolutions in NHWC memory layout. null = on CUDA only, where cuDNN's tensor-core convolutions
    want NHWC; on CPU oneDNN's default layout was measured as fast or faster. Values are unchanged, only the
    layout (no kohya equivalent)."""

    cpu_conv_kernels: str = "auto"
    """CPU convolution kernels. ``auto``: per call, PyTorch's native kernel (im2col + BLAS) where batch ×
    pixels is small (≤ 256) and the weight large (≥ 1 M elements), oneDNN elsewhere — oneDNN re-converts
    every frozen weight on each call, which dominates on small maps (SD-1.5 UNet at 256 px, batch 1, 2-core
    AVX2 CPU: forward + backward ≈3.4–3.9 s vs 4.1–6.4 s with oneDNN throughout). ``onednn``: PyTorch's
    default. ``native``: oneDNN off. ``auto`` applies to float32 CPU runs only; CUDA is never touched.
    Results differ only by float rounding (no kohya equivalent)."""

    compile: bool = False
    """``torch.compile`` the UNet forward (diffusers' ``--enable_compile``-style). The first steps pay the
    compilation (minutes for SD-size models, and a C++ compiler on CPU); it pays off for long runs on CUDA."""

    prior_loss_weight: float = 1.0
    """Weight of the loss on regularisation images (``data.reg_dir``), DreamBooth prior preservation."""

    log_every_n_steps: int = 10
    """How often loss, learning rates and throughput are logged (and the only host-device syncs)."""

    def validate(self, key: str = "training") -> None:
        if self.max_steps is not None:
            check_range(f"{key}.max_steps", self.max_steps, low=1)
        check_range(f"{key}.epochs", self.epochs, low=1)
        check_range(f"{key}.batch_size", self.batch_size, low=1)
        check_range(f"{key}.grad_accum_steps", self.grad_accum_steps, low=1)
        if self.max_grad_norm is not None:
            check_range(f"{key}.max_grad_norm", self.max_grad_norm, low=0.0, low_inclusive=False)
        check_range(f"{key}.seed", self.seed, low=0, high=2**32 - 1)
        check_choice(f"{key}.device", self.device, DEVICES)
        check_choice(f"{key}.attention", self.attention, ATTENTION)
        check_choice(f"{key}.cpu_conv_kernels", self.cpu_conv_kernels, CPU_CONV_KERNELS)
        check_range(f"{key}.log_every_n_steps", self.log_every_n_steps, low=1)
        check_range(f"{key}.prior_loss_weight", self.prior_loss_weight, low=0.0)
        if self.attention == "xformers":
            import importlib.util

            if importlib.util.find_spec("xformers") is None:
                raise UserError(f"{key}.attention", "is xformers but the xformers package is not installed.",
                                "Use `training.attention=sdpa` (PyTorch's fused attention, as fast on current "
                                "PyTorch) or `pip install xformers` matching your torch and CUDA.")
            if self.device == "cpu":
                raise UserError(f"{key}.attention", "xformers needs a CUDA device; training.device is cpu.",
                                "Use `training.attention=sdpa`.")
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise UserError(f"{key}.device", "cuda was asked for but no CUDA device is visible.",
                                "Use `training.device=auto` or `training.device=cpu`.")
