"""lorasweep's Optuna-5 sweeper for Hydra: ``hydra/sweeper=lorasweep_optuna`` (see lorasweep.sweeping)."""
