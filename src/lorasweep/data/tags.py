"""Tag statistics of a data set: the run folder's ``tag_frequency.txt`` and ``ss_tag_frequency``."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from lorasweep.config.data import TAG_FREQUENCY_SORTS
from lorasweep.data.dataset import ImageItem


def split_tags(caption: str) -> list[str]:
    """kohya's notion of a tag: a comma-separated piece of the caption, stripped (empty pieces dropped)."""
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def tag_frequency(items: Iterable[ImageItem]) -> dict[str, dict[str, int]]:
    """Per concept folder (``<repeats>_<name>``), how many images carry each tag: the
    ``{folder: {tag: count}}`` shape of kohya's ``ss_tag_frequency`` metadata."""
    per_dir: dict[str, Counter[str]] = {}
    for item in items:
        per_dir.setdefault(item.path.parent.name, Counter()).update(set(split_tags(item.caption)))
    return {folder: dict(counts) for folder, counts in sorted(per_dir.items())}


def format_tag_frequency(frequency: dict[str, dict[str, int]], sort: str = "count") -> str:
    """One ``[folder]`` section per concept, a ``count<TAB>tag`` line per tag.

    ``count``: most frequent first, ties alphabetical (the order a user scans for dominant tags);
    ``alpha``: alphabetical (the order a user scans for typos and near-duplicates).
    """
    if sort not in TAG_FREQUENCY_SORTS:
        raise ValueError(f"sort must be one of {TAG_FREQUENCY_SORTS}, got {sort!r}")
    lines = []
    for folder, counts in frequency.items():
        lines.append(f"[{folder}]")
        if sort == "count":
            ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        else:
            ordered = sorted(counts.items(), key=lambda kv: (kv[0].casefold(), kv[0]))
        lines.extend(f"{count}\t{tag}" for tag, count in ordered)
        lines.append("")
    return "\n".join(lines)
