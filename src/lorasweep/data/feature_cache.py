"""The content-addressed on-disk cache of VAE latents and text-encoder hidden states.

Encoding the training images with the VAE and the captions with the text encoder is the same work in every
trial of a sweep and every run on the same data, so the results are kept under
``<cache root>/features/<kind>/<key[:2]>/<key>.safetensors`` (kind ``latents`` or ``text``), shared by every
run, trial and process on the machine. The key is the sha256 of everything the result depends on (model ids,
image bytes, bucket/crop/flip, caption and tokenization, device type and dtype) plus a schema version, so a
hit is bitwise what a fresh computation on the same kind of device gives, and entries never go stale: they are
simply not looked up any more.

Concurrency: an entry is written to a temporary sibling and renamed into place (readers see the whole file or
none; two writers of one key write identical bytes, the last rename wins), and :meth:`FeatureCache.get_or_compute`
holds a file lock while it builds the missing entries, so parallel trials that start together build each entry
once. An unreadable entry (truncated by a full disk, damaged) is a miss: it is removed and built again.

No fsync: an entry is cheap to rebuild, and a file that a power cut leaves empty or short is detected as
unreadable, so durability is not worth a disk flush per image.

This module does not import torch at load time (``lorasweep cache info`` must start fast); the tensor
functions import it when called.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock, Timeout

from lorasweep.errors import UserError

if TYPE_CHECKING:
    import torch

__all__ = [
    "ALIASES", "KINDS", "SECTIONS", "CacheReport", "ClearResult", "FeatureCache", "FeatureKey", "SectionInfo",
    "cache_info", "clear_cache", "expand_sections", "file_sha256", "latent_key", "text_key",
]

log = logging.getLogger(__name__)

FEATURES_DIR = "features"
KINDS = ("latents", "text")
SECTIONS = ("latents", "text", "models", "data")
ALIASES: dict[str, tuple[str, ...]] = {"features": KINDS, "all": SECTIONS}
# Bump one of these when what is stored under a kind changes: old entries then no longer match any key.
LATENT_SCHEMA = "lorasweep-latents-2"  # 2: the CPU convolution kernels are part of device_type
TEXT_SCHEMA = "lorasweep-text-1"
# The metadata field that names the model an entry belongs to (shown by `lorasweep cache info`).
MODEL_ID_FIELD = {"latents": "vae_id", "text": "text_encoder_id"}
# How many entry headers `cache_info` reads per kind to list the model ids (the rest are only counted).
MAX_ID_READS = 300
# A temporary file older than this is left over from a crashed writer (a put takes milliseconds).
STALE_TEMP_S = 3600.0
# The manifests that mark folders under models/ and data/ as lorasweep's (only those are ever removed). They
# equal lorasweep.models.tiny.MANIFEST_NAME and lorasweep.data.synthetic.MANIFEST_NAME, not imported here
# because those modules load torch and PIL.
TINY_MANIFEST = "lorasweep-tiny.json"
SYNTHETIC_MANIFEST = ".lorasweep-synthetic.json"
_FOLDER_SECTIONS = {"models": TINY_MANIFEST, "data": SYNTHETIC_MANIFEST}

_KEY_RE = re.compile(r"[0-9a-f]{64}")
_ENTRY_SUFFIX = ".safetensors"
_TEMP_SUFFIX = ".tmp"
_LEFTOVER_RE = re.compile(r"\.(?P<name>.+?)\.(?:tmp|old)-")  # models/data: `.NAME.tmp-*` of interrupted builds
_LOCK_NAME_RE = re.compile(r"[^A-Za-z0-9._-]")


# ---------------------------------------------------------------------------------------------------- keys

class FeatureKey(str):
    """A cache key: the sha256 hex string, carrying the parts it was made from in ``parts`` so that
    :meth:`FeatureCache.put` stores them as the entry's metadata (``cache info`` reads the model ids there).
    It is a ``str`` everywhere else: compare, hash and print it as one."""

    parts: dict[str, str]

    def __new__(cls, digest: str, parts: dict[str, str]) -> FeatureKey:
        key = super().__new__(cls, digest)
        key.parts = dict(parts)
        return key

    def __getnewargs__(self) -> tuple[str, dict[str, str]]:  # type: ignore[override]
        return (str(self), self.parts)


def _make_key(schema: str, parts: dict[str, Any]) -> FeatureKey:
    payload = {"schema": schema, **parts}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    metadata = {k: v if isinstance(v, str) else json.dumps(v) for k, v in payload.items()}
    return FeatureKey(digest, metadata)


def _pair(value: Sequence[int]) -> list[int]:
    first, second = value
    return [int(first), int(second)]


def latent_key(*, vae_id: str, image_sha256: str, bucket: tuple[int, int], resized: tuple[int, int],
               crop: tuple[int, int], flip: bool, device_type: str, dtype: str) -> FeatureKey:
    """The key of one image's VAE encoding: which VAE (``vae_id``: its path or hub id and revision/hash),
    which pixels (the file's sha256 and how it was resized, cropped and flipped into its bucket) and where it
    was encoded. ``device_type``/``dtype`` are part of it because a CPU and a CUDA encode (or float32 and
    bfloat16) differ in the last bits; pass a finer ``device_type`` (e.g. with the GPU name) if results must
    also match bitwise across GPU models."""
    return _make_key(LATENT_SCHEMA, {
        "vae_id": str(vae_id), "image_sha256": str(image_sha256), "bucket": _pair(bucket),
        "resized": _pair(resized), "crop": _pair(crop), "flip": bool(flip),
        "device_type": str(device_type), "dtype": str(dtype),
    })


def text_key(*, text_encoder_id: str, tokenizer_id: str, caption: str, clip_skip: int, max_token_length: int,
             device_type: str, dtype: str) -> FeatureKey:
    """The key of one caption's text-encoder hidden states: which encoder and tokenizer, the caption exactly as
    tokenized (after shuffling/dropout, so one training caption variant is one entry), which layer
    (``clip_skip``), the padded length, and the device type and dtype (see :func:`latent_key`)."""
    return _make_key(TEXT_SCHEMA, {
        "text_encoder_id": str(text_encoder_id), "tokenizer_id": str(tokenizer_id), "caption": str(caption),
        "clip_skip": int(clip_skip), "max_token_length": int(max_token_length),
        "device_type": str(device_type), "dtype": str(dtype),
    })


def file_sha256(path: Path) -> str:
    """The sha256 hex of a file's bytes, memoised per process by (resolved path, size, mtime in ns): a sweep's
    trials in one worker process hash each image once, and an edited image (new mtime) is hashed again."""
    resolved = Path(path).resolve()
    st = resolved.stat()
    return _sha256_of(str(resolved), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=1 << 16)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


# ---------------------------------------------------------------------------------------------------- the cache

def _check_key(key: str) -> str:
    if not _KEY_RE.fullmatch(key):
        raise ValueError(f"not a feature-cache key (64 lowercase hex digits): {key!r}")
    return key


def read_header(data_or_path: bytes | Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes, ``__metadata__``) without loading
    the tensors or torch. Raises ``ValueError`` when the header is cut short or not JSON."""
    if isinstance(data_or_path, bytes):
        data = data_or_path
        length = struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else -1
        raw = data[8:8 + length] if 0 <= length <= len(data) - 8 else None
    else:
        with open(data_or_path, "rb") as fh:
            head = fh.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            raw = fh.read(length) if 0 <= length <= 100_000_000 else None
            if raw is not None and len(raw) != length:
                raw = None
    if raw is None:
        raise ValueError("the safetensors header is cut short")
    header = json.loads(raw.decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("the safetensors header is not a JSON object")
    return header


class FeatureCache:
    """One kind (``"latents"`` or ``"text"``) of the feature cache under ``root`` = the lorasweep cache root
    (``lorasweep.config.paths.cache_root(cfg.model.cache_dir)``); entries live in ``root/features/<kind>``.

    ``hits`` and ``built`` count distinct keys served from disk and computed by :meth:`get_or_compute` (for a
    log line such as ``latent cache: 12 hits, 4 built``)."""

    def __init__(self, root: Path, kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown feature kind {kind!r}; one of {KINDS}")
        self.root = Path(root)
        self.kind = kind
        self.folder = self.root / FEATURES_DIR / kind
        self.hits = 0
        self.built = 0

    def summary(self) -> str:
        return f"{self.hits} hits, {self.built} built"

    def path_for(self, key: str) -> Path:
        _check_key(key)
        return self.folder / key[:2] / f"{key}{_ENTRY_SUFFIX}"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        """The entry's tensors (CPU, as stored), or ``None`` when it is missing. An unreadable entry (cut
        short, damaged, or written for another key) is removed with a warning and is a miss."""
        from safetensors.torch import load

        path = self.path_for(key)
        try:
            with open(path, "rb") as fh:
                st = os.fstat(fh.fileno())
                data = fh.read()
        except FileNotFoundError:
            return None
        try:
            stored_key = read_header(data).get("__metadata__", {}).get("lorasweep_key")
            if stored_key != key:
                raise ValueError(f"it was written for key {stored_key!r}")
            return load(data)
        except Exception as exc:  # safetensors raises its own SafetensorError for a bad body
            log.warning("feature cache: %s is unreadable (%s); removing it, it will be computed again", path, exc)
            self._discard(path, st)
            return None

    def _discard(self, path: Path, read: os.stat_result) -> None:
        """Remove a bad entry unless another process has meanwhile replaced it with a new file."""
        with contextlib.suppress(FileNotFoundError):
            now = path.stat()
            if (now.st_ino, now.st_size, now.st_mtime_ns) == (read.st_ino, read.st_size, read.st_mtime_ns):
                path.unlink()

    def put(self, key: str, tensors: dict[str, torch.Tensor],
            metadata: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
        """Store ``tensors`` under ``key`` and return them as stored (contiguous CPU copies, so a fresh result
        and a later hit look alike). The key's parts (a :class:`FeatureKey`) and ``metadata`` go into the
        file's safetensors metadata. Written to a temporary sibling and renamed: never a partial entry."""
        import torch
        from safetensors.torch import save

        path = self.path_for(key)
        stored = {name: t.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)
                  for name, t in tensors.items()}
        meta = {**getattr(key, "parts", {}), **(metadata or {}),
                "lorasweep_key": str(key), "lorasweep_kind": self.kind}
        data = save(stored, metadata=meta)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=_TEMP_SUFFIX, dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a shared cache is readable like any cache file
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return stored

    def lock_path(self, lock_name: str) -> Path:
        safe = _LOCK_NAME_RE.sub("_", lock_name)[:80]
        if safe != lock_name:  # distinct names must not share a lock after sanitising
            safe += "-" + hashlib.sha256(lock_name.encode()).hexdigest()[:12]
        return self.folder / ".locks" / f"{safe}.lock"

    def get_or_compute(self, keys: Sequence[str], compute: Callable[[list[int]], list[dict[str, torch.Tensor]]],
                       *, lock_name: str) -> list[dict[str, torch.Tensor]]:
        """The entries of ``keys`` in input order, building the missing ones with one ``compute`` call.

        ``compute(indices)`` gets the positions in ``keys`` of the keys still missing (one position per
        distinct key; a repeated key is computed once and its result returned at each of its positions) and
        returns their tensors in that order. It runs while this process holds the lock
        ``features/<kind>/.locks/<lock_name>.lock``; whoever waited for the lock looks its misses up again
        first, so processes that start together (parallel trials) build each entry once. Use one lock name
        per model and data set, e.g. the model id: unrelated builds then do not wait for each other."""
        first: dict[str, int] = {}
        for index, key in enumerate(keys):
            first.setdefault(key, index)
        found = {key: self.get(key) for key in first}
        missing = [key for key, tensors in found.items() if tensors is None]
        if missing:
            lock_path = self.lock_path(lock_name)
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(lock_path))
            try:
                lock.acquire(timeout=1.0)
            except Timeout:
                log.info("feature cache: another process is building %s entries (%s); waiting for it",
                         self.kind, lock_path.name)
                lock.acquire()
            try:
                for key in missing:
                    found[key] = self.get(key)
                missing = [key for key in missing if found[key] is None]
                if missing:
                    computed = compute([first[key] for key in missing])
                    if len(computed) != len(missing):
                        raise ValueError(f"compute returned {len(computed)} results for {len(missing)} keys")
                    for key, tensors in zip(missing, computed, strict=True):
                        found[key] = self.put(key, tensors)
            finally:
                lock.release()
        self.hits += len(first) - len(missing)
        self.built += len(missing)
        return [found[key] for key in keys]  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------------- info/clear

@dataclass(frozen=True)
class SectionInfo:
    """One part of the cache: ``entries`` complete entries, ``bytes`` on disk (including the leftovers of
    interrupted writes), ``ids`` what the entries belong to (model ids for latents/text, folder names for
    models/data; ``ids_complete`` is false when only the first :data:`MAX_ID_READS` entries were read)."""

    name: str
    path: Path
    entries: int
    bytes: int
    ids: tuple[str, ...]
    ids_complete: bool = True


@dataclass(frozen=True)
class CacheReport:
    root: Path
    sections: dict[str, SectionInfo]

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.sections.values())

    @property
    def total_entries(self) -> int:
        return sum(s.entries for s in self.sections.values())


@dataclass
class ClearResult:
    """What :func:`clear_cache` removed per section, and the entries it kept because a process was building
    them at that moment (their lock was held)."""

    entries: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    skipped: list[Path] = field(default_factory=list)

    @property
    def total_entries(self) -> int:
        return sum(self.entries.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())


def expand_sections(names: Sequence[str]) -> tuple[str, ...]:
    """Section names and aliases (``features`` = latents + text, ``all``) → sections, in :data:`SECTIONS`
    order. An unknown name is a :class:`UserError`."""
    chosen: set[str] = set()
    for name in names:
        if name in ALIASES:
            chosen.update(ALIASES[name])
        elif name in SECTIONS:
            chosen.add(name)
        else:
            raise UserError("cache clear", f"there is no cache section {name!r}.",
                            "Choose latents, text, features (= latents + text), models, data or all, e.g. "
                            "`lorasweep cache clear features`.")
    return tuple(s for s in SECTIONS if s in chosen)


def section_path(root: Path, section: str) -> Path:
    return Path(root) / FEATURES_DIR / section if section in KINDS else Path(root) / section


def _scandir(folder: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as it:
            return list(it)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _feature_files(folder: Path) -> Iterator[tuple[os.DirEntry[str], bool]]:
    """(file, is_entry) for every entry and temporary file in ``features/<kind>``: entries are
    ``<xx>/<key>.safetensors`` with a 64-hex key starting with ``xx``; anything else is left alone."""
    for shard in _scandir(folder):
        if len(shard.name) != 2 or not shard.is_dir(follow_symlinks=False):
            continue
        for item in _scandir(Path(shard.path)):
            if not item.is_file(follow_symlinks=False):
                continue
            stem, _, _ = item.name.partition(".")
            if item.name.endswith(_ENTRY_SUFFIX) and item.name == f"{stem}{_ENTRY_SUFFIX}" \
                    and _KEY_RE.fullmatch(stem) and stem.startswith(shard.name):
                yield item, True
            elif item.name.startswith(".") and item.name.endswith(_TEMP_SUFFIX) \
                    and _KEY_RE.fullmatch(item.name[1:65]):
                yield item, False


def _size(item: os.DirEntry[str]) -> int:
    try:
        return item.stat(follow_symlinks=False).st_size
    except FileNotFoundError:
        return 0


def _tree_size(path: Path) -> int:
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(folder, name)).st_size
    return total


def _folder_entries(folder: Path, manifest: str) -> Iterator[tuple[Path, bool]]:
    """(folder, is_entry) under models/ or data/: complete entries (holding lorasweep's manifest) and the
    leftovers of interrupted builds (``.NAME.tmp-*``/``.NAME.old-*``). Nothing else there is lorasweep's."""
    for item in _scandir(folder):
        if not item.is_dir(follow_symlinks=False):
            continue
        if item.name.startswith("."):
            if _LEFTOVER_RE.match(item.name):
                yield Path(item.path), False
        elif (Path(item.path) / manifest).is_file():
            yield Path(item.path), True


def _features_info(root: Path, kind: str) -> SectionInfo:
    folder = section_path(root, kind)
    entries, size, ids, reads = 0, 0, set(), 0
    for item, is_entry in _feature_files(folder):
        size += _size(item)
        if not is_entry:
            continue
        entries += 1
        if reads < MAX_ID_READS:
            reads += 1
            with contextlib.suppress(OSError, ValueError):
                model_id = read_header(Path(item.path)).get("__metadata__", {}).get(MODEL_ID_FIELD[kind])
                if model_id:
                    ids.add(model_id)
    return SectionInfo(kind, folder, entries, size, tuple(sorted(ids)), ids_complete=entries <= MAX_ID_READS)


def _folders_info(root: Path, section: str) -> SectionInfo:
    folder = section_path(root, section)
    entries, size, names = 0, 0, []
    for path, is_entry in _folder_entries(folder, _FOLDER_SECTIONS[section]):
        size += _tree_size(path)
        if is_entry:
            entries += 1
            names.append(path.name)
    return SectionInfo(section, folder, entries, size, tuple(sorted(names)))


def cache_info(root: Path) -> CacheReport:
    """Entries and bytes of each section of the cache at ``root`` (a cache root; a missing one is empty)."""
    root = Path(root)
    sections = {s: _features_info(root, s) if s in KINDS else _folders_info(root, s) for s in SECTIONS}
    return CacheReport(root, sections)


def _clear_features(root: Path, kind: str, result: ClearResult) -> None:
    stale_before = time.time() - STALE_TEMP_S
    for item, is_entry in _feature_files(section_path(root, kind)):
        try:
            st = item.stat(follow_symlinks=False)
            if not is_entry and st.st_mtime > stale_before:
                continue  # a put in progress: it renames its file into place in a moment
            os.unlink(item.path)
        except FileNotFoundError:
            continue  # removed by another clear, or renamed into place by its writer
        except OSError:
            result.skipped.append(Path(item.path))  # e.g. open in another process on Windows
            continue
        result.bytes[kind] = result.bytes.get(kind, 0) + st.st_size
        if is_entry:
            result.entries[kind] = result.entries.get(kind, 0) + 1


def _clear_folders(root: Path, section: str, result: ClearResult) -> None:
    """Remove built models or data sets under their builders' own locks (``.NAME.lock`` beside the folder),
    by renaming each folder aside first: a process that checks the folder sees all of it or nothing. A
    folder whose lock is held is being built right now and is kept (listed in ``skipped``)."""
    folder = section_path(root, section)
    for path, is_entry in _folder_entries(folder, _FOLDER_SECTIONS[section]):
        name = path.name if is_entry else _LEFTOVER_RE.match(path.name).group("name")  # type: ignore[union-attr]
        lock = FileLock(str(folder / f".{name}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            result.skipped.append(path)
            continue
        try:
            if not path.exists():
                continue
            size = _tree_size(path)
            aside = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-clear-", dir=folder))
            os.replace(path, aside / "old")
            shutil.rmtree(aside, ignore_errors=True)
        finally:
            lock.release()
        result.bytes[section] = result.bytes.get(section, 0) + size
        if is_entry:
            result.entries[section] = result.entries.get(section, 0) + 1


def clear_cache(root: Path, sections: Sequence[str]) -> ClearResult:
    """Remove the entries of ``sections`` (names or aliases, see :func:`expand_sections`) from the cache at
    ``root``. Safe while other processes use the cache: a feature entry is one file (a reader that misses it
    computes it again), models and data sets go under their builders' locks, lock files stay (removing one
    that a process holds would let a second process take the lock), and only files and folders that are
    recognisably lorasweep's are touched."""
    root = Path(root)
    result = ClearResult()
    for section in expand_sections(sections):
        result.entries.setdefault(section, 0)
        result.bytes.setdefault(section, 0)
        if section in KINDS:
            _clear_features(root, section, result)
        else:
            _clear_folders(root, section, result)
    return result
