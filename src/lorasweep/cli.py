"""The ``lorasweep`` command: parses the sub-command and hands off. No logic lives here."""

from __future__ import annotations

import argparse
import sys

from lorasweep.errors import UserError

USAGE = """lorasweep <command> [args]

commands:
  train [overrides]         train one LoRA (Hydra overrides, e.g. optimizer.lr=3e-4 network.dim=16;
                            --help shows groups and the composed config, --cfg job prints it, -m sweeps)
  sweep PRESET [overrides]  run a sweep preset from sweeps/ (Optuna TPE + pruning, grids); run the same command
                            again to resume it. `lorasweep sweep --list` shows the presets
  report SWEEP_FOLDER       rebuild a sweep's leaderboard, optimization_results.yaml and plots (and log them
                            to its MLflow parent run)
  ui                        open the MLflow UI on the default store, bound to 127.0.0.1
  reproduce RUN [--check]   re-run a run folder (or an MLflow run id) from its saved config
  resume RUN [--state DIR] [--force]
                            continue a run (saved with output.save_state=true) from its latest training state
  import-legacy FILE [-o OUT.yaml] [--skip a,b]
                            convert a LETS JSON, kohya TOML or train_network.py argument file into a YAML config
                            (or overrides), listing every setting it mapped and every one it could not, and why
  queue DIR [overrides]     train every *.json in DIR (a LETS multi_run_folder) as one multirun
  cache info|clear [SECTION]
                            show the cache shared by every run (latents, text embeddings, built models, data)
                            or clear parts of it (default: features = latents + text)
"""


def _ui(argv: list[str]) -> int:
    from lorasweep.tracking.ui import run_ui

    parser = argparse.ArgumentParser(prog="lorasweep ui", description="Start the MLflow UI on lorasweep's store.")
    parser.add_argument("--output-root", default="outputs", help="output.root of your runs (default: outputs)")
    parser.add_argument("--uri", default=None, help="a tracking URI instead of <output-root>/mlflow.db")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args(argv)
    return run_ui(args.output_root, args.uri, args.host, args.port)


def _resume(argv: list[str]) -> int:
    from lorasweep.reproduce import resume

    parser = argparse.ArgumentParser(prog="lorasweep resume",
                                     description="Continue a run from its saved training state in a new run folder.")
    parser.add_argument("run", help="the run folder (trained with output.save_state=true)")
    parser.add_argument("--state", default=None, help="a state/step-NNNNNN folder (default: the latest)")
    parser.add_argument("--force", action="store_true",
                        help="resume although the run's config.yaml or data set changed since the state was saved")
    args = parser.parse_args(argv)
    return resume(args.run, state=args.state, force=args.force)


def _reproduce(argv: list[str]) -> int:
    from lorasweep.reproduce import reproduce

    parser = argparse.ArgumentParser(prog="lorasweep reproduce",
                                     description="Re-run a run from its saved config into a new run folder.")
    parser.add_argument("source", help="a run folder (with config.yaml) or an MLflow run id")
    parser.add_argument("--check", action="store_true",
                        help="compare every LoRA tensor and the validation loss with the original")
    parser.add_argument("--tracking-uri", default=None,
                        help="where to look up an MLflow run id (default: $MLFLOW_TRACKING_URI or "
                             "outputs/mlflow.db)")
    args = parser.parse_args(argv)
    return reproduce(args.source, check=args.check, tracking_uri=args.tracking_uri)


def _report(argv: list[str]) -> int:
    from lorasweep.sweeping.report import build_report

    parser = argparse.ArgumentParser(prog="lorasweep report",
                                     description="Rebuild a sweep's leaderboard, results file and plots.")
    parser.add_argument("sweep_dir", help="the sweep folder (outputs/sweeps/<sweep>)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log the report to the MLflow parent run")
    args = parser.parse_args(argv)
    folder = build_report(args.sweep_dir, log_to_mlflow=not args.no_mlflow)
    print(f"Report: {folder}")
    return 0


def _cache(argv: list[str]) -> int:
    from lorasweep.cache_command import cache_main

    return cache_main(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        if command == "train":
            from lorasweep.app import train_main

            return train_main(rest)
        if command == "sweep":
            from lorasweep.app import sweep_main

            return sweep_main(rest)
        if command == "report":
            return _report(rest)
        if command == "ui":
            return _ui(rest)
        if command == "reproduce":
            return _reproduce(rest)
        if command == "resume":
            return _resume(rest)
        if command == "import-legacy":
            from lorasweep.legacy.commands import import_legacy_main

            return import_legacy_main(rest)
        if command == "queue":
            from lorasweep.legacy.commands import queue_main

            return queue_main(rest)
        if command == "cache":
            return _cache(rest)
    except UserError as exc:
        from lorasweep.app import report_user_error

        return report_user_error(exc)
    print(f"lorasweep: error: unknown command {command!r}.\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
