"""Bad sweeps: one clear paragraph naming the key, exit code 2, no traceback, and no trial started.

Every case here is refused by ``lorasweep sweep`` (Hydra, ``sweep_main`` or ``SweepController.sweep``) before the
first trial and before the MLflow parent run is opened, so none of them needs the tiny model or trains anything.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import cli_in, run_cli


def _sweep(tmp_path: Path, *args: str, preset: str = "quickstart",
           process: bool = False) -> subprocess.CompletedProcess[str]:
    """``lorasweep sweep`` in the test process (``process``: in a fresh one, exit path and all)."""
    argv = ["sweep", preset, f"output.root={tmp_path / 'outputs'}", *args]
    return run_cli(argv, cwd=tmp_path, timeout=300) if process else cli_in(tmp_path, argv)


def _assert_refused(proc: subprocess.CompletedProcess[str], tmp_path: Path, *fragments: str) -> str:
    """Exit code 2, exactly one ``lorasweep: error:`` paragraph holding every fragment, no traceback, nothing
    started; returns the error line."""
    assert proc.returncode == 2, f"exit code {proc.returncode}\n{proc.stdout}{proc.stderr}"
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("lorasweep: error:")]
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    outputs = tmp_path / "outputs"
    trials = [p for p in outputs.glob("sweeps/*/*") if p.is_dir() and p.name.isdigit()]
    assert not trials, trials
    assert not (outputs / "runs").exists()
    # Every check runs before the sweep's MLflow parent run is opened: no tracking store at all.
    assert not (outputs / "mlflow.db").exists()
    assert not (outputs / "mlartifacts").exists()
    assert not (tmp_path / "mlruns").exists()
    return lines[0]


@pytest.mark.parametrize(("args", "fragments"), [
    # 1. malformed sweep grammar, as a user types it (the shell has removed the quotes) ...
    (["optimizer.lr=interval(1e-3"], ("command line", "no viable alternative at input 'interval(1e-3'")),
    # ... addressed through the sweeper's params ...
    (["hydra.sweeper.params.optimizer.lr='interval(1e-3'"],
     ("hydra.sweeper.params.optimizer", "Hydra reads the dots", "optimizer.lr='tag(log")),
    # ... and as a whole params mapping (reaches the sweeper's own grammar check)
    (["hydra.sweeper.params={optimizer.lr:'interval(1e-3'}"],
     ("hydra.sweeper.params.optimizer.lr", "is not valid Hydra sweep syntax", "no viable alternative")),
    # 2. a swept key that is not in the config
    (["optimizr.lr=1e-3,1e-2"],
     ("hydra.sweeper.params.optimizr.lr", "is not a key of the config", "Did you mean `optimizer.lr`?")),
    # 3. unknown sampler / pruner
    (["hydra.sweeper.sampler=tpee"], ("hydra.sweeper.sampler", "'tpee' is not a known sampler", "`tpe`")),
    (["hydra.sweeper.pruner=medain"], ("hydra.sweeper.pruner", "'medain' is not a known pruner", "`median`")),
    # 4. an objective a run never returns
    (["hydra.sweeper.objective=accuracy"],
     ("hydra.sweeper.objective", "'accuracy' is not a metric a run returns", "val_loss")),
    # 5. a storage URL with an unknown scheme
    (["hydra.sweeper.storage=foo://bar"], ("hydra.sweeper.storage", "cannot open the Optuna storage 'foo://bar'")),
    # 7. parallel slots on the in-process launcher
    (["hydra.sweeper.max_parallel=2", "hydra/launcher=basic"],
     ("hydra.sweeper.max_parallel", "is 2, but the basic launcher", "hydra/launcher=joblib")),
    # 8. counts, multi-objective pruning, a seed in the sampler's args, a custom space that cannot be imported
    (["hydra.sweeper.n_trials=0"], ("hydra.sweeper.n_trials", "is 0; it must be at least 1")),
    (["hydra.sweeper.pruner=median", "hydra.sweeper.objective=[val_loss,steps_per_s]",
      "hydra.sweeper.direction=[minimize,maximize]"],
     ("hydra.sweeper.pruner", "cannot prune a study with 2 objectives", "hydra.sweeper.pruner=none")),
    (["hydra.sweeper.sampler_args={seed:3}"],
     ("hydra.sweeper.sampler_args.seed", "not set in the preset", "++hydra.sweeper.sampler_args.seed=")),
    (["++hydra.sweeper.sampler_args={seed:3}"],
     ("hydra.sweeper.sampler_args", "sets `seed`", "hydra.sweeper.seed")),
    (["hydra.sweeper.custom_search_space=nowhere.fn"],
     ("hydra.sweeper.custom_search_space", "cannot import 'nowhere.fn'")),
], ids=["grammar-cli", "grammar-params-key", "grammar-params-dict", "unknown-key", "sampler", "pruner",
        "objective", "storage-scheme", "max-parallel-basic", "n-trials-0", "multi-objective-pruner",
        "sampler-args-seed", "sampler-args-seed-forced", "custom-space"])
def test_sweep_refused(tmp_path: Path, args: list[str], fragments: tuple[str, ...]) -> None:
    # Hydra's own grammar error and one of the sweeper's run as a user's command would; the others in-process.
    process = args[0] in ("optimizer.lr=interval(1e-3", "hydra.sweeper.pruner=medain")
    _assert_refused(_sweep(tmp_path, *args, process=process), tmp_path, *fragments)


def test_storage_server_unreachable_fails_fast(tmp_path: Path) -> None:
    """Nothing listens on port 1 (and the driver may be missing): a clean error within seconds, not a hang."""
    start = time.monotonic()
    proc = _sweep(tmp_path, "hydra.sweeper.storage=postgresql://nobody@127.0.0.1:1/db")
    elapsed = time.monotonic() - start
    _assert_refused(proc, tmp_path, "hydra.sweeper.storage",
                    "cannot open the Optuna storage 'postgresql://nobody@127.0.0.1:1/db'")
    assert elapsed < 60, f"took {elapsed:.1f} s"


def test_unknown_preset(tmp_path: Path) -> None:
    proc = _sweep(tmp_path, preset="quikstart")
    _assert_refused(proc, tmp_path, "sweep preset", "'quikstart' is not a preset", "Did you mean `quickstart`?")
    assert not (tmp_path / "outputs").exists()


def test_study_direction_differs(tmp_path: Path) -> None:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    journal = tmp_path / "shared.journal"

    def storage() -> JournalStorage:
        return JournalStorage(JournalFileBackend(str(journal)))

    optuna.create_study(study_name="shared", storage=storage(), direction="maximize")
    proc = _sweep(tmp_path, f"hydra.sweeper.storage=journal://{journal}", "hydra.sweeper.study_name=shared")
    _assert_refused(proc, tmp_path, "hydra.sweeper.direction", "['minimize']", "created with ['maximize']")
    study = optuna.load_study(study_name="shared", storage=storage())
    assert [d.name for d in study.directions] == ["MAXIMIZE"]
    assert study.trials == []
