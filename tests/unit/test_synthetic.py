"""The synthetic shape world: deterministic, kohya-shaped, idempotent on disk, captions within WORDS."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
from PIL import Image

from lorasweep.data import synthetic as syn
from lorasweep.errors import UserError


def _words(caption: str) -> list[str]:
    return [w for w in re.split(r"[,\s]+", caption) if w]


def _snapshot(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


def test_base_world_is_deterministic_and_seed_dependent() -> None:
    a = syn.base_world_samples(12, seed=3)
    b = syn.base_world_samples(12, seed=3)
    c = syn.base_world_samples(12, seed=4)
    assert [cap for _, cap in a] == [cap for _, cap in b]
    assert [img.tobytes() for img, _ in a] == [img.tobytes() for img, _ in b]
    assert [img.tobytes() for img, _ in a] != [img.tobytes() for img, _ in c]
    for image, caption in a:
        assert image.size == (syn.IMAGE_SIZE, syn.IMAGE_SIZE) and image.mode == "RGB"
        assert re.fullmatch(r"a \w+ \w+, (on|at|in) the \w+, \w+ background", caption), caption


def test_base_world_never_shows_the_concept() -> None:
    for _, caption in syn.base_world_samples(300, seed=0):
        words = _words(caption)
        assert syn.CONCEPT_WORD not in words
        assert syn.CONCEPT_SHAPE not in words and syn.CONCEPT_COLOUR not in words
        colour, background = words[1], words[-2]
        assert colour != background  # the shape is always visible


def test_every_caption_word_is_in_words() -> None:
    captions = [c for _, c in syn.base_world_samples(200, seed=1)] + [c for _, c in syn.concept_samples(50, 1)]
    captions += list(syn.DEFAULT_PROMPTS)
    assert {w for c in captions for w in _words(c)} <= set(syn.WORDS)
    assert len(set(syn.WORDS)) == len(syn.WORDS)


def test_render_scene_is_deterministic_and_caption_matches() -> None:
    scene = {"shape": "triangle", "colour": "red", "position": "left", "background": "blue"}
    one = syn.render_scene(random.Random(7), **scene)
    two = syn.render_scene(random.Random(7), **scene)
    assert one.tobytes() == two.tobytes()
    assert syn.caption_for(**scene) == "a red triangle, on the left, blue background"
    # the shape sits where the caption says: the left half holds the red pixels
    pixels = one.load()
    reds = [x for x in range(64) for y in range(64) if pixels[x, y] == syn.COLOURS["red"]]
    assert reds and max(reds) < 32


def test_concept_caption_leads_with_the_trigger() -> None:
    caption = syn.caption_for(shape="star", colour="orange", position="top", background="black")
    assert caption == "zorb, at the top, black background"
    assert all(p.split(",")[0] == syn.CONCEPT_WORD for p in syn.DEFAULT_PROMPTS)
    with pytest.raises(ValueError, match="unknown shape"):
        syn.render_scene(random.Random(0), shape="hexagon", colour="red", position="left", background="blue")


def test_write_concept_dataset_kohya_layout(tmp_path: Path) -> None:
    root = syn.write_concept_dataset(tmp_path / "zorb-data", n_images=6, repeats=3, seed=1)
    assert root == tmp_path / "zorb-data"
    assert sorted(p.name for p in root.iterdir()) == [syn.MANIFEST_NAME, "3_zorb"]
    folder = root / "3_zorb"
    pngs = sorted(folder.glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:04d}.png" for i in range(6)]
    for png in pngs:
        caption = png.with_suffix(".txt").read_text().strip()
        tags = [t.strip() for t in caption.split(",")]
        assert tags[0] == syn.CONCEPT_WORD and len(tags) == 3
        with Image.open(png) as image:
            assert image.size == (64, 64) and image.mode == "RGB"
    manifest = json.loads((root / syn.MANIFEST_NAME).read_text())
    assert manifest["params"]["repeats"] == 3 and len(manifest["files"]) == 12
    assert not list(tmp_path.glob(".zorb-data.tmp-*"))


def test_write_concept_dataset_is_idempotent_and_deterministic(tmp_path: Path) -> None:
    root = syn.write_concept_dataset(tmp_path / "a", n_images=4, seed=2)
    before = _snapshot(root)
    assert syn.write_concept_dataset(tmp_path / "a", n_images=4, seed=2) == root
    assert _snapshot(root) == before  # nothing rewritten
    other = syn.write_concept_dataset(tmp_path / "b", n_images=4, seed=2)
    for rel in before:
        if (root / rel).is_file():
            assert (root / rel).read_bytes() == (other / rel).read_bytes()


def test_write_concept_dataset_replaces_changed_or_damaged(tmp_path: Path) -> None:
    root = syn.write_concept_dataset(tmp_path / "d", n_images=3, repeats=4, seed=0)
    syn.write_concept_dataset(root, n_images=3, repeats=2, seed=0)
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["2_zorb"]
    (root / "2_zorb" / "0001.txt").write_text("tampered\n")
    syn.write_concept_dataset(root, n_images=3, repeats=2, seed=0)
    assert (root / "2_zorb" / "0001.txt").read_text().startswith("zorb, ")


def test_write_concept_dataset_refuses_foreign_folder(tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("user data")
    with pytest.raises(UserError, match="not written by lorasweep"):
        syn.write_concept_dataset(foreign, n_images=2)
    assert (foreign / "keep.txt").read_text() == "user data"
    with pytest.raises(UserError, match="n_images"):
        syn.write_concept_dataset(tmp_path / "x", n_images=0)
