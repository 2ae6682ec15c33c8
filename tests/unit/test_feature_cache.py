"""The shared on-disk feature cache: bitwise round trips, content keys, one build per key across processes,
damaged entries rebuilt, and the `lorasweep cache info|clear` command."""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from rich.filesize import decimal

from lorasweep.cli import main
from lorasweep.data import feature_cache as fc
from lorasweep.data.feature_cache import FeatureCache, cache_info, clear_cache, file_sha256, latent_key, text_key
from lorasweep.errors import UserError
from tests.conftest import LORASWEEP, run_cli, user_error_line

LATENT_PARTS = {"vae_id": "tiny-sd1/vae", "image_sha256": "ab" * 32, "bucket": (64, 48), "resized": (70, 48),
                "crop": (3, 0), "flip": False, "device_type": "cpu", "dtype": "float32"}
TEXT_PARTS = {"text_encoder_id": "tiny-sd1/text_encoder", "tokenizer_id": "tiny-sd1/tokenizer",
              "caption": "zorb, a red circle", "clip_skip": 1, "max_token_length": 75, "device_type": "cpu",
              "dtype": "float32"}
CHANGED = {"vae_id": "other/vae", "image_sha256": "cd" * 32, "bucket": (48, 64), "resized": (64, 48),
           "crop": (0, 3), "flip": True, "device_type": "cuda", "dtype": "bfloat16",
           "text_encoder_id": "other/te", "tokenizer_id": "other/tok", "caption": "zorb, a red circle ",
           "clip_skip": 2, "max_token_length": 150}


def _text_keys(n: int, model: str = "te") -> list[fc.FeatureKey]:
    return [text_key(**{**TEXT_PARTS, "text_encoder_id": model, "caption": f"caption {i}"}) for i in range(n)]


def _all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_put_get_round_trip_is_bitwise_and_stores_the_key_parts(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    cache = FeatureCache(tmp_path, "latents")
    key = latent_key(**LATENT_PARTS)
    assert cache.get(key) is None
    base = torch.randn(8, 6, 5, generator=torch.Generator().manual_seed(0))
    tensors = {"moments": base, "half": base.to(torch.bfloat16), "strided": base.transpose(1, 2)[:, ::2],
               "view": base[:4], "ids": torch.arange(7)}  # views of one storage, a non-contiguous one
    cache.put(key, tensors)
    got = cache.get(key)
    assert got is not None and set(got) == set(tensors)
    for name, tensor in tensors.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    path = tmp_path / "features" / "latents" / key[:2] / f"{key}.safetensors"
    assert _all_files(tmp_path) == [path]  # no temporary file left behind
    meta = fc.read_header(path)["__metadata__"]
    assert meta["vae_id"] == "tiny-sd1/vae" and meta["bucket"] == "[64, 48]" and meta["flip"] == "false"
    assert meta["lorasweep_key"] == key and meta["schema"] == fc.LATENT_SCHEMA

    def failing_rename(src: str, dst: Path) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(fc.os, "replace", failing_rename)
    other = latent_key(**{**LATENT_PARTS, "flip": True})
    with pytest.raises(OSError, match="disk full"):
        cache.put(other, tensors)
    assert _all_files(tmp_path) == [path]  # the failed write left neither an entry nor a temporary file


def test_keys_change_with_every_part_and_are_stable_across_processes() -> None:
    for make, parts in ((latent_key, LATENT_PARTS), (text_key, TEXT_PARTS)):
        base = make(**parts)
        assert len(base) == 64 and make(**dict(reversed(parts.items()))) == base
        changed = {name: make(**{**parts, name: CHANGED[name]}) for name in parts}
        assert len({base, *changed.values()}) == len(parts) + 1, changed
    code = ("from lorasweep.data.feature_cache import latent_key, text_key; "
            f"print(latent_key(**{LATENT_PARTS!r})); print(text_key(**{TEXT_PARTS!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"}).stdout.split()
    assert out == [latent_key(**LATENT_PARTS), text_key(**TEXT_PARTS)]


def test_file_sha256_is_memoised_until_the_file_changes(tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(b"first")
    assert file_sha256(image) == hashlib.sha256(b"first").hexdigest()
    hits = fc._sha256_of.cache_info().hits
    assert file_sha256(tmp_path / "." / "a.png") == hashlib.sha256(b"first").hexdigest()
    assert fc._sha256_of.cache_info().hits == hits + 1
    mtime = image.stat().st_mtime_ns
    image.write_bytes(b"second")
    os.utime(image, ns=(mtime + 10**9, mtime + 10**9))
    assert file_sha256(image) == hashlib.sha256(b"second").hexdigest()


def test_get_or_compute_builds_only_the_misses_once_and_keeps_order(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path, "text")
    keys = _text_keys(5)
    cache.put(keys[1], {"hidden_states": torch.full((2, 3), 1.0)})
    cache.put(keys[3], {"hidden_states": torch.full((2, 3), 3.0)})
    calls: list[list[int]] = []

    def compute(indices: list[int]) -> list[dict[str, torch.Tensor]]:
        calls.append(indices)
        return [{"hidden_states": torch.full((2, 3), float(i))} for i in indices]

    wanted = [keys[0], keys[1], keys[2], keys[0], keys[3], keys[4]]  # keys[0] twice
    out = cache.get_or_compute(wanted, compute, lock_name="te")
    assert calls == [[0, 2, 5]]
    assert [o["hidden_states"][0, 0].item() for o in out] == [0, 1, 2, 0, 3, 5]
    assert (cache.hits, cache.built, cache.summary()) == (2, 3, "2 hits, 3 built")
    again = cache.get_or_compute(list(reversed(wanted)), compute, lock_name="te")
    assert len(calls) == 1 and [o["hidden_states"][0, 0].item() for o in again] == [5, 3, 0, 2, 1, 0]
    assert (cache.hits, cache.built) == (7, 3)
    with pytest.raises(ValueError, match="1 results for 2 keys"):
        cache.get_or_compute(_text_keys(2, model="other"), lambda idx: [{"x": torch.zeros(1)}], lock_name="x")


def test_a_damaged_entry_is_a_miss_removed_and_rebuilt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = FeatureCache(tmp_path, "text")
    keys = _text_keys(2)
    for i, key in enumerate(keys):
        cache.put(key, {"hidden_states": torch.full((4, 8), float(i))})
    first, second = cache.path_for(keys[0]), cache.path_for(keys[1])
    first.write_bytes(first.read_bytes()[:-10])  # cut short
    second.write_bytes(first.read_bytes())  # whole-looking file of another key
    with caplog.at_level(logging.WARNING, logger=fc.__name__):
        assert cache.get(keys[0]) is None and cache.get(keys[1]) is None
    assert not first.exists() and not second.exists()
    assert sum("unreadable" in r.message for r in caplog.records) == 2
    out = cache.get_or_compute(keys, lambda idx: [{"hidden_states": torch.full((4, 8), 7.0)} for _ in idx],
                               lock_name="te")
    assert cache.built == 2 and all(torch.equal(o["hidden_states"], torch.full((4, 8), 7.0)) for o in out)
    assert torch.equal(cache.get(keys[0])["hidden_states"], torch.full((4, 8), 7.0))  # type: ignore[index]


def _racer(root: Path, log: Path, me: int, out: Path) -> None:
    """One of two processes that look the same six keys up at the same moment and then build the misses."""
    keys = _text_keys(6)
    (root / f"ready-{me}").touch()
    while len(list(root.glob("ready-*"))) < 2:
        time.sleep(0.005)

    def compute(indices: list[int]) -> list[dict[str, torch.Tensor]]:
        with open(log, "a") as fh:
            fh.write("".join(f"{i}\n" for i in indices))
        time.sleep(0.5)  # the other process has long missed by now, and waits for the lock
        return [{"hidden_states": torch.full((3, 4), float(i))} for i in indices]

    cache = FeatureCache(root, "text")
    got = cache.get_or_compute(keys, compute, lock_name="te")
    assert [o["hidden_states"][0, 0].item() for o in got] == list(range(6))
    out.write_text(json.dumps([cache.hits, cache.built]))


def test_two_processes_racing_build_each_key_once(tmp_path: Path) -> None:
    # fork: the children share this process's imported torch instead of importing it again (seconds each)
    ctx = multiprocessing.get_context("fork")
    log = tmp_path / "computed.txt"
    procs = [ctx.Process(target=_racer, args=(tmp_path, log, n, tmp_path / f"out-{n}.json")) for n in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
    assert [proc.exitcode for proc in procs] == [0, 0]
    assert sorted(log.read_text().split()) == [str(i) for i in range(6)]
    results = sorted(json.loads((tmp_path / f"out-{n}.json").read_text()) for n in range(2))
    assert results == [[0, 6], [6, 0]]  # one process built all six, the other found all six after the lock
    leftovers = [p for p in (tmp_path / "features").rglob("*") if p.is_file() and p.suffix != ".safetensors"]
    assert [p.name for p in leftovers] == ["te.lock"]


def _fill(root: Path) -> dict[str, int]:
    """3 latent entries (two VAEs), 2 text entries, a built model, a data set, and things that are not ours."""
    latents, text = FeatureCache(root, "latents"), FeatureCache(root, "text")
    for i in range(3):
        key = latent_key(**{**LATENT_PARTS, "vae_id": f"vae-{i % 2}", "image_sha256": f"{i:064x}"})
        latents.put(key, {"moments": torch.randn(8, 4, 4)})
    for key in _text_keys(2):
        text.put(key, {"hidden_states": torch.randn(5, 16)})
    model = root / "models" / "tiny-sd1-v9"
    (model / "unet").mkdir(parents=True)
    (model / fc.TINY_MANIFEST).write_text("{}")
    (model / "unet" / "w.safetensors").write_bytes(b"x" * 1000)
    data = root / "data" / "synthetic-zorb"
    data.mkdir(parents=True)
    (data / fc.SYNTHETIC_MANIFEST).write_text("{}")
    (data / "0000.png").write_bytes(b"p" * 300)
    (root / "models" / "mine").mkdir()  # no manifest: not lorasweep's, never touched
    (root / "models" / "mine" / "keep.bin").write_bytes(b"k")
    return {name: sum(p.stat().st_size for p in _all_files(section)) for name, section in
            (("latents", root / "features" / "latents"), ("text", root / "features" / "text"),
             ("models", model), ("data", data))}


def test_cache_info_counts_and_clear_features_keeps_models_and_data(tmp_path: Path) -> None:
    sizes = _fill(tmp_path)
    report = cache_info(tmp_path)
    assert {n: (s.entries, s.bytes) for n, s in report.sections.items()} == \
        {"latents": (3, sizes["latents"]), "text": (2, sizes["text"]), "models": (1, sizes["models"]),
         "data": (1, sizes["data"])}
    assert report.sections["latents"].ids == ("vae-0", "vae-1") and report.sections["text"].ids == ("te",)
    assert report.sections["models"].ids == ("tiny-sd1-v9",)

    result = clear_cache(tmp_path, ["features"])
    assert (result.entries, result.bytes) == ({"latents": 3, "text": 2},
                                              {"latents": sizes["latents"], "text": sizes["text"]})
    after = cache_info(tmp_path).sections
    assert [after[s].entries for s in fc.SECTIONS] == [0, 0, 1, 1]
    assert (tmp_path / "models" / "mine" / "keep.bin").exists()
    with pytest.raises(UserError, match="no cache section 'model'"):
        clear_cache(tmp_path, ["model"])


def test_clear_models_waits_for_no_build_and_removes_leftovers(tmp_path: Path) -> None:
    sizes = _fill(tmp_path)
    leftover = tmp_path / "models" / ".tiny-sd1-v9.tmp-abc"  # an interrupted build
    leftover.mkdir()
    (leftover / "half.bin").write_bytes(b"h" * 50)
    with FileLock(str(tmp_path / "models" / ".tiny-sd1-v9.lock")):  # a build in progress
        busy = clear_cache(tmp_path, ["models"])
    assert busy.total_entries == 0 and sorted(busy.skipped) == [leftover, tmp_path / "models" / "tiny-sd1-v9"]
    done = clear_cache(tmp_path, ["all"])
    assert done.entries == {"latents": 3, "text": 2, "models": 1, "data": 1}
    assert done.bytes["models"] == sizes["models"] + 50 and not done.skipped
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [".tiny-sd1-v9.lock", "mine"]


def test_manifest_names_match_the_builders() -> None:
    from lorasweep.data import synthetic
    from lorasweep.models import tiny

    assert (fc.TINY_MANIFEST, fc.SYNTHETIC_MANIFEST) == (tiny.MANIFEST_NAME, synthetic.MANIFEST_NAME)


def test_cache_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sizes = _fill(tmp_path)
    cache = str(tmp_path)
    info = run_cli(["cache", "info", "--cache-dir", cache], cwd=tmp_path, env={"COLUMNS": "200"})
    assert info.returncode == 0, info.stderr
    rows = {line.split()[1]: line for line in info.stdout.splitlines() if line.startswith("│")}
    for section, entries in (("latents", 3), ("text", 2), ("models", 1), ("data", 1)):
        assert f" {entries} │" in rows[section] and decimal(sizes[section]) in rows[section], rows[section]
    assert "vae-0, vae-1" in rows["latents"] and f"cache root: {tmp_path}" in info.stdout

    bad = run_cli(["cache", "clear", "latent", "--cache-dir", cache], cwd=tmp_path)
    user_error_line(bad.returncode, bad.stderr, "cache clear", "'latent'", "features")
    refused = subprocess.run([*LORASWEEP, "cache", "clear", "models", "--cache-dir", cache], cwd=tmp_path,
                             stdin=subprocess.DEVNULL, capture_output=True, text=True)
    user_error_line(refused.returncode, refused.stderr, "--yes", "tiny models")
    assert (tmp_path / "models" / "tiny-sd1-v9").is_dir()

    assert main(["cache", "clear", "--cache-dir", cache]) == 0  # in-process: saves a start-up per command
    assert "Removed 5 entries" in capsys.readouterr().out
    assert [s.entries for s in cache_info(tmp_path).sections.values()] == [0, 0, 1, 1]
    assert main(["cache", "clear", "models", "--yes", "--cache-dir", cache]) == 0
    assert "Removed 1 entries" in capsys.readouterr().out
    assert not (tmp_path / "models" / "tiny-sd1-v9").exists() and (tmp_path / "data" / "synthetic-zorb").is_dir()
