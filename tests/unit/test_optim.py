"""Optimizers and precision.

Each optimizer steps a small LoRA-like model (a UNet and a text-encoder group of down/up pairs) to a lower
loss with the learning rates it was given; ``optimizer.args`` are checked against the constructor; a missing
optional package is named with its install command before anything starts; ``ss_optimizer`` reads as kohya
writes it. Precision: bf16 autocast works on the CPU, fp16 does not (accelerate silently trains in float32), so
fp16 without CUDA is refused.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from importlib.machinery import ModuleSpec

import pytest
import torch
from omegaconf import OmegaConf

import lorasweep.config.optimizer as optimizer_config
from lorasweep.app import compose_config
from lorasweep.config import to_train_config
from lorasweep.config.optimizer import OPTIMIZERS, OptimizerConfig
from lorasweep.config.precision import PrecisionConfig
from lorasweep.errors import UserError
from lorasweep.training.optim import build_optimizer, effective_learning_rates, optimizer_description

FEATURES, RANK = 16, 4
pytestmark = pytest.mark.usefixtures("single_thread")


def lora_pair(features: int = FEATURES, dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    """A LoRA module's down and up matrices (both random, so both get gradients on the first step)."""
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(RANK, features, generator=gen, dtype=dtype) / features ** 0.5),
            torch.nn.Parameter(torch.randn(features, RANK, generator=gen, dtype=dtype) / RANK ** 0.5)]


def regression(features: int = FEATURES, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of a rank-2 linear map, which a rank-4 pair can fit exactly."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, features, generator=gen, dtype=dtype)
    w = torch.randn(features, 2, generator=gen, dtype=dtype) @ torch.randn(2, features, generator=gen, dtype=dtype)
    return x, x @ w.T / 4


def pair_loss(pair: list[torch.nn.Parameter], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(x @ pair[0].T @ pair[1].T, y)


def train(cfg: OptimizerConfig, steps: int, features: int = FEATURES) -> tuple[float, float, torch.optim.Optimizer]:
    """Identical UNet and text-encoder pairs (so both groups see identical gradients); losses before and after."""
    unet, text_encoder = lora_pair(features), lora_pair(features)
    x, y = regression(features)
    optimizer = build_optimizer(cfg, unet, text_encoder)
    first = (pair_loss(unet, x, y) + pair_loss(text_encoder, x, y)).item()
    for _ in range(steps):
        loss = pair_loss(unet, x, y) + pair_loss(text_encoder, x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return first, (pair_loss(unet, x, y) + pair_loss(text_encoder, x, y)).item(), optimizer


def first_step(cfg: OptimizerConfig, features: int = FEATURES,
               dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """How far one step moves the UNet pair and the (identical) text-encoder pair (float64 by default, so
    the difference of weights before and after is exact enough to compare steps)."""
    unet, text_encoder = lora_pair(features, dtype), lora_pair(features, dtype)
    before = torch.cat([p.detach().flatten() for p in unet])
    x, y = regression(features, dtype)
    optimizer = build_optimizer(cfg, unet, text_encoder)
    (pair_loss(unet, x, y) + pair_loss(text_encoder, x, y)).backward()
    optimizer.step()
    return (torch.cat([p.detach().flatten() for p in unet]) - before,
            torch.cat([p.detach().flatten() for p in text_encoder]) - before)


def hide_package(monkeypatch: pytest.MonkeyPatch, package: str) -> None:
    """Make ``find_spec`` report ``package`` as not installed, as on a machine without the extra."""
    real = importlib.util.find_spec

    def find_spec(name: str, package_arg: str | None = None) -> ModuleSpec | None:
        return None if name.split(".")[0] == package else real(name, package_arg)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


# ------------------------------------------------------------------------------------------------ stepping

@pytest.mark.parametrize(("name", "lr", "steps"), [("adamw", 1e-2, 60), ("lion", 1e-2, 60), ("adafactor", 1e-2, 60),
                                                   ("prodigy", 1.0, 150)])
def test_each_optimizer_reduces_the_loss(name: str, lr: float, steps: int) -> None:
    args = {"use_bias_correction": True, "safeguard_warmup": True} if name == "prodigy" else {}
    cfg = OptimizerConfig(name=name, lr=lr, weight_decay=0.0, args=args)
    cfg.validate()
    first, last, optimizer = train(cfg, steps)
    assert last < 0.2 * first, (name, first, last)
    assert [g["name"] for g in optimizer.param_groups] == ["unet", "text_encoder"]


@pytest.mark.parametrize(("name", "lr"), [("adamw", 1e-3), ("lion", 1e-4), ("adafactor", 1e-3)])
def test_unet_and_text_encoder_lrs_scale_their_groups_steps(name: str, lr: float) -> None:
    """Same gradients, text-encoder lr 4x the UNet lr: its first step is 4x as long (weight decay too)."""
    cfg = OptimizerConfig(name=name, lr=0.5, unet_lr=lr, text_encoder_lr=4 * lr, weight_decay=0.01)
    unet_step, te_step = first_step(cfg)
    assert unet_step.abs().max() > 0
    torch.testing.assert_close(te_step, 4 * unet_step, rtol=1e-9, atol=1e-15)
    if name == "lion":  # sign updates: every weight moves by lr (× (1 + weight decay term))
        assert unet_step.abs().max().item() == pytest.approx(lr, rel=0.02)


def test_prodigy_lr_multiplies_its_estimated_step() -> None:
    """Prodigy's first step is lr × d0 × (update direction): halving lr halves it; the lr it steps with is
    d × lr, which grows from d0 as Prodigy estimates d."""
    full, _ = first_step(OptimizerConfig(name="prodigy", lr=1.0))
    half, _ = first_step(OptimizerConfig(name="prodigy", lr=0.5))
    torch.testing.assert_close(half, full / 2, rtol=1e-9, atol=1e-18)
    _, _, optimizer = train(OptimizerConfig(name="prodigy", lr=0.5), 30)
    d = optimizer.param_groups[0]["d"]
    assert d > 1e-6  # grew from Prodigy's d0
    assert effective_learning_rates(optimizer) == {"unet": pytest.approx(0.5 * d),
                                                   "text_encoder": pytest.approx(0.5 * d)}


def test_prodigy_refuses_different_group_lrs_and_adamw_sized_lrs() -> None:
    with pytest.raises(UserError, match="Prodigy steps every group with one estimated step size") as info:
        OptimizerConfig(name="prodigy", lr=1.0, text_encoder_lr=0.5).check_with(device="cpu")
    assert info.value.where == "optimizer.unet_lr / optimizer.text_encoder_lr"
    with pytest.raises(UserError, match="multiplies the step size") as info:
        build_optimizer(OptimizerConfig(name="prodigy", lr=1e-4), lora_pair(), [])
    assert info.value.where == "optimizer.lr"
    assert "optimizer.lr=1.0" in info.value.hint
    # A text-encoder lr that nothing uses (text encoder not trained) is no conflict; equal lrs are fine.
    OptimizerConfig(name="prodigy", lr=1.0, text_encoder_lr=1e-4).check_with(device="cpu", train_text_encoder=False)
    OptimizerConfig(name="prodigy", lr=1.0, unet_lr=0.8, text_encoder_lr=0.8).check_with(device="cpu")


# ---------------------------------------------------------------------------------------------- adamw8bit

def test_adamw8bit_without_bitsandbytes_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """CI installs no bitsandbytes (~125 MB): the error path, at config-check time, before anything starts."""
    hide_package(monkeypatch, "bitsandbytes")
    with pytest.raises(UserError, match="adamw8bit needs the bitsandbytes package") as info:
        to_train_config(compose_config(["optimizer=adamw8bit"]))
    assert info.value.where == "optimizer.name"
    assert 'pip install "lorasweep[bnb]"' in info.value.hint
    assert "pip install bitsandbytes" in info.value.hint


def test_adamw8bit_steps_on_cpu_when_installed() -> None:
    """Measured: bitsandbytes 0.50 steps AdamW8bit on CPU tensors with 8-bit (uint8) states; 0.49.2 raised
    "All input tensors need to be on the same GPU". Without the package, the config check says what to install."""
    cfg = OptimizerConfig(name="adamw8bit", lr=1e-2, weight_decay=0.0)
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(UserError, match=r'lorasweep\[bnb\]'):
            cfg.validate()
        return
    cfg.validate()
    features = 64  # 64 × 4 = 256 elements per matrix: lower bnb's 4096-element threshold for 8-bit states
    cfg.args = {"min_8bit_size": 256}
    first, last, optimizer = train(cfg, 60, features)
    assert last < 0.2 * first
    state = optimizer.state[optimizer.param_groups[0]["params"][0]]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
    unet_step, te_step = first_step(OptimizerConfig(name="adamw8bit", lr=1e-3, text_encoder_lr=4e-3,
                                                    args={"min_8bit_size": 256}), features, torch.float32)
    torch.testing.assert_close(te_step, 4 * unet_step, rtol=0.05, atol=1e-6)
    assert optimizer_description(cfg).startswith("bitsandbytes.optim.adamw.AdamW8bit(weight_decay=0.0,")


def test_adamw8bit_on_cpu_with_an_old_bitsandbytes_asks_for_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = OptimizerConfig(name="adamw8bit")
    monkeypatch.setattr(optimizer_config, "bnb_version", lambda: (0, 49))
    with pytest.raises(UserError, match="steps its 8-bit optimizers on CUDA only") as info:
        cfg.check_with(device="cpu")
    assert "bitsandbytes>=0.50" in info.value.hint
    cfg.check_with(device="cuda")  # fine on a GPU
    monkeypatch.setattr(optimizer_config, "bnb_version", lambda: (0, 50))
    cfg.check_with(device="cpu")


# ------------------------------------------------------------------------------------------- config checks

@pytest.mark.parametrize(("name", "package", "extra", "pip"), [("prodigy", "prodigyopt", "prodigy", "prodigyopt"),
                                                               ("lion", "lion_pytorch", "lion", "lion-pytorch")])
def test_missing_optional_package_names_its_install_command(monkeypatch: pytest.MonkeyPatch, name: str,
                                                           package: str, extra: str, pip: str) -> None:
    OptimizerConfig(name=name, lr=1.0).validate()  # installed here (the test extra has them)
    hide_package(monkeypatch, package)
    with pytest.raises(UserError, match=f"{name} needs the {package} package") as info:
        OptimizerConfig(name=name, lr=1.0).validate()
    assert f'pip install "lorasweep[{extra}]"' in info.value.hint
    assert f"pip install {pip}" in info.value.hint


def test_unknown_optimizer_lists_the_options() -> None:
    with pytest.raises(UserError) as info:
        OptimizerConfig(name="nadam").validate()
    assert info.value.where == "optimizer.name"
    assert all(name in info.value.problem for name in OPTIMIZERS)


@pytest.mark.parametrize("field", ["lr", "unet_lr", "text_encoder_lr"])
def test_negative_learning_rates_are_refused(field: str) -> None:
    with pytest.raises(UserError, match="out of range") as info:
        OptimizerConfig(**{field: -1e-4}).validate()
    assert info.value.where == f"optimizer.{field}"


@pytest.mark.parametrize(("name", "arg", "close", "listed"), [("adamw", "amsgrd", "amsgrad", "fused"),
                                                               ("prodigy", "d_coeff", "d_coef", "safeguard_warmup"),
                                                               ("lion", "eps", None, "use_triton"),
                                                               ("adafactor", "betas", None, "clip_threshold")])
def test_unknown_optimizer_argument_lists_the_accepted_ones(name: str, arg: str, close: str | None,
                                                            listed: str) -> None:
    with pytest.raises(UserError, match="is not an argument of") as info:
        OptimizerConfig(name=name, lr=1.0, args={arg: 1}).validate()
    assert info.value.where == f"optimizer.args.{arg}"
    assert "Accepted: " in info.value.hint and listed in info.value.hint
    assert (f"Did you mean `{close}`?" in info.value.hint) == (close is not None)


def test_arguments_lorasweep_sets_itself_are_refused() -> None:
    with pytest.raises(UserError, match=r"`optimizer\.beta1` and `optimizer\.beta2`") as info:
        OptimizerConfig(args={"betas": [0.9, 0.99]}).validate()
    assert info.value.where == "optimizer.args.betas"
    with pytest.raises(UserError, match="set by lorasweep") as info:
        OptimizerConfig(name="lion", args={"lr": 1e-4}).validate()
    assert info.value.where == "optimizer.args.lr"
    # Adafactor's own beta1 and eps pair are not shared keys, so args may set them.
    OptimizerConfig(name="adafactor", args={"beta1": 0.9, "eps": [1e-30, 1e-3]}).validate()


def test_adafactor_relative_step_is_refused() -> None:
    for flag in ("relative_step", "warmup_init"):
        with pytest.raises(UserError, match="would choose its own learning rate") as info:
            OptimizerConfig(name="adafactor", args={flag: True}).validate()
        assert info.value.where == f"optimizer.args.{flag}"


def test_a_value_the_constructor_refuses_is_a_user_error() -> None:
    cfg = OptimizerConfig(args={"foreach": True, "fused": True})
    cfg.validate()  # both are arguments of AdamW; only the constructor knows they exclude each other
    with pytest.raises(UserError, match=r"torch\.optim\.adamw\.AdamW refused its arguments") as info:
        build_optimizer(cfg, lora_pair(), [])
    assert info.value.where == "optimizer.args"


def test_adamw_steps_all_tensors_at_once_unless_told_otherwise() -> None:
    """AdamW's own default on the CPU is a Python loop over the tensors (hundreds of small LoRA matrices):
    lorasweep asks for the multi-tensor (foreach) kernels there, and leaves a user's choice alone."""
    optimizer = build_optimizer(OptimizerConfig(), lora_pair(), lora_pair())
    assert optimizer.defaults["foreach"] is True and not optimizer.defaults["fused"]
    own = build_optimizer(OptimizerConfig(args={"fused": True}), lora_pair(), [])
    assert own.defaults["fused"] is True and not own.defaults["foreach"]
    single = build_optimizer(OptimizerConfig(args={"foreach": False}), lora_pair(), [])
    assert single.defaults["foreach"] is False


def test_presets_compose_with_their_usual_settings() -> None:
    prodigy = to_train_config(compose_config(["optimizer=prodigy"])).optimizer
    assert (prodigy.lr, prodigy.weight_decay) == (1.0, 0.01)
    assert prodigy.args == {"decouple": True, "use_bias_correction": True, "safeguard_warmup": True, "d_coef": 1.0}
    adafactor = to_train_config(compose_config(["optimizer=adafactor", "optimizer.lr=3e-4"])).optimizer
    assert adafactor.args == {"scale_parameter": False, "relative_step": False, "warmup_init": False}
    lion = to_train_config(compose_config(["optimizer=lion"])).optimizer
    assert (lion.lr, lion.beta2, lion.weight_decay) == (3e-4, 0.99, 0.03)
    cfg = to_train_config(compose_config(["optimizer=prodigy", "+optimizer.args.d0=1e-5"])).optimizer
    assert cfg.args["d0"] == 1e-5


# -------------------------------------------------------------------------------------------- ss_optimizer

def test_optimizer_description_reads_like_kohyas_ss_optimizer() -> None:
    assert optimizer_description(OptimizerConfig()) == \
        "torch.optim.adamw.AdamW(weight_decay=0.01,betas=(0.9, 0.999),eps=1e-08)"
    assert optimizer_description(OptimizerConfig(name="lion", beta2=0.99, weight_decay=0.1)) == \
        "lion_pytorch.lion_pytorch.Lion(weight_decay=0.1,betas=(0.9, 0.99))"
    assert optimizer_description(OptimizerConfig(name="prodigy", lr=1.0, args={"d_coef": 2})) == \
        "prodigyopt.prodigy.Prodigy(weight_decay=0.01,betas=(0.9, 0.999),eps=1e-08,d_coef=2)"
    assert optimizer_description(OptimizerConfig(name="adafactor", weight_decay=0.0, args={"clip_threshold": 1.0})) \
        == ("transformers.optimization.Adafactor(weight_decay=0.0,scale_parameter=False,relative_step=False,"
            "warmup_init=False,clip_threshold=1.0)")


# --------------------------------------------------------------------------------------------- precision

@pytest.fixture
def fresh_accelerate() -> Iterator[None]:
    """accelerate keeps one process-wide state; start and leave it empty so other tests choose their own."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def conv_linear() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 5))


def test_bf16_autocast_runs_forward_and_backward_on_cpu() -> None:
    model = conv_linear()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    model(x).square().mean().backward()
    reference = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model[0](x)
        out = model[2](model[1](hidden))
    assert (hidden.dtype, out.dtype) == (torch.bfloat16, torch.bfloat16)
    out.float().square().mean().backward()
    for param, ref in zip(model.parameters(), reference, strict=True):
        assert param.grad.dtype == torch.float32  # weights and their grads stay float32
        torch.testing.assert_close(param.grad, ref, rtol=0.1, atol=2e-3)


@pytest.mark.usefixtures("fresh_accelerate")
@pytest.mark.parametrize(("mixed", "inner"), [("bf16", torch.bfloat16), ("fp16", torch.float32)])
def test_accelerate_on_cpu_autocasts_bf16_but_silently_ignores_fp16(mixed: str, inner: torch.dtype) -> None:
    """Measured with accelerate 1.15: fp16 on CPU trains in float32 with no scaler and no warning, which is
    why fp16 without CUDA is refused at config-check time."""
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=mixed, cpu=True)
    model = accelerator.prepare(conv_linear())
    seen: list[torch.dtype] = []
    accelerator.unwrap_model(model)[0].register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    with accelerator.autocast():
        model(torch.randn(2, 3, 8, 8))
    assert seen == [inner]
    assert accelerator.scaler is None


def test_fp16_without_cuda_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = PrecisionConfig(mixed="fp16")
    with pytest.raises(UserError, match=r"training\.device is cpu") as info:
        cfg.check_device("cpu")
    assert info.value.where == "precision.mixed" and "precision.mixed=bf16" in info.value.hint
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="no CUDA device is visible"):
        cfg.check_device("auto")
    PrecisionConfig(mixed="bf16").check_device("auto")
    PrecisionConfig(mixed="no").check_device("cpu")


def test_unquoted_no_in_yaml_gets_a_clear_error() -> None:
    with pytest.raises(UserError, match="unquoted `no`") as info:
        to_train_config(OmegaConf.create("precision:\n  mixed: no\n"))
    assert info.value.where == "precision.mixed"
