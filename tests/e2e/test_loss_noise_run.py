"""The loss and noise knobs end to end: one short run with most of them at once (v-prediction, zero terminal
SNR with trailing-spaced samples, Huber loss, min-SNR-γ, debiased estimation, pyramid noise, input
perturbation, a timestep range) finishes with a finite loss and records each key in the run's config.yaml,
whose flattened form is what the run logs as MLflow params (tracking is off here: creating an MLflow database
costs more than the run); combinations that contradict each other are refused with one paragraph naming both
keys."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lorasweep.tracking.mlflow_run import flatten
from tests.conftest import main_in, user_error_line

pytestmark = pytest.mark.usefixtures("single_thread")

KNOBS = {"training.loss_type": "huber", "training.huber_schedule": "exponential", "training.huber_c": "0.2",
         "training.min_snr_gamma": "5.0", "training.debiased_estimation": "True",
         "training.multires_noise_iterations": "4", "training.multires_noise_discount": "0.4",
         "training.ip_noise_gamma": "0.1", "training.ip_noise_gamma_random_strength": "True",
         "training.min_timestep": "100", "training.max_timestep": "900", "training.zero_terminal_snr": "True",
         # and the rest of issue 8 in the same run: LoCon + DoRA, LoRA+, module dropout, EMA
         "network.conv_dim": "4", "network.dora": "True", "network.loraplus_lr_ratio": "4.0",
         "network.module_dropout": "0.1", "training.ema.enabled": "True", "training.ema.decay": "0.5"}


def _main(work: Path, args: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            code = main_in(work, args)
        except SystemExit as exc:  # a refusal raised inside the Hydra task ends there
            code = exc.code if isinstance(exc.code, int) else 1
    return code, err.getvalue()


def test_a_run_with_the_loss_and_noise_knobs_finishes_and_records_them(tmp_path: Path, tiny_model: Path) -> None:
    overrides = [f"{key}={value.lower() if value in ('True', 'False') else value}" for key, value in KNOBS.items()]
    code, stderr = _main(tmp_path, ["train", "model.v_parameterization=true", "training.max_steps=3",
                                    "training.batch_size=2", "validation.every_n_steps=null",
                                    "tracking.enabled=false", "sampling.every_n_steps=null",
                                    "sampling.num_inference_steps=2",
                                    "sampling.seeds=[0]", "sampling.prompts=[a zorb]", "validation.repeats=1",
                                    "training.log_every_n_steps=1", *overrides,
                                    # CUDA's default layout, here on the CPU: DoRA on channels-last convs broke
                                    "training.channels_last=true"])
    assert code == 0, stderr
    run = next((tmp_path / "outputs" / "runs").iterdir())
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "FINISHED" and record["steps"] == 3
    losses = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_losses = [m["loss"] for m in losses if "loss" in m]
    assert len(train_losses) == 3 and all(math.isfinite(v) and v > 0 for v in train_losses)
    assert math.isfinite(record["val_loss"])
    assert list((run / "samples").rglob("*.png"))  # rendered with the zero-terminal-SNR schedule
    params = flatten(OmegaConf.to_container(OmegaConf.load(run / "config.yaml")))
    assert {key: params.get(key) for key in KNOBS} == KNOBS
    assert params["training.noise_offset"] == "0.0" and params["training.huber_scale"] == "1.0"
    lrs = [m for m in losses if "lr/unet_plus" in m]
    assert lrs and all(m["lr/unet_plus"] == 4 * m["lr/unet"] and m["lr/text_encoder_plus"] == 4 * m["lr/text_encoder"]
                       for m in lrs)  # LoRA+: the up matrices at 4× the learning rate
    decays = [m["ema/decay"] for m in losses if "ema/decay" in m]
    assert decays == pytest.approx([0.0, 2 / 11, 3 / 12])  # diffusers' ramp (1 + n) / (10 + n), under the 0.5 cap
    from safetensors import safe_open

    with safe_open(str(run / "lora" / "lora.safetensors"), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert any(k.endswith(".dora_scale") for k in keys)
    assert any("_resnets_" in k and k.endswith(".lora_down.weight") for k in keys)  # LoCon: the 3×3 convs
    assert meta["ss_network_module"] == "lycoris.kohya" and meta["ss_loss_type"] == "huber"
    assert json.loads(meta["ss_network_args"])["conv_dim"] == "4"


@pytest.mark.parametrize(("args", "fragments"), [
    (["training.noise_offset=0.1", "training.multires_noise_iterations=6"],
     ["training.noise_offset", "training.multires_noise_iterations"]),
    (["training.zero_terminal_snr=true"], ["training.zero_terminal_snr", "model.v_parameterization=true"]),
])
def test_contradicting_knobs_are_refused(tmp_path: Path, tiny_model: Path, args: list[str],
                                         fragments: list[str]) -> None:
    code, stderr = _main(tmp_path, ["train", "training.max_steps=1", "sampling.enabled=false",
                                    "validation.every_n_steps=null", "tracking.enabled=false", *args])
    user_error_line(code, stderr, *fragments)
