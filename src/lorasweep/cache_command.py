"""``lorasweep cache info|clear``: what the machine-wide cache holds (feature entries, built tiny models, the
synthetic data set) and removing parts of it. Imports no torch, so it answers at once."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.filesize import decimal
from rich.table import Table

from lorasweep.config.paths import cache_root
from lorasweep.data.feature_cache import CacheReport, cache_info, clear_cache, expand_sections
from lorasweep.errors import UserError

# Sections that take minutes to rebuild (or hold the only copy of a generated data set): cleared only when
# named and confirmed.
_SLOW_TO_REBUILD = {"models": "the built tiny models (rebuilt on next use, a few minutes)",
                    "data": "the generated synthetic data set (regenerated on next use)"}
_MAX_IDS_SHOWN = 4


def _ids_text(ids: tuple[str, ...], complete: bool) -> str:
    shown = list(ids[:_MAX_IDS_SHOWN])
    if len(ids) > _MAX_IDS_SHOWN:
        shown.append(f"+{len(ids) - _MAX_IDS_SHOWN} more")
    elif not complete and ids:
        shown.append("… (first entries read)")
    return ", ".join(shown) or "-"


def render_info(report: CacheReport, console: Console) -> None:
    table = Table(title="lorasweep cache", title_justify="left")
    table.add_column("section", no_wrap=True)
    table.add_column("entries", justify="right", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("belongs to")
    table.add_column("location", no_wrap=True)
    for info in report.sections.values():
        table.add_row(info.name, str(info.entries), decimal(info.bytes), _ids_text(info.ids, info.ids_complete),
                      str(info.path.relative_to(report.root)))
    console.print(table)
    state = "" if report.root.is_dir() else " (does not exist yet)"
    console.print(f"cache root: {report.root}{state}", soft_wrap=True, highlight=False)
    console.print(f"total: {report.total_entries} entries, {decimal(report.total_bytes)}", highlight=False)


def _confirm(root: Path, sections: tuple[str, ...], assume_yes: bool) -> bool:
    """Whether clearing may go ahead: always for feature entries (cheap to rebuild); for models/data only
    with --yes or a "y" typed at a terminal."""
    slow = [s for s in sections if s in _SLOW_TO_REBUILD]
    if not slow or assume_yes:
        return True
    what = " and ".join(_SLOW_TO_REBUILD[s] for s in slow)
    if not sys.stdin.isatty():
        raise UserError("cache clear", f"would remove {what} from {root}, which needs confirmation, and there is "
                        "no terminal to ask.", "Add --yes to remove them.")
    answer = input(f"Remove {what} from {root}? Runs using them right now may fail. [y/N] ")
    return answer.strip().lower() in ("y", "yes")


def cache_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lorasweep cache",
        description="The cache shared by every run on this machine: VAE latents and text-encoder outputs "
                    "(features), built tiny models and the generated synthetic data set.")
    actions = parser.add_subparsers(dest="action", required=True, metavar="{info,clear}")
    cache_help = "the cache root (default: $LORASWEEP_CACHE_DIR or ~/.cache/lorasweep; model.cache_dir of a run)"
    info = actions.add_parser("info", help="entries and size of each section")
    info.add_argument("--cache-dir", default=None, help=cache_help)
    clear = actions.add_parser("clear", help="remove sections (default: features = latents + text)")
    clear.add_argument("sections", nargs="*", default=["features"], metavar="SECTION",
                       help="latents, text, features (= latents + text, the default), models, data or all; "
                            "models, data and all ask for confirmation")
    clear.add_argument("--cache-dir", default=None, help=cache_help)
    clear.add_argument("-y", "--yes", action="store_true", help="do not ask before removing models or data")
    args = parser.parse_args(argv)

    root = cache_root(args.cache_dir)
    console = Console(highlight=False)
    if args.action == "info":
        render_info(cache_info(root), console)
        return 0
    sections = expand_sections(args.sections)
    if not _confirm(root, sections, args.yes):
        console.print("Nothing removed.")
        return 1
    result = clear_cache(root, sections)
    console.print(f"Removed {result.total_entries} entries ({decimal(result.total_bytes)}) from "
                  f"{', '.join(sections)} in {root}.", soft_wrap=True)
    for path in result.skipped:
        console.print(f"kept (in use by another process): {path}", soft_wrap=True)
    return 0
