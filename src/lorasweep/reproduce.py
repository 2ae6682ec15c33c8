"""``lorasweep reproduce`` and ``lorasweep resume``: run again from a run folder's own saved config.

``reproduce``: the source is a run folder (``config.yaml`` + ``run.json`` + the LoRA) or an MLflow run id (the
same three come from its artifacts and metrics), so a run can be reproduced from the tracking server alone;
``--check`` proves the result matches. ``resume``: continue a run from its latest saved training state.
"""

from __future__ import annotations

import logging
import re
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lorasweep.errors import UserError

if TYPE_CHECKING:
    from lorasweep.job import JobResult

log = logging.getLogger(__name__)
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class Source:
    """What the original run left: its config, LoRA file, validation loss and identity."""

    config_path: Path
    lora_path: Path | None
    val_loss: float | None
    label: str
    run_dir: Path | None
    mlflow_run_id: str | None


def _from_folder(folder: Path) -> Source:
    import json

    config = folder / "config.yaml"
    if not config.is_file():
        raise UserError(str(folder), "is not a lorasweep run folder (no config.yaml).",
                        "Give the folder printed as 'Run folder:' at the end of `lorasweep train`, or an MLflow "
                        "run id.")
    record = json.loads((folder / "run.json").read_text()) if (folder / "run.json").is_file() else {}
    lora = folder / record["lora"] if record.get("lora") else None
    run_id = (record.get("mlflow") or {}).get("run_id")
    return Source(config, lora, record.get("val_loss"), str(folder), folder, run_id)


def _from_mlflow(run_id: str, tracking_uri: str | None, dest: Path) -> Source:
    import os

    import mlflow
    from mlflow import MlflowClient

    from lorasweep.tracking.mlflow_run import default_tracking_uri

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(Path("outputs"))
    client = MlflowClient(tracking_uri=uri)
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise UserError("reproduce", f"no MLflow run {run_id} in {uri}.",
                        "Pass --tracking-uri for another store, or give the run folder instead.") from None
    config = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="config.yaml",
                                                      dst_path=str(dest), tracking_uri=uri))
    loras = [a.path for a in client.list_artifacts(run_id, "lora") if a.path.endswith(".safetensors")]
    lora = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=loras[0], dst_path=str(dest),
                                                    tracking_uri=uri)) if loras else None
    run_dir = run.data.tags.get("lorasweep.run_dir")
    return Source(config, lora, run.data.metrics.get("val_loss"), f"MLflow run {run_id}",
                  Path(run_dir) if run_dir and Path(run_dir).is_dir() else None, run_id)


def reproduce(source: str, *, check: bool, tracking_uri: str | None = None) -> int:
    """Re-run ``source`` into a new run folder and MLflow run tagged as its reproduction."""
    with tempfile.TemporaryDirectory(prefix="lorasweep-reproduce-") as tmp:
        path = Path(source)
        if path.exists():
            src = _from_folder(path)
        elif _RUN_ID.match(source):
            src = _from_mlflow(source, tracking_uri, Path(tmp))
        else:
            raise UserError("reproduce", f"{source} is neither a run folder nor an MLflow run id.",
                            "Give the run folder printed at the end of `lorasweep train`, or a 32-hex MLflow "
                            "run id.")
        return _rerun(src, check=check)


def _run_saved_config(src: Source, suffix: str, tags: dict[str, str], overrides: dict[str, object]) -> JobResult:
    """Run ``src``'s config (plus ``overrides``) into a new ``<run_name>-<suffix>`` run folder."""
    from omegaconf import OmegaConf

    from lorasweep.app import register
    from lorasweep.config.train import to_train_config
    from lorasweep.job import preflight, run_job
    from lorasweep.tracking.console import print_summary
    from lorasweep.tracking.files import create_unique_dir

    register()
    cfg = OmegaConf.load(src.config_path)
    if "trial" in cfg:  # a sweep trial reruns as a plain run (same threads: they change float sums)
        for key in ("study_name", "storage", "number"):
            cfg.trial[key] = None
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    checked = preflight(to_train_config(cfg))
    root = Path(checked.config.output.root)
    run_dir = create_unique_dir(root / "runs" / f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_"
                                f"{checked.config.output.run_name}-{suffix}")
    if src.run_dir is not None and (src.run_dir / ".hydra").is_dir():
        shutil.copytree(src.run_dir / ".hydra", run_dir / ".hydra")
    result = run_job(cfg, run_dir, tags=tags, checked=checked)
    print_summary(result.run_dir, result.val_loss_start, result.val_loss, result.lora_path, result.tracking_uri)
    return result


def _rerun(src: Source, *, check: bool) -> int:
    tags = {"lorasweep.reproduction_of": src.mlflow_run_id or src.label}
    if src.run_dir is not None:
        tags["lorasweep.reproduction_of_dir"] = str(src.run_dir.resolve())
    result = _run_saved_config(src, "repro", tags, {})
    if check:
        return print_check(src, result.lora_path, result.val_loss)
    return 0


def latest_state(run_dir: Path) -> Path:
    """The run's newest complete training state (``state/step-NNNNNN``, highest step)."""
    states = sorted(p for p in (run_dir / "state").glob("step-*") if p.is_dir() and (p / "state.json").is_file())
    if not states:
        raise UserError(str(run_dir), "has no saved training state (state/step-*/).",
                        "Only runs trained with output.save_state=true can be resumed; start a new run with "
                        "network.init_weights=<its LoRA> to continue from its weights instead.")
    return states[-1]


def resume(run: str, *, state: str | None = None, force: bool = False) -> int:
    """``lorasweep resume RUN``: continue ``RUN`` from its latest state (or ``state``) in a new run folder,
    with the run's own config, so the continuation is exactly the uninterrupted run's trajectory."""
    path = Path(run)
    if not path.is_dir():
        raise UserError(run, "is not a run folder.", "Give the folder printed as 'Run folder:' by `lorasweep train`.")
    src = _from_folder(path)
    state_dir = Path(state) if state else latest_state(path)
    _close_if_dead(path)
    tags = {"lorasweep.resumed_from": str(state_dir.resolve())}
    if src.mlflow_run_id:
        tags["lorasweep.resumed_from_run"] = src.mlflow_run_id
    _run_saved_config(src, "resume", tags, {"resume.state_dir": str(state_dir.resolve()), "resume.force": force})
    return 0


def _close_if_dead(run_dir: Path) -> None:
    """A run killed while training (SIGKILL, power loss) still reads RUNNING: mark it KILLED, in its folder and
    in MLflow, before its continuation starts; a run whose process still trains is not resumed twice."""
    from lorasweep.liveness import is_alive
    from lorasweep.tracking.run_folder import close_interrupted_run, read_record

    if not (run_dir / "run.json").is_file():
        return
    record = read_record(run_dir)
    if record.get("status") != "RUNNING":
        return
    identity = record.get("process") or f"{record.get('host')}:{record.get('pid')}:?"
    if identity.partition(":")[0] != socket.gethostname():  # cannot tell from here; its record stays as it is
        log.warning("%s reads RUNNING on host %s; resuming it here all the same", run_dir, record.get("host"))
        return
    if is_alive(identity):
        raise UserError(str(run_dir), f"is still training (process {identity}).",
                        "Wait for it to end, or stop it, before resuming it.")
    close_interrupted_run(run_dir, "interrupted: its process stopped while training; `lorasweep resume` "
                          "continues it in a new run folder")


def compare_loras(a: Path, b: Path) -> dict[str, float]:
    """Max |a - b| per tensor (float64); a key present in only one file counts as infinitely different."""
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    diffs = {}
    for key in sorted(set(ta) | set(tb)):
        if key not in ta or key not in tb or ta[key].shape != tb[key].shape:
            diffs[key] = float("inf")
        else:
            diffs[key] = float((ta[key].double() - tb[key].double()).abs().max()) if ta[key].numel() else 0.0
    return diffs


def print_check(src: Source, new_lora: Path, new_val: float) -> int:
    """Print the per-tensor table and the summary line; exit code 0 when identical, 1 otherwise."""
    from rich.console import Console
    from rich.table import Table

    out = Console(highlight=False, soft_wrap=True)
    if src.lora_path is None or not src.lora_path.is_file():
        raise UserError(src.label, "has no LoRA file to compare with.", "Reproduce without --check.")
    diffs = compare_loras(src.lora_path, new_lora)
    table = Table(title=f"reproduce --check: {src.label}")
    table.add_column("tensor")
    table.add_column("max |diff|", justify="right")
    for key, value in diffs.items():
        table.add_row(key, f"{value:.3g}")
    out.print(table)
    lora_max = max(diffs.values(), default=0.0)
    val_diff = abs(new_val - src.val_loss) if src.val_loss is not None else float("nan")
    out.print(f"LoRA tensors: {len(diffs)}, max abs difference {lora_max!r}")
    out.print(f"Validation loss: original {src.val_loss!r}, reproduction {new_val!r}, abs difference {val_diff!r}")
    identical = lora_max == 0.0 and val_diff == 0.0
    out.print("bitwise identical" if identical else "NOT identical")
    return 0 if identical else 1
