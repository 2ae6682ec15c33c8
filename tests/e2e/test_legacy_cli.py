"""Legacy files from the command line: `lorasweep queue` (LETS multi_run_folder), `train
legacy.load_json_path=...`, `import-legacy` and `legacy.save_json_only`: training ones through the CLI's entry
point in the test process, the others in fresh processes as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient
from omegaconf import OmegaConf
from safetensors import safe_open

from lorasweep.sweeping.storage import SweepRecord
from tests.conftest import main_in, run_cli, user_error_line

SHORT = ["sampling.enabled=false", "validation.every_n_steps=null"]


def _one_error_line(proc, *fragments: str) -> str:
    return user_error_line(proc.returncode, proc.stderr, *fragments)


def _lora_keys(run_dir: Path) -> list[str]:
    (path,) = (run_dir / "lora").glob("*.safetensors")
    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def test_queue_trains_each_file_in_one_multirun(tiny_model: Path, tmp_path: Path) -> None:
    """Two LETS JSONs, two run folders under one MLflow parent; each job has its own file's settings, and the
    command line's max_steps wins over both files'."""
    queue = tmp_path / "queue"
    queue.mkdir()
    (queue / "a.json").write_text(json.dumps({"net_dim": 2, "alpha": 1, "scheduler": "cosine", "max_steps": 6,
                                              "learning_rate": 0.0005, "noise_offset": 0.1}))
    (queue / "b.json").write_text(json.dumps({"net_dim": 4, "scheduler": "linear", "max_steps": 6,
                                              "unet_only": True}))
    assert main_in(tmp_path, ["queue", str(queue), *SHORT, "training.max_steps=3",
                              f"output.root={tmp_path / 'out'}"]) == 0
    (sweep_dir,) = (tmp_path / "out" / "sweeps").iterdir()
    runs = {}
    for job in ("0", "1"):
        cfg = OmegaConf.load(sweep_dir / job / "config.yaml")
        runs[Path(cfg.legacy.load_json_path).name] = (sweep_dir / job, cfg)
    (a_dir, a), (b_dir, b) = runs["a.json"], runs["b.json"]
    assert (a.network.dim, a.network.alpha, a.scheduler.name, a.optimizer.lr) == (2, 1.0, "cosine", 0.0005)
    assert (b.network.dim, b.scheduler.name, b.network.train_text_encoder) == (4, "linear", False)
    assert a.training.max_steps == b.training.max_steps == 3
    for run_dir in (a_dir, b_dir):
        assert json.loads((run_dir / "run.json").read_text())["steps"] == 3
    assert any(k.startswith("lora_te_") for k in _lora_keys(a_dir))
    assert not any(k.startswith("lora_te_") for k in _lora_keys(b_dir))  # unet_only really trained the UNet only
    record = SweepRecord.read(sweep_dir)
    assert record.params == ["legacy.load_json_path"]
    client = MlflowClient(tracking_uri=record.mlflow["tracking_uri"])
    parent = client.get_run(record.mlflow["parent_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.data.params["network.dim"] for r in children) == ["2", "4"]


def test_train_loads_a_file_and_the_command_line_wins(tiny_model: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    kohya = tmp_path / "kohya.toml"
    kohya.write_text('[network_arguments]\nnetwork_dim = 2\ntraining_comment = "from kohya"\n'
                     '[optimizer_arguments]\nlearning_rate = 0.002\noptimizer_type = "AdamW"\n')
    assert main_in(tmp_path, ["train", f"legacy.load_json_path={kohya}", "optimizer.lr=0.0003",
                              "training.max_steps=2", "tracking.enabled=false", *SHORT]) == 0
    assert f"Settings from {kohya} (kohya TOML): 4 applied." in capsys.readouterr().out
    (run_dir,) = (tmp_path / "outputs" / "runs").iterdir()
    cfg = OmegaConf.load(run_dir / "config.yaml")
    assert (cfg.network.dim, cfg.optimizer.lr, cfg.output.comment) == (2, 0.0003, "from kohya")
    (path,) = (run_dir / "lora").glob("*.safetensors")
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["ss_training_comment"] == "from kohya"


def test_import_legacy_and_its_yaml(tmp_path: Path) -> None:
    lets = tmp_path / "my_lets.json"
    lets.write_text(json.dumps({"net_dim": 12, "scheduler": "cosine", "mystery_knob": 3, "multi_run_folder": None}))
    proc = run_cli(["import-legacy", str(lets)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "net_dim → network.dim = 12" in proc.stdout and "scheduler → scheduler.name = cosine" in proc.stdout
    assert "mystery_knob: unknown setting" in proc.stdout
    assert "lorasweep queue DIR" in proc.stdout
    assert "lorasweep train network.dim=12 scheduler=cosine" in proc.stdout

    out = tmp_path / "configs" / "mine.yaml"
    proc = run_cli(["import-legacy", str(lets), "-o", str(out), "--skip", "scheduler"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"--config-dir {out.parent} --config-name mine" in proc.stdout
    written = out.read_text()
    _one_error_line(run_cli(["import-legacy", str(lets), "-o", str(out)], cwd=tmp_path), str(out), "already exists")
    assert out.read_text() == written

    proc = run_cli(["train", "--config-dir", str(out.parent), "--config-name", "mine", "--cfg", "job"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    shown = OmegaConf.create(proc.stdout)  # Hydra's own composition of the imported YAML
    assert (shown.network.dim, shown.scheduler.name) == (12, "constant")

    saved = tmp_path / "saved"
    proc = run_cli(["train", "--config-dir", str(out.parent), "--config-name", "mine", "network.alpha=3",
                    "legacy.save_json_only=true", f"legacy.save_json_folder={saved}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (json_file,) = saved.glob("*.json")
    assert (json.loads(json_file.read_text())["net_dim"], json.loads(json_file.read_text())["alpha"]) == (12, 3.0)
    assert json_file.with_suffix(".yaml").is_file() and "Nothing was trained" in proc.stdout
    assert not (tmp_path / "outputs").exists()


def test_bad_legacy_input(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"net_dim": "lots", "learning_rate": 1e-4}))
    _one_error_line(run_cli(["import-legacy", str(bad)], cwd=tmp_path), str(bad), "net_dim", "expected an integer")
    _one_error_line(run_cli(["import-legacy", str(tmp_path / "none.json")], cwd=tmp_path), "none.json",
                    "does not exist")
    queue = tmp_path / "queue"
    queue.mkdir()
    (queue / "a_good.json").write_text(json.dumps({"net_dim": 4}))
    (queue / "b_bad.json").write_text('{"net_dim": 4,')
    _one_error_line(run_cli(["queue", str(queue), f"output.root={tmp_path / 'out'}"], cwd=tmp_path),
                    "b_bad.json", "not valid JSON")
    assert not (tmp_path / "out").exists()  # checked before anything started
