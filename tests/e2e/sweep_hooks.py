"""``hydra.sweeper.custom_search_space`` functions for the sweep tests: they give trials known behaviour
by trial number (long or short, good or bad learning rate), on top of the sampled search space."""

from __future__ import annotations

from typing import Any


def long_first(cfg: Any, trial: Any) -> dict[str, Any]:
    """Trial 0 trains much longer than the others, so one slot frees up several times while it runs."""
    return {"training.max_steps": 200 if trial.number == 0 else 4, "validation.every_n_steps": 100}


def outcomes(cfg: Any, trial: Any) -> dict[str, Any]:
    """0: a good lr (COMPLETE); 1: a far too large lr (worse than the median: PRUNED); 2: an exploding lr
    (non-finite loss: FAIL); 3: an invalid rank (a UserError in the job: FAIL); later: a good lr, except
    trial 5, which explodes again."""
    if trial.number == 3:
        return {"network.dim": 0}
    lr = {0: 1e-3, 1: 0.3, 2: 10.0, 5: 10.0}.get(trial.number, 1e-3)
    return {"optimizer.lr": lr}


def launcher_check(cfg: Any, trial: Any) -> dict[str, Any]:
    """0: short, good lr (COMPLETE); 1: long (its slot stays busy while the others run); 2: a far too large lr
    (worse than trial 0 at step 10: PRUNED); later: short (COMPLETE)."""
    long = trial.number == 1
    return {"training.max_steps": 100 if long else 20, "validation.every_n_steps": 50 if long else 10,
            "optimizer.lr": 0.3 if trial.number == 2 else 1e-3}
