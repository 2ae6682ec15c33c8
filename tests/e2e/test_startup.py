"""`lorasweep --help`, `train --help` and bad input answer without importing the heavy libraries.

Start-up time itself is measured in bench/startup.py (a benchmark, not a timed test); these tests pin the
cause of a slow start: a module-level import of torch, diffusers, transformers, peft, mlflow or optuna on a
path that does not train.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HEAVY = ("torch", "diffusers", "transformers", "peft", "accelerate", "mlflow", "optuna")

_PROBE = """
import contextlib, io, json, sys
from lorasweep.cli import main
args, heavy = json.loads(sys.argv[1]), json.loads(sys.argv[2])  # before main: Hydra rewrites sys.argv
out, err = io.StringIO(), io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
        code = main(args)
    except SystemExit as exit:  # Hydra's multirun path exits instead of returning
        code = exit.code
print(json.dumps({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue(),
                  "heavy": sorted(m for m in heavy if m in sys.modules)}))
"""


def _probe(args: list[str], cwd: Path) -> dict[str, object]:
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(args), json.dumps(HEAVY)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_help_imports_nothing_heavy(tmp_path: Path) -> None:
    result = _probe(["--help"], tmp_path)
    assert result["code"] == 0 and "commands:" in str(result["stdout"]) and result["heavy"] == []


def test_train_help_lists_groups_and_the_composed_config_without_heavy_imports(tmp_path: Path) -> None:
    result = _probe(["train", "--help", "network.dim=7", "optimizer=lion"], tmp_path)
    out = str(result["stdout"])
    assert result["code"] == 0 and result["heavy"] == []
    assert "optimizer: adafactor, adamw, adamw8bit, lion, prodigy" in out
    assert "  dim: 7\n" in out and "name: lion" in out and "hydra:" not in out


def test_config_and_input_errors_import_nothing_heavy(tmp_path: Path) -> None:
    for args, fragment in ((["train", "optimizer.lr=-1"], "optimizer.lr"),
                           (["train", f"data.train_dir={tmp_path / 'missing'}"], "data.train_dir"),
                           (["train", "nosuch.key=1"], "nosuch"),
                           (["sweep", "quickstart", "network.dim=-3"], "network.dim")):
        result = _probe(args, tmp_path)
        assert result["code"] == 2, (args, result)
        assert fragment in str(result["stderr"]) and "Traceback" not in str(result["stderr"])
        assert result["heavy"] == [], (args, result["heavy"])


def test_sweeper_errors_import_no_training_library(tmp_path: Path) -> None:
    """The sweeper checks its settings with Optuna alone: a typo in a pruner, sampler or objective answers
    before torch, diffusers or mlflow load (they cost seconds in every controller)."""
    for setting, fragment in (("hydra.sweeper.pruner=medain", "median"),
                              ("hydra.sweeper.objective=accuracy", "val_loss/t200")):
        result = _probe(["sweep", "quickstart", f"output.root={tmp_path / 'out'}", setting], tmp_path)
        assert result["code"] == 2, (setting, result)
        assert fragment in str(result["stderr"]) and "Traceback" not in str(result["stderr"])
        assert result["heavy"] == ["optuna"], (setting, result["heavy"])
