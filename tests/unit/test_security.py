"""Security: nothing unpickles a file a user or a third party could have written, and secrets never reach
MLflow params or tags."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from lorasweep.config.tracking import TrackingConfig
from lorasweep.tracking.redact import REDACTED, redact

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted([*(ROOT / "src").rglob("*.py"), *(ROOT / "bench").rglob("*.py")])
#: The one place pickles are read: job and result files the sweep controller and its own trial processes
#: exchange through a private (0700) temporary folder they created (Hydra's launchers pickle jobs too).
ALLOWED_CLOUDPICKLE = {"src/lorasweep/sweeping/_process.py"}
UNSAFE_MODULES = {"pickle", "dill", "shelve", "marshal", "_pickle"}


def _findings(path: Path) -> list[str]:
    rel = path.relative_to(ROOT).as_posix()
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=rel)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                if name.split(".")[0] in UNSAFE_MODULES:
                    found.append(f"{rel}:{node.lineno} imports {name}")
                if name.split(".")[0] == "cloudpickle" and rel not in ALLOWED_CLOUDPICKLE:
                    found.append(f"{rel}:{node.lineno} imports cloudpickle")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            kwargs = {k.arg: k.value for k in node.keywords}
            if owner == "torch" and node.func.attr == "load":
                safe = kwargs.get("weights_only")
                if not (isinstance(safe, ast.Constant) and safe.value is True):
                    found.append(f"{rel}:{node.lineno} torch.load without weights_only=True")
            if owner in ("np", "numpy") and node.func.attr == "load":
                allow = kwargs.get("allow_pickle")
                if not (isinstance(allow, ast.Constant) and allow.value is False):
                    found.append(f"{rel}:{node.lineno} numpy.load without allow_pickle=False")
            if node.func.attr in ("load_state_dict_from_url", "load_pickle"):
                found.append(f"{rel}:{node.lineno} {node.func.attr}")
    return found


def test_the_source_never_unpickles_untrusted_files() -> None:
    assert len(SOURCES) > 50
    findings = [f for path in SOURCES for f in _findings(path)]
    assert findings == []


def test_the_scan_would_catch_an_unsafe_load(tmp_path: Path) -> None:
    bad = ROOT / "src" / "lorasweep" / "_scan_probe.py"  # a path inside ROOT, so it is named as the scan names it
    text = "import pickle\nimport torch\nx = torch.load('a.ckpt')\ny = torch.load('b', weights_only=False)\n"
    try:
        bad.write_text(text)
        assert len(_findings(bad)) == 3
    finally:
        bad.unlink()


def test_the_trial_job_folder_is_private(tmp_path: Path) -> None:
    from lorasweep.sweeping._process import private_folder

    with private_folder(tmp_path, "job-1") as folder:
        assert folder.stat().st_mode & 0o077 == 0 and folder.stat().st_uid == os.getuid()


def test_redaction_rules() -> None:
    env = {"HF_TOKEN": "hf_abcdefghijkl", "MY_API_KEY": "sk-1234567890", "SHORT_TOKEN": "abc", "HOME": "/root"}
    params = {
        "tracking.tags.hf_token": "anything", "tracking.tags.api_key": "x1", "legacy.aws_secret_access_key": "y",
        "tracking.tags.password": "z", "data.keep_tokens": "2", "model.max_token_length": "75",
        "model.base": "/models/hf_abcdefghijkl/sd15.safetensors",
        "tracking.uri": "https://alice:s3cret@mlflow.example.com", "hydra.sweeper.storage":
            "postgresql://bob:pw123456@db:5432/optuna", "note": "abc is short and stays", "home": "/root",
        "tracking.tags.token": "",
    }
    out = redact(params, env)
    for key in ("tracking.tags.hf_token", "tracking.tags.api_key", "legacy.aws_secret_access_key",
                "tracking.tags.password"):
        assert out[key] == REDACTED, key
    assert out["data.keep_tokens"] == "2" and out["model.max_token_length"] == "75"
    assert out["model.base"] == f"/models/{REDACTED}/sd15.safetensors"
    assert out["tracking.uri"] == f"https://alice:{REDACTED}@mlflow.example.com"
    assert out["hydra.sweeper.storage"] == f"postgresql://bob:{REDACTED}@db:5432/optuna"
    assert out["note"] == "abc is short and stays" and out["home"] == "/root" and out["tracking.tags.token"] == ""


def test_secrets_never_reach_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the real run logger and a sqlite store: params and tags as MLflow keeps them."""
    from mlflow import MlflowClient

    from lorasweep.tracking.mlflow_run import MlflowRun

    monkeypatch.setenv("HF_TOKEN", "hf_verysecret123")
    cfg = TrackingConfig(tags={"hub_token": "hf_verysecret123", "team": "a"})
    run = MlflowRun(cfg, tmp_path, "run", {"source": "token hf_verysecret123 in a tag"})
    run.log_params({"model.base": "org/model?token=hf_verysecret123", "tracking.uri": "http://u:hunter22@h:5000",
                    "data.keep_tokens": "1"})
    run.set_tags({"lorasweep.error": "failed with HF_TOKEN=hf_verysecret123"})
    run.end("FINISHED")
    stored = MlflowClient(tracking_uri=run.uri).get_run(run.run_id).data
    everything = " ".join([*stored.params.values(), *stored.tags.values()])
    assert "hf_verysecret123" not in everything and "hunter22" not in everything
    assert stored.tags["hub_token"] == REDACTED and stored.tags["team"] == "a"
    assert stored.params["model.base"] == f"org/model?token={REDACTED}"
    assert stored.params["data.keep_tokens"] == "1"
