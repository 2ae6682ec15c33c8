"""A sweep's trials share one worker process and its loaded base model, and still train exactly what a fresh
process trains (issue 6: model reuse)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.conftest import run_cli

COMMON = ["training.max_steps=12", "validation.every_n_steps=6", "sampling.enabled=false", "tracking=off",
          "trial.num_threads=1"]


def test_second_trial_in_a_reused_worker_equals_a_fresh_process(tiny_model: Path, tmp_path: Path) -> None:
    # Job 0 leaves every trace a run can leave on a cached model: bf16 autocast (accelerate patches forward),
    # gradient checkpointing, LoRA on UNet and text encoder in train mode. Job 1 must not see any of it.
    sweep = run_cli(["train", "-m", "hydra/launcher=lorasweep_process", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                     f"output.root={tmp_path}", "precision=bf16,fp32", "training.gradient_checkpointing=true",
                     "network.dim=4", *COMMON], cwd=tmp_path)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    fresh = run_cli(["train", f"output.root={tmp_path / 'fresh'}", "precision=fp32",
                     "training.gradient_checkpointing=true", "network.dim=4", *COMMON], cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr[-3000:]

    records = [json.loads((tmp_path / "sweep" / str(j) / "run.json").read_text()) for j in (0, 1)]
    assert records[0]["model_load"]["pid"] == records[1]["model_load"]["pid"]  # one worker ran both
    assert [r["model_load"]["cached"] for r in records] == [False, True]
    (fresh_run,) = (tmp_path / "fresh" / "runs").iterdir()
    reference = load_file(fresh_run / "lora" / "lora.safetensors")
    reused = load_file(tmp_path / "sweep" / "1" / "lora" / "lora.safetensors")
    assert reused.keys() == reference.keys() and any(k.startswith("lora_te_") for k in reused)
    assert all(torch.equal(reused[k], reference[k]) for k in reference)
    assert records[1]["val_loss"] == json.loads((fresh_run / "run.json").read_text())["val_loss"]

    # The second trial encoded nothing: its latents came from the machine-wide feature cache.
    first, second = (r["feature_cache"]["latents"] for r in records)
    assert second == {"hits": first["hits"] + first["built"], "built": 0} and second["hits"] > 0
    assert 0 < records[1]["time_to_first_step_s"] < records[1]["duration_s"]
    assert records[1]["peak_rss_mib"] >= records[0]["peak_rss_mib"] > 100  # one process: its peak so far
    shares = [json.loads(line).get("throughput/data_wait_share") for line in
              (tmp_path / "sweep" / "1" / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in shares if s is not None] and all(0 <= s <= 1 for s in shares if s is not None)
