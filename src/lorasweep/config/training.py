"""The ``training`` group: the loop's length, batch, seed and device, and the noise and loss knobs of the
diffusion objective (kohya sd-scripts' semantics; :mod:`lorasweep.training.noise` and
:mod:`lorasweep.training.objective` implement them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lorasweep.config._checks import check_choice, check_range
from lorasweep.config.ema import EmaConfig
from lorasweep.errors import UserError

DEVICES = ("auto", "cpu", "cuda")
ATTENTION = ("sdpa", "xformers", "eager")
CPU_CONV_KERNELS = ("auto", "onednn", "native")
LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("snr", "exponential", "constant")
HUBER_LOSSES = ("huber", "smooth_l1")
NUM_TRAIN_TIMESTEPS = 1000
"""The diffusion length of every SD 1.x/2.x scheduler; ``max_timestep``'s upper bound."""


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
    AVX2 CPU: forward + backward ≈3.4–3.9 s vs 4.1–6.4 s with oneDNN throughout; 2-core AVX-512 CPU, whole
    step with cached latents: 3.16 vs 3.95 s); and where no gradient is
    needed (the frozen VAE encoding and decoding, validation), NNPACK's Winograd kernel for 3×3 convolutions
    on maps of ≥ 4096 positions in runs of ≤ 8 threads (SD's VAE at 256 px: encode ≈1.4×, decode ≈1.7×
    faster; at 16 threads NNPACK's own thread pool made it slower). ``onednn``: PyTorch's
    default. ``native``: oneDNN off. ``auto`` applies to float32 CPU runs only; CUDA is never touched.
    Results differ only by float rounding (no kohya equivalent)."""

    compile: bool = False
    """``torch.compile`` the UNet forward (diffusers' ``--enable_compile``-style). The first steps pay the
    compilation (minutes for SD-size models, and a C++ compiler on CPU); it pays off for long runs on CUDA."""

    prior_loss_weight: float = 1.0
    """Weight of the loss on regularisation images (``data.reg_dir``), DreamBooth prior preservation."""

    log_every_n_steps: int = 10
    """How often loss, learning rates and throughput are logged (and the only host-device syncs)."""

    loss_type: str = "l2"
    """Per-element training loss between the UNet's prediction and its target: ``l2`` (squared error),
    ``l1`` (absolute error), ``huber`` (2c·(√(d²+c²) − c): quadratic below c, linear above, robust to the
    outliers of noisy targets) or ``smooth_l1`` (the same without the factor c). The validation loss stays
    plain MSE whatever this is, so runs of a sweep are compared on one measure. kohya: ``--loss_type``."""

    huber_c: float = 0.1
    """The Huber threshold c for ``loss_type`` huber/smooth_l1; with the ``snr`` and ``exponential`` schedules
    the threshold is about 1 at low noise and falls to ``huber_c`` at the last timestep. Refused with l2/l1,
    where it would do nothing. kohya: ``--huber_c``."""

    huber_schedule: str = "snr"
    """How c varies with the timestep t: ``snr`` c(t) = (1 − huber_c)/(1 + σ_t)² + huber_c with
    σ_t = √((1 − ᾱ_t)/ᾱ_t); ``exponential`` c(t) = exp(ln(huber_c)·t/1000)·huber_scale; ``constant``
    c = huber_c·huber_scale. kohya: ``--huber_schedule`` (default snr)."""

    huber_scale: float = 1.0
    """Multiplies c in the ``exponential`` and ``constant`` schedules; not in ``snr``, exactly as kohya
    (``--huber_scale``) does."""

    min_snr_gamma: float | None = None
    """Min-SNR-γ loss weighting (Hang et al. 2023): each sample's loss × min(SNR_t, γ)/SNR_t for an
    ε-prediction model, × min(SNR_t, γ)/(SNR_t + 1) for a v-prediction one, so the low-noise timesteps
    (huge SNR) stop dominating. 5 is the paper's value; null = off. kohya: ``--min_snr_gamma``."""

    debiased_estimation: bool = False
    """Weight each sample's loss by 1/√SNR_t (ε-prediction) or 1/(SNR_t + 1) (v-prediction), SNR capped at
    1000 (Yu et al. 2023). With ``min_snr_gamma`` too, both weights multiply, as kohya applies them in
    sequence. kohya: ``--debiased_estimation_loss``."""

    noise_offset: float = 0.0
    """Offset noise: add noise_offset × N(0, 1) per sample and channel (constant over the image) to the noise,
    so the model learns to change the image's mean brightness (very dark or bright images). About 0.05–0.1
    is usual; 0 = off. kohya: ``--noise_offset``."""

    noise_offset_random_strength: bool = False
    """Draw the offset's strength uniformly from [0, noise_offset) at each step instead of using it as is.
    Needs ``noise_offset``. kohya: ``--noise_offset_random_strength``."""

    adaptive_noise_scale: float = 0.0
    """Add adaptive_noise_scale × |mean of the latent's channel| to the noise offset (clamped at ≥ 0; may be
    negative), so images far from mid-grey get more offset. Needs ``noise_offset``; 0 = off.
    kohya: ``--adaptive_noise_scale``."""

    multires_noise_iterations: int = 0
    """Multi-resolution (pyramid) noise: add this many levels of bilinearly upsampled noise, each drawn at a
    resolution divided by a random factor r ∈ [2, 4) per level and weighted discount^level, then rescale to
    unit std. Like offset noise it teaches low-frequency changes; 6–10 is usual; 0 = off. Not together with
    ``noise_offset``. kohya: ``--multires_noise_iterations``."""

    multires_noise_discount: float = 0.3
    """Weight ratio between successive pyramid levels (level i × discount^i). Needs
    ``multires_noise_iterations``. kohya: ``--multires_noise_discount`` (default 0.3)."""

    ip_noise_gamma: float = 0.0
    """Input perturbation (Ning et al. 2023): the noisy input is built from noise + γ·N(0, 1) while the target
    stays the unperturbed noise (or its v), which reduces the train/sample exposure bias. About 0.1; 0 = off.
    kohya: ``--ip_noise_gamma``."""

    ip_noise_gamma_random_strength: bool = False
    """Draw γ uniformly from [0, ip_noise_gamma) at each step. Needs ``ip_noise_gamma``.
    kohya: ``--ip_noise_gamma_random_strength``."""

    zero_terminal_snr: bool = False
    """Rescale the noise schedule so the last timestep is pure noise (SNR 0; Lin et al. 2023), diffusers'
    ``rescale_betas_zero_snr``, for training and samples (which then use trailing timestep spacing); the
    validation loss keeps the base schedule. Needs a v-prediction model (``model.v_parameterization``): an
    ε-prediction model cannot recover the image from pure noise, and min-SNR-γ would divide by SNR 0; kohya
    only warns. The SNR loss weights use the base schedule's SNR, as kohya computes them before rescaling.
    kohya: ``--zero_terminal_snr``."""

    min_timestep: int = 0
    """Lowest timestep drawn for training (inclusive). kohya: ``--min_timestep``."""

    max_timestep: int = NUM_TRAIN_TIMESTEPS
    """Timesteps are drawn uniformly from [min_timestep, max_timestep) (exclusive); equal values train at that
    one timestep, as kohya does. Restricting the range focuses training on composition (high t) or detail
    (low t). kohya: ``--max_timestep``."""

    ema: EmaConfig = field(default_factory=EmaConfig)
    """An exponential moving average of the LoRA weights (``training.ema.enabled`` …): validation, samples and
    the saved file use the average when it is on."""

    def validate(self, key: str = "training") -> None:
        self.ema.validate(f"{key}.ema")
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
        self._check_objective(key)
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

    def _check_objective(self, key: str) -> None:
        """The noise and loss knobs: ranges, and each combination where one key would do nothing or
        contradict another, refused naming both."""
        check_choice(f"{key}.loss_type", self.loss_type, LOSS_TYPES)
        check_choice(f"{key}.huber_schedule", self.huber_schedule, HUBER_SCHEDULES)
        check_range(f"{key}.huber_c", self.huber_c, low=0.0, low_inclusive=False)
        check_range(f"{key}.huber_scale", self.huber_scale, low=0.0, low_inclusive=False)
        if self.loss_type not in HUBER_LOSSES:
            defaults = TrainingConfig()
            for name in ("huber_c", "huber_schedule", "huber_scale"):
                if getattr(self, name) != getattr(defaults, name):
                    raise UserError(f"{key}.{name}", f"is set to {getattr(self, name)!r}, but {key}.loss_type is "
                                    f"{self.loss_type}: the Huber threshold is used only by the huber and "
                                    "smooth_l1 losses, so it would change nothing.",
                                    f"Set `{key}.loss_type=huber` (or smooth_l1), or leave {key}.{name} at its "
                                    f"default {getattr(defaults, name)!r}.")
        if self.min_snr_gamma is not None:
            check_range(f"{key}.min_snr_gamma", self.min_snr_gamma, low=0.0, low_inclusive=False)
        check_range(f"{key}.noise_offset", self.noise_offset, low=0.0)
        check_range(f"{key}.multires_noise_iterations", self.multires_noise_iterations, low=0)
        check_range(f"{key}.multires_noise_discount", self.multires_noise_discount, low=0.0, high=1.0,
                    low_inclusive=False)
        check_range(f"{key}.ip_noise_gamma", self.ip_noise_gamma, low=0.0)
        check_range(f"{key}.min_timestep", self.min_timestep, low=0, high=NUM_TRAIN_TIMESTEPS - 1)
        check_range(f"{key}.max_timestep", self.max_timestep, low=1, high=NUM_TRAIN_TIMESTEPS)
        if self.min_timestep > self.max_timestep:
            raise UserError(f"{key}.min_timestep", f"{self.min_timestep} is above {key}.max_timestep "
                            f"{self.max_timestep}: timesteps are drawn from [min_timestep, max_timestep).",
                            f"Lower {key}.min_timestep or raise {key}.max_timestep (equal values train at that "
                            "one timestep).")
        needs = (("noise_offset_random_strength", self.noise_offset_random_strength, "noise_offset",
                  self.noise_offset),
                 ("adaptive_noise_scale", self.adaptive_noise_scale, "noise_offset", self.noise_offset),
                 ("multires_noise_discount", self.multires_noise_discount != TrainingConfig.multires_noise_discount,
                  "multires_noise_iterations", self.multires_noise_iterations),
                 ("ip_noise_gamma_random_strength", self.ip_noise_gamma_random_strength, "ip_noise_gamma",
                  self.ip_noise_gamma))
        for name, is_set, base, base_value in needs:
            if is_set and not base_value:
                raise UserError(f"{key}.{name}", f"is set to {getattr(self, name)!r}, but {key}.{base} is "
                                f"{base_value!r} (off), so it would change nothing.",
                                f"Set `{key}.{base}=<value>` too, or leave {key}.{name} at its default.")
        if self.noise_offset and self.multires_noise_iterations:
            raise UserError(f"{key}.noise_offset / {key}.multires_noise_iterations",
                            f"are both set ({self.noise_offset!r}, {self.multires_noise_iterations!r}): they are two "
                            "remedies for the same low-frequency gap, and the pyramid's rescaling to unit std would "
                            "shrink the offset, so neither value means what it documents.",
                            f"Choose one: `{key}.noise_offset=0` or `{key}.multires_noise_iterations=0`.")

    def check_with(self, *, v_parameterization: bool, key: str = "training") -> None:
        """Checks that need the ``model`` group (``model.v_parameterization``); the training scheduler is
        built through it too (:func:`lorasweep.training.noise.training_scheduler`)."""
        if self.zero_terminal_snr and not v_parameterization:
            raise UserError(f"{key}.zero_terminal_snr", "is true but model.v_parameterization is false: with zero "
                            "terminal SNR the last timestep is pure noise, from which an ε-prediction model cannot "
                            "recover the image (and min-SNR weights would divide by SNR 0).",
                            "Use it with a v-prediction base and `model.v_parameterization=true`, or set "
                            f"`{key}.zero_terminal_snr=false` (offset noise, `{key}.noise_offset=0.05`, is the "
                            "ε-model's remedy for too-grey images).")
