"""Sweeps: the Optuna sweeper's controller, the trial-side reporter, the MLflow parent run and the report.

Public entry points: :func:`lorasweep.sweeping.report.build_report` (``lorasweep report``) and the Hydra
plugin ``hydra/sweeper=lorasweep_optuna`` (:mod:`hydra_plugins.lorasweep_optuna`).
"""
