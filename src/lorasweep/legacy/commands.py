"""``lorasweep import-legacy`` (a legacy file → YAML config or overrides) and ``lorasweep queue`` (LETS
``multi_run_folder``: every JSON of a folder as one multirun)."""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path
from typing import Any

from lorasweep.errors import UserError
from lorasweep.legacy.convert import Conversion, convert_file, hydra_value, render_yaml


def _show(value: Any) -> str:
    return hydra_value(value) if isinstance(value, str) else "null" if value is None else \
        str(value).lower() if isinstance(value, bool) else repr(value)


def report_lines(conversion: Conversion) -> list[str]:
    """Every setting of the file: ``legacy → key = value`` when mapped, ``legacy: why`` when not."""
    lines = [f"{conversion.path} ({conversion.kind}): {len(conversion.mapped)} mapped, "
             f"{len(conversion.not_applied)} not applied."]
    if conversion.mapped:
        lines.append("mapped:")
        lines += [f"  {m.source} → {m.key} = {_show(m.value)}" for m in conversion.mapped]
    if conversion.not_applied:
        lines.append("not applied:")
        lines += [f"  {n.source}: {n.reason}" for n in conversion.not_applied]
    return lines


def _validate(conversion: Conversion) -> None:
    """Compose the converted settings onto lorasweep's defaults and validate, so range errors and impossible
    combinations are found now, named by the legacy setting."""
    from lorasweep.app import compose_config
    from lorasweep.config.train import to_train_config

    try:
        to_train_config(compose_config(conversion.overrides()))
    except UserError as exc:
        raise conversion.blame(exc) from None


def import_legacy_main(argv: list[str]) -> int:
    from lorasweep.tracking.files import atomic_write_text

    parser = argparse.ArgumentParser(
        prog="lorasweep import-legacy",
        description="Convert a LETS JSON, a kohya train_network.py TOML config or a file of its command-line "
                    "arguments into a lorasweep YAML config (-o) or command-line overrides, listing every "
                    "setting it mapped and every one it could not, with the reason.")
    parser.add_argument("file", help="the LETS .json, kohya .toml or arguments text file")
    parser.add_argument("-o", "--output", default=None,
                        help="write a YAML config here (NAME.yaml; never overwritten); train with "
                             "`lorasweep train --config-dir DIR --config-name NAME`")
    parser.add_argument("--skip", default="",
                        help="comma-separated settings not to import (like LETS json_load_skip_list), "
                             "e.g. base_model,img_folder,output_folder")
    args = parser.parse_args(argv)
    skip = [s.strip() for s in args.skip.split(",") if s.strip()]
    out = Path(args.output).expanduser() if args.output else None
    if out is not None:
        if out.suffix != ".yaml":
            raise UserError(str(out), "must end in .yaml (Hydra finds configs by NAME.yaml).",
                            f"Use e.g. -o {out.with_suffix('.yaml')}.")
        if out.stem == "train":
            raise UserError(str(out), "would hide lorasweep's own primary config `train`, which it builds on.",
                            "Choose another name.")
        if out.exists():
            raise UserError(str(out), "already exists and is never overwritten.",
                            "Choose another name or move the existing file away.")
    conversion = convert_file(Path(args.file).expanduser(), skip)
    _validate(conversion)
    print("\n".join(report_lines(conversion)))
    if out is None:
        print("\nAs command-line overrides:\n  lorasweep train "
              + " ".join(shlex.quote(o) for o in conversion.overrides()))
        return 0
    header = [f"Converted by `lorasweep import-legacy` from {conversion.path} ({conversion.kind})",
              f"on {time.strftime('%Y-%m-%d %H:%M:%S')}. Train with:",
              f"  lorasweep train --config-dir {out.parent.resolve()} --config-name {out.stem}",
              "Settings the file did not give keep lorasweep's defaults."]
    if conversion.not_applied:
        header += ["Not applied:"] + [f"  {n.source}: {n.reason}" for n in conversion.not_applied]
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, render_yaml(conversion.values(), header), overwrite=False)
    print(f"\nWrote {out}. Train with:\n  lorasweep train --config-dir {shlex.quote(str(out.parent.resolve()))} "
          f"--config-name {shlex.quote(out.stem)}")
    return 0


QUEUE_USAGE = """usage: lorasweep queue DIR [overrides]

Train every *.json in DIR (a LETS multi_run_folder), in name order, as one multirun: one run folder each
under outputs/sweeps/<date>_<run_name>/<n>, one MLflow parent run with a child run per file. Overrides apply
to every file and win over the files' settings (e.g. `data.train_dir=/data/x training.max_steps=500`).
Every file is read and checked before anything trains."""


def queue_main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(QUEUE_USAGE)
        return 0 if argv else 2
    folder, rest = Path(argv[0]).expanduser(), argv[1:]
    if not folder.is_dir():
        raise UserError(str(folder), "is not a folder.", "Give the folder of LETS JSON files (LETS "
                        "multi_run_folder): lorasweep queue DIR [overrides].")
    files = sorted(p.resolve() for p in folder.glob("*.json") if p.is_file())
    if not files:
        raise UserError(str(folder), "holds no .json files.", "Put one LETS JSON per training run there.")
    if any(a.split("=", 1)[0].lstrip("+~") == "legacy.load_json_path" for a in rest):
        raise UserError("legacy.load_json_path", "is set by `lorasweep queue` (one file per job).",
                        "Leave it out, or use `lorasweep train legacy.load_json_path=FILE` for one file.")
    print(f"Queue: {len(files)} file(s) from {folder}: {', '.join(p.name for p in files)}", flush=True)
    from lorasweep.app import train_main

    sweep = "legacy.load_json_path=" + ",".join(hydra_value(str(p)) for p in files)
    return train_main(["-m", sweep, *(a for a in rest if a not in ("-m", "--multirun"))])
