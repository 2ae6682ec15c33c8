"""Tag statistics of a data set: the run folder's ``tag_frequency.txt`` and ``ss_tag_frequency``."""

from __future__ import annotations

from collections import Counter

from lorasweep.data.dataset import ImageItem


def split_tags(caption: str) -> list[str]:
    """kohya's notion of a tag: a comma-separated piece of the caption, stripped."""
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def tag_frequency(items: list[ImageItem]) -> dict[str, dict[str, int]]:
    """Per concept folder (``<repeats>_<name>``), how many images carry each tag (kohya's format)."""
    per_dir: dict[str, Counter[str]] = {}
    for item in items:
        per_dir.setdefault(item.path.parent.name, Counter()).update(set(split_tags(item.caption)))
    return {folder: dict(counts) for folder, counts in sorted(per_dir.items())}


def format_tag_frequency(frequency: dict[str, dict[str, int]]) -> str:
    """Most frequent first, ties alphabetical: the order a user scans for typos and dominant tags."""
    lines = []
    for folder, counts in frequency.items():
        lines.append(f"[{folder}]")
        lines.extend(f"{count}\t{tag}" for tag, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
        lines.append("")
    return "\n".join(lines)
