"""The one table from legacy settings to lorasweep config keys.

A row is one setting of LoRA_Easy_Training_Scripts (LETS: the flat keys of its JSON files, which are the
seed's parameter list) and/or of kohya-ss ``train_network.py`` (the argument names used in ``--config_file``
TOML files and on its command line), the config key(s) it sets, how its value is converted, and how a
config is written back as a LETS value. Settings lorasweep has no key for carry the reason instead.

Conversion rules that hold for every row:
- a value is converted to the type of its target config key (see :mod:`lorasweep.legacy.schema`); a value of
  the wrong type, or one lorasweep cannot represent (an unknown optimizer, a non-square resolution), raises
  :class:`~lorasweep.legacy.schema.BadValue` and the importer stops with the key and file named;
- null (JSON) means "not given": LETS then passes nothing to kohya, so kohya's default is used where that
  differs from lorasweep's, a nullable key becomes null, and otherwise lorasweep's default is kept;
- keys the file does not contain keep lorasweep's defaults (not kohya's).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lorasweep.config.optimizer import OPTIMIZERS
from lorasweep.config.precision import MIXED, SAVE
from lorasweep.config.scheduler import SCHEDULERS
from lorasweep.config.train import TrainConfig
from lorasweep.config.training import HUBER_SCHEDULES, LOSS_TYPES
from lorasweep.legacy import schema
from lorasweep.legacy.schema import BadValue

SEED_PARAMETERS: tuple[tuple[str, str], ...] = (
    ("base_model", "base_model"), ("pasta_img", "img_folder"), ("pasta_de_saída", "output_folder"),
    ("change_output_name", "change_output_name"), ("save_json_folder", "save_json_folder"),
    ("load_json_path", "load_json_path"), ("json_load_skip_list", "json_load_skip_list"),
    ("multi_run_folder", "multi_run_folder"), ("save_json_only", "save_json_only"),
    ("caption_dropout_rate", "caption_dropout_rate"),
    ("caption_dropout_every_n_epochs", "caption_dropout_every_n_epochs"),
    ("caption_tag_dropout_rate", "caption_tag_dropout_rate"), ("net_dim", "net_dim"), ("alfa", "alpha"),
    ("programador", "scheduler"), ("cosine_restarts", "cosine_restarts"),
    ("potência do planejador", "scheduler_power"), ("relação_de_aquecimento_lr", "warmup_lr_ratio"),
    ("taxa de aprendizado", "learning_rate"), ("text_encoder_lr", "text_encoder_lr"), ("unet_lr", "unet_lr"),
    ("num_workers", "num_workers"), ("persistent_workers", "persistent_workers"),
    ("tamanho_do_lote", "batch_size"), ("num_epochs", "num_epochs"), ("save_every_n_epochs", "save_every_n_epochs"),
    ("shuffle_captions", "shuffle_captions"), ("keep_tokens", "keep_tokens"), ("max_steps", "max_steps"),
    ("tag_occurrence_txt_file", "tag_occurrence_txt_file"),
    ("sort_tag_occurrence_alphabetically", "sort_tag_occurrence_alphabetically"),
    ("train_resolution", "train_resolution"), ("min_bucket_resolution", "min_bucket_resolution"),
    ("max_bucket_resolution", "max_bucket_resolution"), ("lora_model_for_resume", "lora_model_for_resume"),
    ("save_state", "save_state"), ("load_previous_save_state", "load_previous_save_state"),
    ("comentário_de_treinamento", "training_comment"), ("unet_only", "unet_only"), ("text_only", "text_only"),
    ("pasta_imagem_registro", "reg_img_folder"), ("clip_skip", "clip_skip"), ("test_seed", "test_seed"),
    ("peso_perda_anterior", "prior_loss_weight"), ("gradiente_checkpointing", "gradient_checkpointing"),
    ("gradiente_acc_passos", "gradient_acc_steps"), ("mixed_precision", "mixed_precision"),
    ("save_precision", "save_precision"), ("salvar_como", "save_as"), ("caption_extension", "caption_extension"),
    ("max_clip_token_length", "max_clip_token_length"), ("baldes", "buckets"), ("xformadores", "xformers"),
    ("use_8bit_adam", "use_8bit_adam"), ("cache_latents", "cache_latents"), ("cor_aug", "color_aug"),
    ("flip_aug", "flip_aug"), ("colheita aleatória", "random_crop"), ("vae", "vae"), ("no_meta", "no_meta"),
    ("diretório_de_log", "log_dir"), ("bucket_reso_steps", "bucket_reso_steps"),
    ("bucket_no_upscale", "bucket_no_upscale"), ("v2", "v2"), ("v_parametrização", "v_parameterization"),
)
"""The seed's parameter list: (name as printed in the seed article, LETS key). The article machine-translated
some names (``alfa`` = ``alpha``); the LETS key is what LETS JSON files contain."""

Pairs = list[tuple[str, Any]]


class Skip(Exception):
    """This value changes nothing in lorasweep; the importer reports it with the reason."""


@dataclass(frozen=True)
class Context:
    """What a converter may look at besides its own value."""

    kind: str
    """``lets`` (a LETS JSON) or ``kohya`` (a kohya TOML or argument list)."""

    values: Mapping[str, Any]
    """Every value in the file, by its name there (for settings that depend on others)."""


Convert = Callable[[Any, Context], Pairs]
Export = Callable[[TrainConfig], Any]


@dataclass(frozen=True)
class LegacyKey:
    """One legacy setting and where it goes."""

    lets: str | None
    """LETS JSON key; None for kohya-only arguments."""

    kohya: str | None
    """``train_network.py`` argument name (without ``--``); None for LETS-only settings."""

    targets: tuple[str, ...]
    """lorasweep config keys it can set; empty when it has none (then ``reason`` or ``command`` says why)."""

    convert: Convert | None = None
    """Value → (config key, value) pairs; None = never applied (``reason``)."""

    export: Export | None = None
    """The LETS value of a config (LETS keys only), for writing LETS JSON."""

    reason: str = ""
    """Why it is not applied, or what is special about its conversion."""

    command: str | None = None
    """A lorasweep command that covers it instead of a config key."""

    aliases: tuple[str, ...] = ()
    """Other names of the same setting in older LETS versions."""


_KEEP = object()


def get(cfg: TrainConfig, key: str) -> Any:
    """Config value at a dotted key."""
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def value(target: str, *, null: Any = _KEEP, zero_is_null: bool = False, blank_is_unset: bool = False) -> Convert:
    """The value itself, converted to ``target``'s type. ``null``: what JSON null stands for (kohya's default
    where LETS would pass nothing); ``zero_is_null``: 0 means "off" in kohya/LETS and null in lorasweep;
    ``blank_is_unset``: LETS leaves unset paths as ``""``."""

    def convert(raw: Any, ctx: Context) -> Pairs:
        if blank_is_unset and isinstance(raw, str) and not raw.strip():
            raise Skip("empty: not set in the file")
        if raw is None and null is not _KEEP:
            raw = null
        elif raw is None and not schema.nullable(target):
            raise Skip("null: lorasweep's default is kept")
        converted = schema.coerce(target, raw)
        if zero_is_null and converted == 0:
            converted = None
        return [(target, converted)]

    return convert


def choice(target: str, options: Mapping[str, str], *, null: str | None = None) -> Convert:
    """A name from ``options`` (legacy spelling, case-insensitive → lorasweep value)."""
    lowered = {k.lower(): v for k, v in options.items()}

    def convert(raw: Any, ctx: Context) -> Pairs:
        if raw is None or raw == "":
            if null is None:
                raise Skip("not set: lorasweep's default is kept")
            raw = null
        if not isinstance(raw, str) or raw.lower() not in lowered:
            raise BadValue(f"{raw!r} is not one of {', '.join(options)}")
        return [(target, lowered[raw.lower()])]

    return convert


def negated(target: str) -> Convert:
    def convert(raw: Any, ctx: Context) -> Pairs:
        return [(target, not schema.to_bool(raw))]

    return convert


def when_true(target: str, result: Any, otherwise: str) -> Convert:
    """A flag that selects ``result`` when true and leaves ``target`` alone when false."""

    def convert(raw: Any, ctx: Context) -> Pairs:
        if schema.to_bool(raw):
            return [(target, result)]
        raise Skip(f"false: {otherwise}")

    return convert


def _resolution(raw: Any, ctx: Context) -> Pairs:
    """kohya: ``"512"`` or ``"768,512"`` (width, height); LETS: an int. lorasweep: ``N`` or ``[w, h]``."""
    if raw is None:
        raise Skip("null: lorasweep's default is kept")
    parts = [p.strip() for p in raw.split(",")] if isinstance(raw, str) else raw if isinstance(raw, list) else [raw]
    sizes = [schema.to_int(p) for p in parts]
    if len(sizes) not in (1, 2):
        raise BadValue(f"{raw!r}: expected one size or width,height")
    return [("data.resolution", sizes[0] if len(set(sizes)) == 1 else sizes)]


def _epochs(raw: Any, ctx: Context) -> Pairs:
    if raw is None:
        raise Skip("null: lorasweep's default is kept")
    epochs = schema.coerce("training.epochs", raw)
    # kohya's max_train_epochs overrides max_train_steps; LETS passes num_epochs as max_train_epochs. Without
    # max_steps=null lorasweep's default step count would silently win over the file's epochs.
    return [("training.epochs", epochs), ("training.max_steps", None)]


def _max_steps(raw: Any, ctx: Context) -> Pairs:
    epochs_key = "max_train_epochs" if ctx.kind == "kohya" else "num_epochs"
    if ctx.values.get(epochs_key) is not None:
        raise Skip(f"kohya ignores it when {epochs_key} is set")
    if raw is None:
        raise Skip("null: lorasweep's default is kept")
    return [("training.max_steps", schema.coerce("training.max_steps", raw))]


def _warmup_steps(raw: Any, ctx: Context) -> Pairs:
    """kohya's ``lr_warmup_steps``: a step count (int), a ratio (float < 1) or a percentage (``"10%"``)."""
    if raw is None:
        raise Skip("null: no warmup")
    if isinstance(raw, str) and raw.strip().endswith("%"):
        ratio = schema.coerce("scheduler.warmup_ratio", raw.strip()[:-1]) / 100.0
        return [("scheduler.warmup_ratio", ratio)]
    number = schema.coerce("scheduler.warmup_ratio", raw)
    if number < 1:
        return [("scheduler.warmup_ratio", number)]
    total = ctx.values.get("max_train_steps")
    if ctx.values.get("max_train_epochs") is not None or total is None:
        raise Skip(f"{int(number)} warmup steps become scheduler.warmup_ratio only with the total step count, and "
                   "the file has no max_train_steps (kohya derives it from the data); set "
                   "scheduler.warmup_ratio yourself")
    steps = schema.coerce("training.max_steps", total)
    if number >= steps:
        raise BadValue(f"{number:g} warmup steps are not fewer than max_train_steps={steps}")
    return [("scheduler.warmup_ratio", number / steps)]


def _token_length(raw: Any, ctx: Context) -> Pairs:
    """75, 150 or 225 CLIP tokens; null = 75 (kohya's default)."""
    length = 75 if raw is None else schema.coerce("model.max_token_length", raw)
    if length not in (75, 150, 225):
        raise BadValue(f"{raw!r} is not one of 75, 150, 225")
    return [("model.max_token_length", length)]


def _literal(text: Any) -> Any:
    """kohya reads optimizer arguments with ``ast.literal_eval``, keeping the text when that fails."""
    if not isinstance(text, str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _optimizer_args(raw: Any, ctx: Context) -> Pairs:
    """LETS: a dict of strings; kohya: ``["weight_decay=0.1", "betas=0.9,0.99"]`` (or one spaced string)."""
    if raw is None:
        raise Skip("null: none given")
    items: list[tuple[str, Any]]
    if isinstance(raw, dict):
        items = list(raw.items())
    else:
        texts = raw.split() if isinstance(raw, str) else raw
        if not isinstance(texts, list) or not all(isinstance(t, str) and "=" in t for t in texts):
            raise BadValue(f"expected key=value items (e.g. weight_decay=0.1 betas=0.9,0.99), got {raw!r}")
        items = [tuple(t.split("=", 1)) for t in texts]  # type: ignore[misc]
    pairs: Pairs = []
    for name, text in items:
        name = str(name).strip()
        if name == "betas":
            betas = text if isinstance(text, list | tuple) else str(text).strip("()[] ").split(",")
            if len(betas) != 2:
                raise BadValue(f"betas={text!r}: expected two numbers, e.g. 0.9,0.999")
            pairs += [("optimizer.beta1", schema.coerce("optimizer.beta1", str(betas[0]).strip())),
                      ("optimizer.beta2", schema.coerce("optimizer.beta2", str(betas[1]).strip()))]
        elif name in ("weight_decay", "eps"):
            pairs.append((f"optimizer.{name}", schema.coerce(f"optimizer.{name}", _literal(text))))
        elif re.fullmatch(r"[A-Za-z_]\w*", name):
            pairs.append((f"optimizer.args.{name}", _literal(text)))
        else:
            raise BadValue(f"{name!r} is not an argument name")
    return pairs


def _export_optimizer_args(cfg: TrainConfig) -> dict[str, str]:
    o = cfg.optimizer
    args = {"weight_decay": repr(o.weight_decay), "betas": f"{o.beta1!r},{o.beta2!r}", "eps": repr(o.eps)}
    args.update({k: v if isinstance(v, str) else repr(v) for k, v in o.args.items()})
    return args


def _network_module(raw: Any, ctx: Context) -> Pairs:
    if isinstance(raw, str) and raw.strip().endswith("networks.lora"):
        raise Skip("kohya's networks.lora is network.algo=lora (LoCon with network_args conv_dim)")
    if isinstance(raw, str) and raw.strip() == "lycoris.kohya":
        raise Skip("LyCORIS: the algorithm comes from network_args algo=... (network.algo)")
    raise BadValue(f"{raw!r}: lorasweep trains networks.lora and lycoris.kohya (LoRA/LoCon, LoHa, LoKr, DoRA)")


#: kohya/LyCORIS ``network_args`` names → lorasweep keys.
_NETWORK_ARGS = {"conv_dim": "network.conv_dim", "conv_alpha": "network.conv_alpha", "algo": "network.algo",
                 "dora_wd": "network.dora", "rank_dropout": "network.rank_dropout",
                 "module_dropout": "network.module_dropout", "factor": "network.lokr_factor",
                 "dropout": "network.dropout", "loraplus_lr_ratio": "network.loraplus_lr_ratio",
                 "loraplus_unet_lr_ratio": "network.loraplus_unet_lr_ratio",
                 "loraplus_text_encoder_lr_ratio": "network.loraplus_text_encoder_lr_ratio"}
_ALGO_NAMES = {"lora": "lora", "locon": "lora", "loha": "loha", "lokr": "lokr"}


def _network_args(raw: Any, ctx: Context) -> Pairs:
    """kohya: ``["conv_dim=8", "conv_alpha=4", "algo=loha", ...]`` (or one spaced string)."""
    if raw is None:
        raise Skip("null: none given")
    texts = raw.split() if isinstance(raw, str) else raw
    if not isinstance(texts, list) or not all(isinstance(t, str) and "=" in t for t in texts):
        raise BadValue(f"expected key=value items (e.g. conv_dim=8 conv_alpha=4), got {raw!r}")
    pairs: Pairs = []
    for text in texts:
        name, item = (part.strip() for part in text.split("=", 1))
        if name not in _NETWORK_ARGS:
            raise BadValue(f"{name}={item}: not a network argument lorasweep supports (it takes "
                           f"{', '.join(_NETWORK_ARGS)})")
        target = _NETWORK_ARGS[name]
        if name == "algo":
            if item.lower() not in _ALGO_NAMES:
                raise BadValue(f"algo={item}: lorasweep trains {', '.join(_ALGO_NAMES)}")
            pairs.append((target, _ALGO_NAMES[item.lower()]))
        else:
            pairs.append((target, schema.coerce(target, item)))
    return pairs


def _state_dir(raw: Any, ctx: Context) -> Pairs:
    if raw is False:  # the seed documents it as a flag; false = start fresh
        return [("resume.state_dir", None)]
    if raw is True:
        raise BadValue("true: give the state folder to resume from (a run's state/<step> folder)")
    return value("resume.state_dir", blank_is_unset=True)(raw, ctx)


def _not_applied(reason: str) -> Convert:
    def convert(raw: Any, ctx: Context) -> Pairs:
        raise Skip(reason)

    return convert


KOHYA_OPTIMIZERS = {"AdamW": "adamw", "AdamW8bit": "adamw8bit", "Lion": "lion", "Prodigy": "prodigy",
                    "AdaFactor": "adafactor"}
"""kohya ``--optimizer_type`` spellings of lorasweep's optimizers (matched case-insensitively)."""
assert set(KOHYA_OPTIMIZERS.values()) <= set(OPTIMIZERS)
_OPTIMIZER_TO_KOHYA = {v: k for k, v in KOHYA_OPTIMIZERS.items()}
_FROM_FILE = ("a loaded file cannot set this; give it on the command line or in your own config")


def _row(lets: str | None, kohya: str | None, target: str, convert: Convert | None = None, *,
         export: Export | None = None, reason: str = "", aliases: tuple[str, ...] = ()) -> LegacyKey:
    """A row for one target key; by default the value is taken as it is and exported as it is."""
    return LegacyKey(lets, kohya, (target,), convert or value(target),
                     export if export is not None or lets is None else (lambda cfg: get(cfg, target)),
                     reason, aliases=aliases)


def _unsupported(lets: str | None, kohya: str | None, reason: str) -> LegacyKey:
    return LegacyKey(lets, kohya, (), _not_applied(reason), reason=reason)


TABLE: tuple[LegacyKey, ...] = (
    # paths, names, config files
    _row("base_model", "pretrained_model_name_or_path", "model.base", value("model.base", blank_is_unset=True)),
    _row("img_folder", "train_data_dir", "data.train_dir", value("data.train_dir", blank_is_unset=True)),
    _row("output_folder", "output_dir", "output.export_dir", value("output.export_dir", blank_is_unset=True),
         reason="LoRA files always go into the run folder; this adds a copy there"),
    _row("change_output_name", "output_name", "output.name", value("output.name", blank_is_unset=True)),
    _row("save_json_folder", None, "legacy.save_json_folder",
         value("legacy.save_json_folder", blank_is_unset=True)),
    LegacyKey("load_json_path", "config_file", ("legacy.load_json_path",), _not_applied(_FROM_FILE),
              lambda cfg: cfg.legacy.load_json_path),
    LegacyKey("json_load_skip_list", None, ("legacy.json_load_skip_list",), _not_applied(_FROM_FILE),
              lambda cfg: list(cfg.legacy.json_load_skip_list)),
    LegacyKey("multi_run_folder", None, (), _not_applied("a folder of LETS JSON files to train in turn: run "
                                                         "`lorasweep queue DIR`"),
              lambda cfg: None, command="lorasweep queue DIR", aliases=("list_of_json_to_run",)),
    LegacyKey("save_json_only", "output_config", ("legacy.save_json_only",),
              _not_applied("LETS clears it when it saves a file; set legacy.save_json_only=true on the command "
                           "line"), lambda cfg: False),
    # captions
    _row("caption_dropout_rate", "caption_dropout_rate", "data.caption_dropout_rate",
         value("data.caption_dropout_rate", null=0.0)),
    _row("caption_dropout_every_n_epochs", "caption_dropout_every_n_epochs", "data.caption_dropout_every_n_epochs",
         value("data.caption_dropout_every_n_epochs", zero_is_null=True)),
    _row("caption_tag_dropout_rate", "caption_tag_dropout_rate", "data.caption_tag_dropout_rate",
         value("data.caption_tag_dropout_rate", null=0.0)),
    _row("shuffle_captions", "shuffle_caption", "data.shuffle_caption"),
    _row("keep_tokens", "keep_tokens", "data.keep_tokens", value("data.keep_tokens", null=0)),
    _row("caption_extension", "caption_extension", "data.caption_extension"),
    _row("max_clip_token_length", "max_token_length", "model.max_token_length", _token_length),
    _row("tag_occurrence_txt_file", None, "data.tag_frequency_file"),
    _row("sort_tag_occurrence_alphabetically", None, "data.tag_frequency_sort",
         lambda raw, ctx: [("data.tag_frequency_sort", "alpha" if schema.to_bool(raw) else "count")],
         export=lambda cfg: cfg.data.tag_frequency_sort == "alpha"),
    # network
    _row("net_dim", "network_dim", "network.dim"),
    _row("alpha", "network_alpha", "network.alpha", export=lambda cfg: cfg.network.effective_alpha),
    _row("unet_only", "network_train_unet_only", "network.train_text_encoder",
         negated("network.train_text_encoder"), export=lambda cfg: not cfg.network.train_text_encoder),
    _row("text_only", "network_train_text_encoder_only", "network.train_unet", negated("network.train_unet"),
         export=lambda cfg: not cfg.network.train_unet),
    _row("lora_model_for_resume", "network_weights", "network.init_weights",
         value("network.init_weights", blank_is_unset=True)),
    _row(None, "network_dropout", "network.dropout", value("network.dropout", null=0.0)),
    LegacyKey("network_module", "network_module", (), _network_module,
              reason="networks.lora and lycoris.kohya; the variant comes from network_args"),
    LegacyKey(None, "network_args", tuple(_NETWORK_ARGS.values()), _network_args,
              reason="LoCon, LyCORIS and LoRA+ arguments; block weights are not supported"),
    _row("training_comment", "training_comment", "output.comment"),
    _row("no_meta", "no_metadata", "output.no_metadata"),
    # optimizer and schedule
    _row("learning_rate", "learning_rate", "optimizer.lr"),
    _row("unet_lr", "unet_lr", "optimizer.unet_lr"),
    _row("text_encoder_lr", "text_encoder_lr", "optimizer.text_encoder_lr"),
    _row("use_8bit_adam", "use_8bit_adam", "optimizer.name",
         when_true("optimizer.name", "adamw8bit", "the optimizer comes from optimizer_type or lorasweep's default"),
         export=lambda cfg: cfg.optimizer.name == "adamw8bit"),
    _row("optimizer_type", "optimizer_type", "optimizer.name", choice("optimizer.name", KOHYA_OPTIMIZERS),
         export=lambda cfg: _OPTIMIZER_TO_KOHYA.get(cfg.optimizer.name, cfg.optimizer.name)),
    _row("use_lion", "use_lion_optimizer", "optimizer.name",
         when_true("optimizer.name", "lion", "the optimizer comes from optimizer_type or lorasweep's default"),
         export=lambda cfg: cfg.optimizer.name == "lion"),
    LegacyKey("optimizer_args", "optimizer_args", ("optimizer.weight_decay", "optimizer.beta1", "optimizer.beta2",
                                                   "optimizer.eps", "optimizer.args"),
              _optimizer_args, _export_optimizer_args,
              reason="weight_decay, betas and eps become optimizer keys; others go to optimizer.args"),
    _row("max_grad_norm", "max_grad_norm", "training.max_grad_norm",
         value("training.max_grad_norm", zero_is_null=True),
         export=lambda cfg: cfg.training.max_grad_norm or 0.0, reason="0 = no clipping = null"),
    _row("scheduler", "lr_scheduler", "scheduler.name", choice("scheduler.name", {s: s for s in SCHEDULERS})),
    _row("cosine_restarts", "lr_scheduler_num_cycles", "scheduler.num_cycles",
         value("scheduler.num_cycles", null=1)),
    _row("scheduler_power", "lr_scheduler_power", "scheduler.power", value("scheduler.power", null=1.0)),
    _row("warmup_lr_ratio", None, "scheduler.warmup_ratio", value("scheduler.warmup_ratio", null=0.0)),
    _row(None, "lr_warmup_steps", "scheduler.warmup_ratio", _warmup_steps,
         reason="steps ÷ max_train_steps; a float below 1 or a percentage is already a ratio"),
    # training loop
    _row("batch_size", "train_batch_size", "training.batch_size"),
    LegacyKey("num_epochs", "max_train_epochs", ("training.epochs",), _epochs,
              lambda cfg: None if cfg.training.max_steps is not None else cfg.training.epochs,
              reason="kohya's max_train_epochs overrides max_train_steps, so it also sets training.max_steps=null"),
    _row("max_steps", "max_train_steps", "training.max_steps", _max_steps),
    _row("save_every_n_epochs", "save_every_n_epochs", "output.save_every_n_epochs",
         value("output.save_every_n_epochs", zero_is_null=True), aliases=("save_at_n_epochs",)),
    _row("gradient_acc_steps", "gradient_accumulation_steps", "training.grad_accum_steps",
         value("training.grad_accum_steps", null=1)),
    _row("gradient_checkpointing", "gradient_checkpointing", "training.gradient_checkpointing"),
    _row("test_seed", "seed", "training.seed"),
    _row("clip_skip", "clip_skip", "model.clip_skip", value("model.clip_skip", null=1)),
    _row("prior_loss_weight", "prior_loss_weight", "training.prior_loss_weight",
         value("training.prior_loss_weight", null=1.0)),
    _row("reg_img_folder", "reg_data_dir", "data.reg_dir", value("data.reg_dir", blank_is_unset=True)),
    _row("v2", "v2", "model.v2"),
    _row("v_parameterization", "v_parameterization", "model.v_parameterization"),
    _row("vae", "vae", "model.vae", value("model.vae", blank_is_unset=True)),
    # noise and loss (kohya's None = off = 0 here, except min_snr_gamma)
    _row("noise_offset", "noise_offset", "training.noise_offset", value("training.noise_offset", null=0.0)),
    _row(None, "noise_offset_random_strength", "training.noise_offset_random_strength"),
    _row(None, "adaptive_noise_scale", "training.adaptive_noise_scale",
         value("training.adaptive_noise_scale", null=0.0)),
    _row(None, "multires_noise_iterations", "training.multires_noise_iterations",
         value("training.multires_noise_iterations", null=0)),
    _row(None, "multires_noise_discount", "training.multires_noise_discount"),
    _row(None, "ip_noise_gamma", "training.ip_noise_gamma", value("training.ip_noise_gamma", null=0.0)),
    _row(None, "ip_noise_gamma_random_strength", "training.ip_noise_gamma_random_strength"),
    _row(None, "min_snr_gamma", "training.min_snr_gamma", value("training.min_snr_gamma", zero_is_null=True)),
    _row(None, "debiased_estimation_loss", "training.debiased_estimation"),
    _row(None, "zero_terminal_snr", "training.zero_terminal_snr"),
    _row(None, "min_timestep", "training.min_timestep", value("training.min_timestep", null=0)),
    _row(None, "max_timestep", "training.max_timestep", value("training.max_timestep", null=1000)),
    _row(None, "loss_type", "training.loss_type", choice("training.loss_type", {t: t for t in LOSS_TYPES})),
    _row(None, "huber_schedule", "training.huber_schedule",
         choice("training.huber_schedule", {s: s for s in HUBER_SCHEDULES})),
    _row(None, "huber_c", "training.huber_c"),
    _row(None, "huber_scale", "training.huber_scale"),
    # precision, memory, speed
    _row("mixed_precision", "mixed_precision", "precision.mixed",
         choice("precision.mixed", {m: m for m in MIXED}, null="no")),
    _row("save_precision", "save_precision", "precision.save",
         choice("precision.save", {s: s for s in SAVE}, null="float")),
    _row("xformers", "xformers", "training.attention",
         when_true("training.attention", "sdpa", "the attention backend stays training.attention"),
         export=lambda cfg: cfg.training.attention != "eager",
         reason="true asks for memory-efficient attention: PyTorch's sdpa gives it without the xformers package "
                "(training.attention=xformers uses that package)"),
    _row(None, "sdpa", "training.attention",
         when_true("training.attention", "sdpa", "the attention backend stays training.attention")),
    _row("mem_eff_attn", "mem_eff_attn", "training.attention",
         when_true("training.attention", "sdpa", "the attention backend stays training.attention"),
         export=lambda cfg: False, reason="PyTorch's sdpa includes the memory-efficient attention kernel"),
    _row("cache_latents", "cache_latents", "data.cache_latents"),
    _row(None, "cache_latents_to_disk", "data.cache_to_disk"),
    _row("num_workers", "max_data_loader_n_workers", "data.num_workers"),
    _row("persistent_workers", "persistent_data_loader_workers", "data.persistent_workers"),
    # resolution, buckets, augmentation
    _row("train_resolution", "resolution", "data.resolution", _resolution),
    _row("buckets", "enable_bucket", "data.buckets.enabled"),
    _row("min_bucket_resolution", "min_bucket_reso", "data.buckets.min_side"),
    _row("max_bucket_resolution", "max_bucket_reso", "data.buckets.max_side"),
    _row("bucket_reso_steps", "bucket_reso_steps", "data.buckets.step", value("data.buckets.step", null=64)),
    _row("bucket_no_upscale", "bucket_no_upscale", "data.buckets.no_upscale"),
    _row("color_aug", "color_aug", "data.color_aug"),
    _row("flip_aug", "flip_aug", "data.flip_aug"),
    _row("random_crop", "random_crop", "data.random_crop"),
    # saving, state, logs
    _row("save_as", "save_model_as", "output.format",
         choice("output.format", {"safetensors": "safetensors", "ckpt": "ckpt", "pt": "pt"}, null="safetensors")),
    _row(None, "save_every_n_steps", "output.save_every_n_steps", value("output.save_every_n_steps",
                                                                        zero_is_null=True)),
    _row("save_state", "save_state", "output.save_state"),
    _row("load_previous_save_state", "resume", "resume.state_dir", _state_dir, aliases=("resume",),
         export=lambda cfg: cfg.resume.state_dir),
    _row("log_dir", "logging_dir", "tracking.tensorboard_dir", value("tracking.tensorboard_dir", blank_is_unset=True)),
    # settings lorasweep has no key for
    _unsupported("save_n_epoch_ratio", "save_n_epoch_ratio",
                 "lorasweep saves every N epochs only (output.save_every_n_epochs)"),
    _unsupported("save_last_n_epochs", "save_last_n_epochs", "lorasweep never deletes a saved snapshot"),
    _unsupported("save_last_n_epochs_state", "save_last_n_epochs_state", "lorasweep never deletes a saved state"),
    _unsupported("lowram", "lowram", "lorasweep has no low-RAM loading mode"),
    _unsupported("log_prefix", "log_prefix", "runs are named by output.run_name and tracking.run_name"),
    _unsupported("face_crop_aug_range", "face_crop_aug_range", "face-crop augmentation is not supported"),
    _unsupported(None, "dataset_config", "lorasweep reads a kohya image folder (data.train_dir), not a dataset "
                                         "config"),
    _unsupported(None, "sample_prompts", "samples come from sampling.prompts and sampling.seeds"),
    _unsupported(None, "sample_every_n_steps", "samples are made every sampling.every_n_steps"),
    _unsupported(None, "sample_every_n_epochs", "samples are made every sampling.every_n_steps"),
    _unsupported(None, "sample_sampler", "samples use the base model's scheduler"),
    _unsupported(None, "log_with", "lorasweep logs to MLflow (and TensorBoard with tracking.tensorboard_dir)"),
    _unsupported(None, "full_fp16", "precision.mixed=fp16 keeps the LoRA weights in float32 (with a grad scaler)"),
    _unsupported(None, "full_bf16", "precision.mixed=bf16 keeps the LoRA weights in float32"),
)
"""Every known legacy setting. The seed list's LETS keys all appear (a test checks each maps to a config key
or a command)."""


def _index(names: Iterable[tuple[str | None, LegacyKey]]) -> dict[str, LegacyKey]:
    index: dict[str, LegacyKey] = {}
    for name, row in names:
        if name is not None:
            assert name not in index, f"legacy key {name} appears twice in the table"
            index[name] = row
    return index


BY_LETS: dict[str, LegacyKey] = _index([(r.lets, r) for r in TABLE] + [(a, r) for r in TABLE for a in r.aliases])
BY_KOHYA: dict[str, LegacyKey] = _index((r.kohya, r) for r in TABLE)
SEED_NAME: dict[str, str] = {lets: seed for seed, lets in SEED_PARAMETERS}


def legacy_names(key: str) -> list[str]:
    """How the legacy tools spell config key ``key`` (for the docs): seed name, LETS key, kohya flag."""
    names: list[str] = []
    for row in TABLE:
        if key not in row.targets:
            continue
        if row.lets in SEED_NAME and SEED_NAME[row.lets] != row.lets:
            names.append(f"seed `{SEED_NAME[row.lets]}`")
        if row.lets:
            names.append(f"LETS `{row.lets}`")
        if row.kohya:
            names.append(f"kohya `--{row.kohya}`")
    return list(dict.fromkeys(names))
