"""The bad-input matrix: every way a user can hand lorasweep a wrong key, value, path, file, legacy config, sweep,
store or run folder is refused with exit code 2, exactly one ``lorasweep: error:`` paragraph that names the key
or file and says what to do, no traceback, and nothing written (the case's folder is byte-for-byte the same
listing afterwards: no ``outputs/runs``, ``outputs/sweeps``, ``outputs/mlflow.db``, no folder it named).

Each case runs the CLI's entry point in the test process (``main_in``; a sweep's refusal inside Hydra ends
in ``SystemExit(2)``), so the matrix costs no interpreter start-ups; ``test_cli_errors`` covers the same
contract through a real process. No case trains: each is refused before the first step (the module's one
2-step run only makes the folder the resume cases start from).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save as safetensors_bytes

from tests.conftest import main_in, user_error_line

CATEGORIES = ("config", "paths", "images", "safetensors", "pickle", "legacy", "sweep", "stores", "existing",
              "resume")
"""config: keys, types, ranges; paths: missing, a file for a folder and the reverse; images: corrupt image
files; safetensors: truncated or foreign weight files; pickle: .ckpt files (refused unless
model.allow_pickle, then weights_only); legacy: LETS/kohya files; sweep: sweep grammar and sweeper settings;
stores: unreachable tracking and Optuna storage URIs; existing: an output that exists; resume: resume and
reproduce of run folders."""

SHORT = ["training.max_steps=2", "sampling.enabled=false", "validation.every_n_steps=null"]
"""Appended to train cases that would otherwise be accepted up to their one bad input: if a product change
ever let one through, it fails in seconds rather than training 300 steps."""


class NotATensor:
    """A pickled object that is not a tensor: ``torch.load(weights_only=True)`` must refuse to unpickle it."""


@dataclass(frozen=True)
class Case:
    id: str
    category: str
    args: tuple[str, ...]
    """CLI arguments; ``{tmp}`` is the case's folder (also its working directory), ``{run}`` the copied run."""
    fragments: tuple[str, ...]
    """Each must appear in the error paragraph: the key or file, and words of the fix."""
    setup: Callable[[Path], object] | None = None
    env: tuple[tuple[str, str], ...] = ()
    absent: tuple[str, ...] = ()
    """Must not appear on stderr (a password)."""
    run: Callable[[Path], None] | None = None
    """Edits the copy of the module's saved run (``{run}``) before the command."""


# --------------------------------------------------------------------------------------------- file makers


def _png(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (64, 64)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, "PNG")
    return out.getvalue()


def _noise(fmt: str) -> bytes:
    out = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(out, fmt)
    return out.getvalue()


def _half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _images(**bad: bytes) -> Callable[[Path], None]:
    """``data/2_thing`` with three good captioned PNGs plus ``bad`` (file name -> bytes; ``_`` for ``.``)."""

    def setup(tmp: Path) -> None:
        concept = tmp / "data" / "2_thing"
        concept.mkdir(parents=True)
        for i in range(3):
            (concept / f"{i}.png").write_bytes(_png((60 * i, 20, 20)))
            (concept / f"{i}.txt").write_text("thing, red")
        for name, data in bad.items():
            (concept / name.replace("_", ".")).write_bytes(data)

    return setup


def _file(name: str, data: bytes | Callable[[], bytes] = b"x") -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_bytes(data() if callable(data) else data)

    return setup


def _folder(name: str, *, with_file: bool = False) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        (tmp / name).mkdir(parents=True)
        if with_file:
            (tmp / name / "keep.txt").write_text("the user's")

    return setup


def _weights(prefix: str = "first_stage_model.encoder.") -> bytes:
    """A real (tiny) .safetensors file."""
    return safetensors_bytes({f"{prefix}conv_in.weight": np.zeros((4, 3, 3, 3), np.float32),
                              f"{prefix}conv_in.bias": np.zeros(4, np.float32)})


def _header_only() -> bytes:
    """A .safetensors file cut right after its header: every tensor's bytes are missing."""
    data = _weights()
    return data[: 8 + int.from_bytes(data[:8], "little")]


def _lora(rank: int) -> bytes:
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    return safetensors_bytes({f"{name}.lora_down.weight": np.zeros((rank, 32), np.float32),
                              f"{name}.lora_up.weight": np.zeros((32, rank), np.float32),
                              f"{name}.alpha": np.array(float(rank), np.float32)})


def _ckpt(name: str, *, extra: object = None, cut: bool = False) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        import torch

        obj: dict[str, object] = {"state_dict": {"first_stage_model.encoder.conv_in.weight": torch.zeros(4, 3, 3, 3)}}
        if extra is not None:
            obj["callback"] = extra
        torch.save(obj, tmp / name)
        if cut:
            (tmp / name).write_bytes(_half((tmp / name).read_bytes()))

    return setup


def _json(name: str, value: object) -> Callable[[Path], None]:
    return _file(name, (value if isinstance(value, str) else json.dumps(value)).encode())


def _all(*setups: Callable[[Path], object]) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        for step in setups:
            step(tmp)

    return setup


def _edit_config(pattern: str, replacement: str) -> Callable[[Path], None]:
    def edit(run: Path) -> None:
        text = (run / "config.yaml").read_text()
        edited = re.sub(pattern, replacement, text, count=1, flags=re.MULTILINE)
        assert edited != text, pattern
        (run / "config.yaml").write_text(edited)

    return edit


def _drop_state(run: Path) -> None:
    shutil.rmtree(run / "state")


# --------------------------------------------------------------------------------------------- the matrix


def _config(id_: str, overrides: list[str], *fragments: str) -> Case:
    return Case(id_, "config", ("train", *overrides), fragments)


def _sweep(id_: str, *args: str, fragments: tuple[str, ...], category: str = "sweep") -> Case:
    return Case(id_, category, ("sweep", "quickstart", "output.root={tmp}/outputs", *args), fragments)


def _grid(id_: str, *args: str, fragments: tuple[str, ...], category: str = "sweep",
          setup: Callable[[Path], object] | None = None) -> Case:
    return Case(id_, category, ("train", "-m", "output.root={tmp}/outputs", *SHORT, *args), fragments, setup)


CASES: list[Case] = [
    # ---- config: keys, types, ranges (the former test_parameter_errors, plus types and unknown keys)
    _config("dim-negative", ["network.dim=-4"], "network.dim", "out of range"),
    _config("dropout-above-1", ["network.dropout=1.5"], "network.dropout", "out of range"),
    _config("bucket-step", ["data.buckets.step=12"], "data.buckets.step", "multiple of 8"),
    _config("scheduler-name", ["scheduler.name=plateau"], "scheduler.name", "cosine_with_restarts"),
    _config("optimizer-name", ["optimizer.name=sgd"], "optimizer.name", "prodigy"),
    _config("keep-tokens", ["data.keep_tokens=7"], "data.keep_tokens"),
    _config("nothing-trained", ["network.train_unet=false", "network.train_text_encoder=false"],
            "network.train_unet", "nothing would be trained"),
    _config("v2-on-sd1", ["model.v2=true"], "model.v2", "SD 1"),
    _config("color-aug-cached", ["data.color_aug=true"], "data.cache_latents", "data.color_aug"),
    _config("random-crop-cached", ["data.random_crop=true"], "data.cache_latents", "data.random_crop"),
    _config("caption-dropout", ["data.caption_dropout_rate=1.2"], "data.caption_dropout_rate", "out of range"),
    _config("token-length", ["model.max_token_length=100"], "model.max_token_length", "225"),
    _config("clip-skip-0", ["model.clip_skip=0"], "model.clip_skip", "out of range"),
    _config("warmup-ratio", ["scheduler.warmup_ratio=1"], "scheduler.warmup_ratio", "out of range"),
    _config("optimizer-arg", ["optimizer.args.no_such_arg=1"], "optimizer.args.no_such_arg"),
    _config("output-format", ["output.format=bin"], "output.format", "safetensors"),
    _config("save-every-0", ["output.save_every_n_epochs=0"], "output.save_every_n_epochs", "out of range"),
    _config("persistent-workers", ["data.persistent_workers=true"], "data.persistent_workers", "data.num_workers"),
    _config("tag-sort", ["data.tag_frequency_sort=random"], "data.tag_frequency_sort", "alpha"),
    _config("init-weights-missing", ["network.init_weights=/nonexistent/lora.safetensors"], "network.init_weights"),
    _config("state-dir-missing", ["resume.state_dir=/nonexistent/state"], "resume.state_dir"),
    _config("reg-dir-missing", ["data.reg_dir=/nonexistent/reg"], "data.reg_dir", "does not exist"),
    _config("base-ckpt-missing", ["model.base=/nonexistent/model.ckpt"], "model.base"),
    _config("prior-loss-weight", ["training.prior_loss_weight=-1"], "training.prior_loss_weight", "out of range"),
    _config("conv-kernels", ["training.cpu_conv_kernels=fast"], "training.cpu_conv_kernels", "native"),
    _config("batch-size-0", ["training.batch_size=0"], "training.batch_size", "out of range"),
    _config("max-steps-type", ["training.max_steps=ten"], "training.max_steps", "could not be converted to Integer"),
    _config("bool-type", ["data.flip_aug=maybe"], "data.flip_aug", "not a valid bool", "documented type"),
    _config("unknown-key", ["network.rnak=4"], "network.rnak", "no such config key", "dim, alpha"),
    _config("unknown-option", ["precision=fp64"], "precision", "no option 'fp64'", "bf16"),
    _config("name-with-extension", ["output.name=lora.safetensors"], "output.name", "output.format adds it"),
    # ---- paths: missing, a file where a folder belongs and the reverse
    Case("train-dir-is-file", "paths", ("train", "data=folder", "data.train_dir={tmp}/notes.txt", *SHORT),
         ("data.train_dir", "notes.txt is a file, not a folder", "<repeats>_<concept>"), _file("notes.txt")),
    Case("train-dir-unset", "paths", ("train", "data=folder", *SHORT),
         ("data.train_dir", "is not set, but data=folder", "Add data.train_dir=")),
    Case("reg-dir-is-file", "paths", ("train", "data.reg_dir={tmp}/reg.txt", *SHORT),
         ("data.reg_dir", "reg.txt is a file, not a folder"), _file("reg.txt")),
    Case("base-folder-not-a-model", "paths", ("train", "model.base={tmp}/model", *SHORT),
         ("model.base", "not a diffusers model folder", "unet/"), _folder("model")),
    Case("vae-folder-empty", "paths", ("train", "model.vae={tmp}/vae", *SHORT),
         ("model.vae", "not a diffusers VAE folder", "config.json"), _folder("vae")),
    Case("init-weights-is-folder", "paths", ("train", "network.init_weights={tmp}/lora", *SHORT),
         ("network.init_weights", "is not an existing file", ".safetensors"), _folder("lora")),
    Case("state-dir-is-file", "paths", ("train", "resume.state_dir={tmp}/state.json", *SHORT),
         ("resume.state_dir", "is not a folder", "state/step-NNNNNN"), _file("state.json")),
    Case("tokenizer-is-file", "paths", ("train", "model.tokenizer={tmp}/vocab.json", *SHORT),
         ("model.tokenizer", "is not a tokenizer folder", "tokenizer/ folder"), _file("vocab.json")),
    Case("output-root-is-file", "paths", ("train", "output.root={tmp}/out", *SHORT),
         ("output.root", "is not writable", "out is a file, not a folder", "output.root=<path>"), _file("out")),
    Case("output-root-under-file", "paths", ("train", "output.root={tmp}/blocker/out", *SHORT),
         ("output.root", "blocker is a file, not a folder"), _file("blocker")),
    Case("export-dir-is-file", "paths", ("train", "output.export_dir={tmp}/exports", *SHORT),
         ("output.export_dir", "exports is a file, not a folder", "or leave it null"), _file("exports")),
    Case("tensorboard-dir-is-file", "paths", ("train", "tracking.tensorboard_dir={tmp}/tb", *SHORT),
         ("tracking.tensorboard_dir", "tb is a file, not a folder"), _file("tb")),
    Case("lets-json-folder-is-file", "paths", ("train", "legacy.save_json_folder={tmp}/lets", *SHORT),
         ("legacy.save_json_folder", "lets is a file, not a folder"), _file("lets")),
    Case("legacy-json-is-folder", "paths", ("train", "legacy.load_json_path={tmp}/cfg.json", *SHORT),
         ("legacy.load_json_path", "is a folder, not a file", "LETS .json"), _folder("cfg.json")),
    Case("legacy-json-missing", "paths", ("train", "legacy.load_json_path={tmp}/none.json", *SHORT),
         ("legacy.load_json_path", "none.json does not exist")),
    # ---- images: corrupt files in the data folder
    Case("png-truncated", "images", ("train", "data=folder", "data.train_dir={tmp}/data", *SHORT),
         ("bad.png", "cannot be read as an image", "Remove or replace the file"),
         _images(bad_png=_half(_noise("PNG")))),
    Case("png-random-bytes", "images", ("train", "data=folder", "data.train_dir={tmp}/data", *SHORT),
         ("noise.png", "cannot be read as an image"), _images(noise_png=os.urandom(600))),
    Case("jpeg-truncated", "images", ("train", "data=folder", "data.train_dir={tmp}/data", *SHORT),
         ("cut.jpg", "cannot be read as an image", "truncated"), _images(cut_jpg=_half(_noise("JPEG")))),
    Case("webp-truncated", "images", ("train", "data=folder", "data.train_dir={tmp}/data", *SHORT),
         ("cut.webp", "cannot be read as an image"), _images(cut_webp=_half(_noise("WEBP")))),
    Case("image-empty-file", "images", ("train", "data=folder", "data.train_dir={tmp}/data", *SHORT),
         ("empty.jpeg", "cannot be read as an image"), _images(empty_jpeg=b"")),
    Case("reg-image-truncated", "images", ("train", "data.reg_dir={tmp}/data", *SHORT),
         ("bad.png", "cannot be read as an image"), _images(bad_png=_half(_noise("PNG")))),
    # ---- safetensors: truncated, random bytes, foreign content, for each weight-file key
    *[Case(f"{label}-{kind}", "safetensors", ("train", f"{key}={{tmp}}/w.safetensors", *SHORT),
           (key, "w.safetensors is not a readable .safetensors file", words), _file("w.safetensors", data))
      for key, label in (("model.base", "base"), ("model.vae", "vae"), ("network.init_weights", "lora"))
      for kind, data, words in (("truncated", lambda: _half(_weights()), "incomplete metadata"),
                                ("random-bytes", lambda: os.urandom(4096), "header too large"),
                                ("header-only", _header_only, "not fully covered"))],
    Case("base-not-sd", "safetensors", ("train", "model.base={tmp}/w.safetensors", *SHORT),
         ("model.base", "not an SD 1.x/2.x single-file checkpoint"), _file("w.safetensors", _weights("x."))),
    Case("vae-without-encoder", "safetensors", ("train", "model.vae={tmp}/w.safetensors", *SHORT),
         ("model.vae", "holds no VAE weights", "original layout"), _file("w.safetensors", _weights("unet."))),
    Case("lora-without-lora", "safetensors", ("train", "network.init_weights={tmp}/w.safetensors", *SHORT),
         ("network.init_weights", "holds no kohya LoRA weights"), _file("w.safetensors", _weights())),
    Case("lora-wrong-rank", "safetensors", ("train", "network.dim=4", "network.init_weights={tmp}/r8.safetensors",
                                            *SHORT),
         ("network.init_weights", "has rank 8, but network.dim is 4", "network.dim=8"),
         _file("r8.safetensors", lambda: _lora(8))),
    # ---- pickle (.ckpt): refused unless model.allow_pickle=true, and then loaded with weights_only=True
    Case("base-ckpt-refused", "pickle", ("train", "model.base={tmp}/m.ckpt", *SHORT),
         ("model.base", "m.ckpt is a pickle checkpoint", "model.allow_pickle=true", "weights_only=True"),
         _ckpt("m.ckpt")),
    Case("vae-ckpt-refused", "pickle", ("train", "model.vae={tmp}/v.ckpt", *SHORT),
         ("model.vae", "v.ckpt is a pickle checkpoint", "model.allow_pickle=true"), _ckpt("v.ckpt")),
    Case("lora-ckpt-never", "pickle", ("train", "model.allow_pickle=true", "network.init_weights={tmp}/l.ckpt",
                                       *SHORT),
         ("network.init_weights", "is a pickle file", "never loads pickles", ".safetensors"), _ckpt("l.ckpt")),
    Case("base-ckpt-object", "pickle", ("train", "model.allow_pickle=true", "model.base={tmp}/m.ckpt", *SHORT),
         ("model.base", "m.ckpt holds Python objects besides tensors", "NotATensor", "weights_only=True"),
         _ckpt("m.ckpt", extra=NotATensor())),
    Case("vae-ckpt-object", "pickle", ("train", "model.allow_pickle=true", "model.vae={tmp}/v.ckpt", *SHORT),
         ("model.vae", "v.ckpt holds Python objects besides tensors", "NotATensor"),
         _ckpt("v.ckpt", extra=NotATensor())),
    Case("base-ckpt-truncated", "pickle", ("train", "model.allow_pickle=true", "model.base={tmp}/m.ckpt", *SHORT),
         ("model.base", "m.ckpt cannot be read as a checkpoint", "damaged or truncated"), _ckpt("m.ckpt", cut=True)),
    Case("base-ckpt-not-sd", "pickle", ("train", "model.allow_pickle=true", "model.base={tmp}/m.ckpt", *SHORT),
         ("model.base", "m.ckpt is not an SD 1.x/2.x single-file checkpoint"), _ckpt("m.ckpt")),
    # ---- legacy files (unknown keys are reported, not refused: each refused file also has one)
    Case("lets-wrong-type", "legacy", ("import-legacy", "{tmp}/l.json"),
         ("l.json: net_dim", "expected an integer, got 'abc'", "import-legacy --skip"),
         _json("l.json", {"net_dim": "abc", "no_such_setting": 1})),
    Case("lets-not-json", "legacy", ("import-legacy", "{tmp}/l.json"),
         ("l.json", "is not valid JSON", "line 1, column 2"), _json("l.json", "{net_dim: 4")),
    Case("lets-a-list", "legacy", ("import-legacy", "{tmp}/l.json"),
         ("l.json", "holds a JSON list, not an object of settings"), _json("l.json", [{"net_dim": 4}])),
    Case("lets-out-of-range", "legacy", ("import-legacy", "{tmp}/l.json"),
         ("network.dim (set by net_dim in", "l.json", "out of range"),
         _json("l.json", {"net_dim": -3, "unknown_setting": "x"})),
    Case("lets-bad-bool-train", "legacy", ("train", "legacy.load_json_path={tmp}/l.json", *SHORT),
         ("l.json: unet_only", "expected true or false, got 'maybe'"),
         _json("l.json", {"unet_only": "maybe", "no_such_setting": 1})),
    Case("lets-lr-train", "legacy", ("train", "legacy.load_json_path={tmp}/l.json", *SHORT),
         ("l.json: learning_rate", "expected a number, got 'fast'"), _json("l.json", {"learning_rate": "fast"})),
    Case("kohya-toml-broken", "legacy", ("import-legacy", "{tmp}/k.toml"),
         ("k.toml", "is not valid TOML"), _file("k.toml", b"network_dim = [4\n")),
    Case("queue-one-bad-file", "legacy", ("queue", "{tmp}/q", "output.root={tmp}/outputs", *SHORT),
         ("network.dim (set by net_dim in", "b.json", "out of range"),
         _all(_json("q/a.json", {"net_dim": 4}), _json("q/b.json", {"net_dim": 0}))),
    # ---- sweep grammar and sweeper settings
    _sweep("interval-one-bound", "optimizer.lr=interval(1e-3)",
           fragments=("command line", "interval(1e-3)", "missing a required argument: 'end'", "interval(1e-4, 1e-2)")),
    _sweep("empty-choice", "network.dim=choice()", fragments=("command line", "empty choice is not legal")),
    _sweep("range-of-words", "network.dim=range(a,b)", fragments=("command line", "range(a,b)", "incompatible")),
    _sweep("interval-reversed", "optimizer.lr=interval(1e-2,1e-4)",
           fragments=("hydra.sweeper.params.optimizer.lr", "low bound is not below its high bound", "smaller bound")),
    _sweep("choice-out-of-range", "network.dim=choice(-1,4)",
           fragments=("hydra.sweeper.params.network.dim", "includes -1, which no run accepts", "out of range")),
    _sweep("choice-wrong-type", "network.dim=choice(four,8)",
           fragments=("hydra.sweeper.params.network.dim", "includes four", "Integer")),
    _sweep("interval-outside-range", "optimizer.lr=interval(0,1e-3)",
           fragments=("hydra.sweeper.params.optimizer.lr", "includes 0.0", "out of range", "narrow the range")),
    _sweep("float-interval-int-key", "network.dim=interval(2,8)",
           fragments=("hydra.sweeper.params.network.dim", "takes whole numbers", "int(interval(2, 8))")),
    _sweep("unknown-sweeper-key", "++hydra.sweeper.n_trail=3",
           fragments=("hydra.sweeper.n_trail", "not a setting of this sweeper", "hydra.sweeper.n_trials")),
    _sweep("unknown-sweeper-key-plain", "hydra.sweeper.pruner_arg={x:1}",
           fragments=("hydra.sweeper.pruner_arg", "no such config key", "pruner_args")),
    Case("optuna-via-train-m", "sweep", ("train", "-m", "hydra/sweeper=lorasweep_optuna", "output.root={tmp}/outputs",
                                         "optimizer.lr=interval(1e-3)"),
         ("command line", "missing a required argument: 'end'")),
    _grid("grid-unknown-key", "network.dimm=4,8", fragments=("network.dimm", "no such config key", "dim, alpha")),
    _grid("grid-wrong-type", "network.dim=four,8", fragments=("network.dim", "'four'", "Integer")),
    _grid("grid-out-of-range", "network.dim=8,0", fragments=("network.dim", "0 is out of range")),
    _grid("grid-unknown-option", "scheduler=cosine,linearr", fragments=("scheduler", "no option 'linearr'", "linear")),
    _grid("grid-interval", "optimizer.lr=interval(1e-4,1e-3)",
          fragments=("optimizer.lr", "grid sweeper cannot enumerate", "lorasweep_optuna")),
    _grid("grid-dangling-comma", "network.dim=4,", fragments=("command line", "mismatched input")),
    # ---- stores: tracking and Optuna storage URIs that cannot be reached or created
    Case("tracking-http-unreachable", "stores", ("train", "tracking.uri=http://127.0.0.1:1", *SHORT),
         ("tracking.uri", "http://127.0.0.1:1 cannot be reached", "tracking=off")),
    Case("tracking-http-password", "stores", ("train", "tracking.uri=http://me:hunter22@127.0.0.1:1/mlflow", *SHORT),
         ("tracking.uri", "http://127.0.0.1:1/mlflow cannot be reached"), absent=("hunter22",)),
    Case("tracking-env-unreachable", "stores", ("train", *SHORT),
         ("MLFLOW_TRACKING_URI (environment)", "cannot be reached"), env=(("MLFLOW_TRACKING_URI", "http://127.0.0.1:1"),)),
    Case("tracking-sqlite-no-folder", "stores", ("train", "tracking.uri=sqlite:///{tmp}/missing/mlflow.db", *SHORT),
         ("tracking.uri", "missing of the sqlite database mlflow.db does not exist", "sqlite:////abs/path")),
    Case("tracking-sqlite-under-file", "stores", ("train", "tracking.uri=sqlite:///{tmp}/db/mlflow.db", *SHORT),
         ("tracking.uri", "db is a file, not a folder"), _file("db")),
    Case("tracking-sqlite-is-folder", "stores", ("train", "tracking.uri=sqlite:///{tmp}/store", *SHORT),
         ("tracking.uri", "store is a folder", "names the database file"), _folder("store")),
    _sweep("sweep-tracking-unreachable", "tracking.uri=http://127.0.0.1:1",
           fragments=("tracking.uri", "cannot be reached"), category="stores"),
    _grid("grid-tracking-unreachable", "tracking.uri=http://127.0.0.1:1", "network.dim=4,8",
          fragments=("tracking.uri", "cannot be reached"), category="stores"),
    Case("optuna-storage-unreachable", "stores",
         ("sweep", "quickstart", "output.root={tmp}/outputs", "hydra.sweeper.storage=postgresql://u:s3cret@127.0.0.1:1/x"),
         ("hydra.sweeper.storage", "cannot open the Optuna storage", "server is reachable"), absent=("s3cret",)),
    Case("optuna-journal-no-folder", "stores",
         ("sweep", "quickstart", "output.root={tmp}/outputs", "hydra.sweeper.storage=journal://{tmp}/none/o.journal"),
         ("hydra.sweeper.storage", "none/o.journal does not exist")),
    # ---- an output that exists
    Case("run-dir-not-empty", "existing", ("train", "hydra.run.dir={tmp}/mine", *SHORT),
         ("hydra.run.dir", "mine already exists and is not empty", "new or empty folder"),
         _folder("mine", with_file=True)),
    Case("run-dir-is-file", "existing", ("train", "hydra.run.dir={tmp}/mine", *SHORT),
         ("hydra.run.dir", "mine is a file, not a folder"), _file("mine")),
    _grid("sweep-dir-not-empty", "hydra.sweep.dir={tmp}/grid", "network.dim=4,8",
          fragments=("hydra.sweep.dir", "grid already exists and is not empty"), category="existing",
          setup=_folder("grid/0", with_file=True)),
    Case("import-output-exists", "existing", ("import-legacy", "{tmp}/l.json", "-o", "{tmp}/mine.yaml"),
         ("mine.yaml", "already exists and is never overwritten", "another name"),
         _all(_json("l.json", {"net_dim": 4}), _file("mine.yaml", b"the user's: 1\n"))),
    # ---- resume and reproduce of run folders
    Case("resume-config-edited", "resume", ("resume", "{run}"),
         ("resume.state_dir", "training.batch_size", "resume.force=true", "--force"),
         run=_edit_config(r"^  batch_size: \d+$", "  batch_size: 3")),
    Case("resume-network-edited-forced", "resume", ("resume", "{run}", "--force"),
         ("resume.state_dir", "network cannot change on resume", "network.init_weights=<its LoRA>"),
         run=_edit_config(r"^  dim: \d+$", "  dim: 16")),
    Case("resume-config-invalid", "resume", ("resume", "{run}"), ("network.dim", "out of range"),
         run=_edit_config(r"^  dim: \d+$", "  dim: -2")),
    Case("resume-state-missing", "resume", ("resume", "{run}", "--state", "{tmp}/nowhere"),
         ("resume.state_dir", "nowhere is not a folder"), run=lambda run: None),
    Case("resume-without-state", "resume", ("resume", "{run}"),
         ("has no saved training state", "output.save_state=true"), run=_drop_state),
    Case("resume-not-a-folder", "resume", ("resume", "{tmp}/gone"), ("gone", "is not a run folder")),
    Case("reproduce-missing", "resume", ("reproduce", "{tmp}/gone"),
         ("reproduce", "gone is neither a run folder nor an MLflow run id")),
    Case("reproduce-not-a-run", "resume", ("reproduce", "{tmp}/empty"),
         ("empty", "is not a lorasweep run folder (no config.yaml)"), _folder("empty")),
    Case("reproduce-config-edited", "resume", ("reproduce", "{run}"), ("optimizer.lr", "out of range"),
         run=_edit_config(r"^  lr: .*$", "  lr: -1.0")),
]


@pytest.fixture(scope="module")
def saved_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 2-step run with its training state saved (tracking off): the folder the resume cases copy."""
    work = tmp_path_factory.mktemp("saved-run")
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main_in(work, ["train", "training.max_steps=2", "output.save_state=true", "sampling.enabled=false",
                              "validation.every_n_steps=null", "tracking.enabled=false"])
    assert code == 0, err.getvalue()
    (run,) = (work / "outputs" / "runs").iterdir()
    assert (run / "state").is_dir()
    return run


def _listing(folder: Path) -> dict[str, int]:
    """Every path under ``folder`` with its size (-1 for a folder)."""
    return {p.relative_to(folder).as_posix(): -1 if p.is_dir() else p.stat().st_size for p in folder.rglob("*")}


def _refused(cwd: Path, args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main_in(cwd, args)
        except SystemExit as exc:  # a refusal inside Hydra (the sweeper) ends the process there
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_with_one_clear_paragraph(case: Case, tmp_path: Path, tiny_model: Path,
                                                       request: pytest.FixtureRequest,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    work.mkdir()
    values = {"{tmp}": str(work)}
    if case.run is not None:
        run = work / "run"
        shutil.copytree(request.getfixturevalue("saved_run"), run)
        case.run(run)
        values["{run}"] = str(run)
    if case.setup is not None:
        case.setup(work)
    for name, value in case.env:
        monkeypatch.setenv(name, value)
    before = _listing(work)
    args = []
    for arg in case.args:
        for name, value in values.items():
            arg = arg.replace(name, value)
        args.append(arg)
    code, stdout, stderr = _refused(work, args)
    line = user_error_line(code, stderr, *case.fragments)
    assert "Traceback" not in stdout
    for secret in case.absent:
        assert secret not in stderr + stdout
    assert _listing(work) == before, f"{case.id} wrote files before refusing: {line}"


def test_the_matrix_covers_every_category() -> None:
    """The matrix cannot silently shrink: at least 40 distinct cases, several in every category."""
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)) >= 40
    per_category = {name: sum(case.category == name for case in CASES) for name in CATEGORIES}
    assert set(per_category) == {case.category for case in CASES}
    assert min(per_category.values()) >= 4, per_category
