"""Legacy settings (LETS JSON, kohya TOML / arguments): the mapping table covers the seed list, values are
converted and type-checked, files apply at composition with command-line overrides winning, and what
lorasweep writes reads back to the same config."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from lorasweep.app import check_multirun, compose, split_hydra_args
from lorasweep.cli import USAGE
from lorasweep.config.docs import render
from lorasweep.config.train import TrainConfig
from lorasweep.errors import UserError
from lorasweep.legacy import schema
from lorasweep.legacy.convert import convert_file, hydra_value, render_yaml
from lorasweep.legacy.lets import save_config_files, to_lets_dict, write_lets_json
from lorasweep.legacy.mapping import BY_LETS, SEED_PARAMETERS, TABLE
from lorasweep.legacy.readers import KOHYA_ARGS, KOHYA_TOML, LETS_JSON

LETS = {  # a LETS JSON as its ArgStore writes it (abridged): nulls, strings for optimizer args, unknown keys
    "base_model": "/models/sd15.safetensors", "img_folder": "C:\\data\\shiroko", "output_folder": "",
    "save_json_folder": None, "load_json_path": None, "multi_run_folder": None, "json_load_skip_list": None,
    "change_output_name": "shiroko_v1", "training_comment": "trigger: shiroko", "save_json_only": False,
    "sort_tag_occurrence_alphabetically": True, "optimizer_type": "Lion",
    "optimizer_args": {"weight_decay": "0.1", "betas": "0.9,0.99"}, "scheduler": "cosine_with_restarts",
    "cosine_restarts": 3, "scheduler_power": None, "learning_rate": 0.0001, "unet_lr": None,
    "text_encoder_lr": 5e-05, "warmup_lr_ratio": 0.05, "unet_only": True, "net_dim": 32, "alpha": 16,
    "train_resolution": 512, "batch_size": 2, "clip_skip": 2, "test_seed": 23, "mixed_precision": "bf16",
    "save_precision": "fp16", "num_epochs": 10, "save_every_n_epochs": 2, "max_steps": None,
    "min_bucket_resolution": 320, "max_bucket_resolution": 960, "bucket_reso_steps": None, "keep_tokens": None,
    "xformers": True, "max_clip_token_length": 150, "noise_offset": 0.1, "use_8bit_adam": False,
    "network_module": "sd_scripts.networks.lora", "some_future_key": 1,
}


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(json.dumps(data))
    return path


def fields_except_legacy(cfg: TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k != "legacy"}


def test_every_seed_parameter_has_a_lorasweep_key_or_command() -> None:
    assert len(SEED_PARAMETERS) == 65 and len({seed for seed, _ in SEED_PARAMETERS}) == 65
    for seed, lets in SEED_PARAMETERS:
        row = BY_LETS.get(lets)
        assert row is not None, f"seed parameter {seed} (LETS {lets}) is not in the mapping table"
        if row.targets:
            missing = [t for t in row.targets if not schema.is_key(t)]
            assert not missing, f"{seed}: {missing} are not config keys"
        else:
            assert row.command and row.command.split()[1] in USAGE, f"{seed}: no config key and no command"


def test_every_table_target_is_a_config_key() -> None:
    for row in TABLE:
        assert all(schema.is_key(t) for t in row.targets), row
        assert row.targets or row.reason or row.command, row


def test_lets_json_values_are_converted(tmp_path: Path) -> None:
    conversion = convert_file(write_json(tmp_path / "lets.json", LETS))
    values = conversion.values()
    assert conversion.kind == LETS_JSON
    assert values["model.base"] == "/models/sd15.safetensors"
    assert values["data.train_dir"] == "C:\\data\\shiroko"
    assert values["output.name"] == "shiroko_v1"
    assert values["network.alpha"] == 16.0 and values["network.dim"] == 32
    assert values["network.train_text_encoder"] is False  # unet_only
    assert values["optimizer.name"] == "lion"
    assert (values["optimizer.weight_decay"], values["optimizer.beta1"], values["optimizer.beta2"]) == (0.1, 0.9, 0.99)
    assert values["scheduler.name"] == "cosine_with_restarts" and values["scheduler.num_cycles"] == 3
    assert values["scheduler.power"] == 1.0  # null: kohya's default
    assert values["data.buckets.step"] == 64  # null: kohya's default, not lorasweep's tiny-model 16
    assert values["data.keep_tokens"] == 0
    assert values["data.tag_frequency_sort"] == "alpha"
    assert values["training.attention"] == "sdpa"
    assert values["training.max_steps"] is None and values["training.epochs"] == 10
    assert values["model.max_token_length"] == 150
    assert "output.export_dir" not in values  # "" = unset
    reasons = {n.source: n.reason for n in conversion.not_applied}
    assert "lorasweep queue" in reasons["multi_run_folder"]
    assert values["training.noise_offset"] == 0.1
    assert "unknown setting" in reasons["some_future_key"]
    assert "networks.lora" in reasons["network_module"]
    assert set(reasons) | {m.source for m in conversion.mapped} == set(LETS)  # every setting is accounted for


def test_kohya_toml_sections_epochs_and_warmup(tmp_path: Path) -> None:
    toml = tmp_path / "kohya.toml"
    toml.write_text('[model_arguments]\npretrained_model_name_or_path = "/m/x.safetensors"\nv2 = false\n'
                    '[training_arguments]\nmax_train_steps = 1000\nlr_warmup_steps = 100\nxformers = true\n'
                    'network_train_unet_only = true\nsave_every_n_steps = 250\n'
                    '[optimizer_arguments]\noptimizer_type = "Lion"\n'
                    'optimizer_args = ["weight_decay=0.05", "betas=0.95,0.98", "decouple=True"]\n'
                    'resolution = "768,768"\nmin_snr_gamma = 5\n[x]\nmin_bucket_reso = 256\n'
                    '[loss]\nloss_type = "huber"\nhuber_schedule = "exponential"\nmultires_noise_iterations = 6\n'
                    'debiased_estimation_loss = true\n[network_arguments]\nnetwork_module = "lycoris.kohya"\n'
                    'network_args = ["algo=locon", "conv_dim=8", "conv_alpha=4", "rank_dropout=0.1", '
                    '"loraplus_lr_ratio=16"]\n')
    conversion = convert_file(toml)
    values = conversion.values()
    assert conversion.kind == KOHYA_TOML
    assert values["model.base"] == "/m/x.safetensors" and values["training.max_steps"] == 1000
    assert values["scheduler.warmup_ratio"] == pytest.approx(0.1)
    assert values["optimizer.name"] == "lion" and values["optimizer.args.decouple"] is True
    assert (values["optimizer.beta1"], values["optimizer.beta2"]) == (0.95, 0.98)
    assert values["data.resolution"] == 768 and values["network.train_text_encoder"] is False
    assert values["data.buckets.min_side"] == 256 and values["output.save_every_n_steps"] == 250
    assert values["training.min_snr_gamma"] == 5 and values["training.loss_type"] == "huber"
    assert values["training.huber_schedule"] == "exponential" and values["training.multires_noise_iterations"] == 6
    assert values["training.debiased_estimation"] is True
    assert (values["network.algo"], values["network.conv_dim"], values["network.conv_alpha"]) == ("lora", 8, 4.0)
    assert values["network.rank_dropout"] == 0.1 and values["network.loraplus_lr_ratio"] == 16
    assert "network_args" in {n.source: n.reason for n in conversion.not_applied}["network_module"]

    toml.write_text("max_train_epochs = 4\nmax_train_steps = 1000\nlr_warmup_steps = 50\n")
    conversion = convert_file(toml)
    assert conversion.values() == {"training.epochs": 4, "training.max_steps": None}  # epochs win, as in kohya
    reasons = {n.source: n.reason for n in conversion.not_applied}
    assert "max_train_epochs" in reasons["max_train_steps"] and "total step count" in reasons["lr_warmup_steps"]
    for given, ratio in (('"10%"', 0.1), ("0.05", 0.05)):
        toml.write_text(f"lr_warmup_steps = {given}\n")
        assert convert_file(toml).values() == {"scheduler.warmup_ratio": pytest.approx(ratio)}
    toml.write_text('resolution = "768,512"\n')
    assert convert_file(toml).values() == {"data.resolution": [768, 512]}


def test_kohya_arguments_from_a_bat_file(tmp_path: Path) -> None:
    bat = tmp_path / "train.bat"
    bat.write_text('rem my LoRA\r\n'
                   'accelerate launch --num_cpu_threads_per_process 2 "sd-scripts\\train_network.py" ^\r\n'
                   '  --pretrained_model_name_or_path="D:\\models\\any v3.safetensors" ^\r\n'
                   '  --train_data_dir=D:\\data --network_dim 16 --network_alpha=8 --learning_rate 1e-4 ^\r\n'
                   '  --optimizer_args weight_decay=0.01 betas=0.9,0.999 --network_train_unet_only --xformers ^\r\n'
                   '  --output_name "my lora" --network_module=networks.lora\r\npause\r\n')
    conversion = convert_file(bat)
    values = conversion.values()
    assert conversion.kind == KOHYA_ARGS
    assert values["model.base"] == "D:\\models\\any v3.safetensors" and values["data.train_dir"] == "D:\\data"
    assert (values["network.dim"], values["network.alpha"], values["optimizer.lr"]) == (16, 8.0, 1e-4)
    assert values["optimizer.beta2"] == 0.999 and values["network.train_text_encoder"] is False
    assert values["output.name"] == "my lora" and values["training.attention"] == "sdpa"
    launcher = [n for n in conversion.not_applied if "launcher" in n.reason]
    assert launcher and "accelerate launch" in launcher[0].source


@pytest.mark.parametrize(("settings", "fragments"), [
    ({"net_dim": "many"}, ("net_dim", "expected an integer", "'many'")),
    ({"net_dim": 1.5}, ("net_dim", "expected an integer")),
    ({"learning_rate": True}, ("learning_rate", "expected a number")),
    ({"shuffle_captions": "yes"}, ("shuffle_captions", "expected true or false")),
    ({"train_resolution": "512,768,3"}, ("train_resolution", "width,height")),
    ({"train_resolution": "5x5"}, ("train_resolution", "expected an integer")),
    ({"optimizer_type": "SGDNesterov"}, ("optimizer_type", "'SGDNesterov' is not one of")),
    ({"scheduler": "plateau"}, ("scheduler", "'plateau' is not one of")),
    ({"max_clip_token_length": 100}, ("max_clip_token_length", "75, 150, 225")),
    ({"use_8bit_adam": True, "optimizer_type": "Lion"}, ("use_8bit_adam and optimizer_type", "disagree")),
    ({"change_output_name": True}, ("change_output_name", "expected a string")),
])
def test_wrong_values_are_fatal_and_name_the_setting_and_file(tmp_path: Path, settings: dict[str, Any],
                                                             fragments: tuple[str, ...]) -> None:
    path = write_json(tmp_path / "bad.json", settings)
    with pytest.raises(UserError) as info:
        convert_file(path)
    text = info.value.paragraph()
    assert str(path) in text
    for fragment in fragments:
        assert fragment in text, text


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"legacy\.load_json_path: .*missing\.json does not exist"):
        convert_file(tmp_path / "missing.json", where="legacy.load_json_path")
    (tmp_path / "broken.json").write_text('{"net_dim": 4,}')
    with pytest.raises(UserError, match=r"broken.json: is not valid JSON.*line 1"):
        convert_file(tmp_path / "broken.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="not an object"):
        convert_file(tmp_path / "list.json")
    (tmp_path / "notes.txt").write_text("just some words\n")
    with pytest.raises(UserError, match="no --key value arguments"):
        convert_file(tmp_path / "notes.txt")


def test_strings_survive_hydra_overrides() -> None:
    texts = ["plain", "/a/b.safetensors", "a b", "it's", "C:\\x\\y\\", "C:\\x", "x\\'y", "${oops}", "a\\${b}",
             "a,b", "[x]", "null", "1e-4", "", "q\"", "\\\\srv\\share", "{a:1}"]
    cfg = compose([f"sampling.prompts={hydra_value(texts)}", f"output.comment={hydra_value(texts[4])}"]).cfg
    assert list(cfg.sampling.prompts) == texts
    assert cfg.output.comment == texts[4]


def test_file_applies_at_composition_and_the_command_line_wins(tmp_path: Path) -> None:
    path = write_json(tmp_path / "lets.json", {**LETS, "base_model": "tiny", "img_folder": None})
    loaded = compose([f"legacy.load_json_path={path}"]).train_config()
    assert (loaded.network.dim, loaded.scheduler.name, loaded.optimizer.name) == (32, "cosine_with_restarts",
                                                                                  "lion")
    assert loaded.scheduler.num_cycles == 3 and loaded.data.buckets.step == 64
    mine = compose([f"legacy.load_json_path={path}", "network.dim=4", "scheduler=linear", "optimizer=adamw",
                    "legacy.json_load_skip_list=[learning_rate,model.base]"]).train_config()
    assert (mine.network.dim, mine.scheduler.name, mine.optimizer.name) == (4, "linear", "adamw")
    assert mine.scheduler.num_cycles == 3  # the file's other scheduler settings still apply
    assert mine.optimizer.lr == compose([]).train_config().optimizer.lr  # skipped by its LETS name
    assert mine.model.base == "tiny"  # skipped by its lorasweep key
    assert mine.optimizer.weight_decay == 0.1


def test_a_bad_value_from_the_file_names_the_setting(tmp_path: Path) -> None:
    path = write_json(tmp_path / "zero.json", {"net_dim": 0})
    with pytest.raises(UserError, match=r"network\.dim \(set by net_dim in .*zero.json\): 0 is out of range"):
        compose([f"legacy.load_json_path={path}"]).train_config()
    assert compose([f"legacy.load_json_path={path}", "network.dim=2"]).train_config().network.dim == 2
    with pytest.raises(UserError) as info:
        compose([f"legacy.load_json_path={path}", "network.dim=-1"]).train_config()
    assert "set by" not in info.value.where  # the user's own value is the user's mistake


@pytest.mark.parametrize(("args", "fragment"), [('["down_lr_weight=1,1,1"]', "down_lr_weight=1,1,1: not a network"),
                                               ('["algo=ia3"]', "algo=ia3: lorasweep trains lora, locon"),
                                               ('"conv_dim"', "expected key=value items")])
def test_unsupported_network_args_stop_the_import(tmp_path: Path, args: str, fragment: str) -> None:
    toml = tmp_path / "kohya.toml"
    toml.write_text(f"network_args = {args}\n")
    with pytest.raises(UserError) as info:
        convert_file(toml)
    assert "network_args" in str(info.value) and fragment in str(info.value)


def test_lets_json_round_trips(tmp_path: Path) -> None:
    tc = compose(["network.alpha_ratio=0.5", "scheduler=cosine_with_restarts", "scheduler.num_cycles=3",
                  "optimizer=lion", "training.attention=eager", "data.buckets.step=16", "sampling.seeds=[3,4]",
                  "+tracking.tags.team=a", "network.train_unet=false", "optimizer.weight_decay=0.02",
                  f"legacy.save_json_folder={tmp_path}"]).train_config()
    tc.sampling.prompts = ["a b", "it's", "x\\'y"]
    tc.data.train_dir = "/data/${not an interpolation}"
    first = write_lets_json(tc, tmp_path, "run")
    second = write_lets_json(tc, tmp_path, "run")
    assert (first.name, second.name) == ("run.json", "run_1.json") and first.read_text() == second.read_text()
    data = json.loads(first.read_text())
    assert (data["net_dim"], data["alpha"], data["scheduler"], data["optimizer_type"], data["text_only"]) == \
        (8, 4.0, "cosine_with_restarts", "Lion", True)
    assert data["lorasweep"]["training.attention"] == "eager" and "network.dim" not in data["lorasweep"]
    back = compose([f"legacy.load_json_path={first}"]).train_config()
    assert fields_except_legacy(back) == fields_except_legacy(tc)
    assert back.legacy.save_json_folder == str(tmp_path)


def test_save_json_only_files_read_back(tmp_path: Path) -> None:
    tc = compose(["optimizer=lion", "scheduler=linear", "network.dim=6", "legacy.save_json_only=true",
                  f"legacy.save_json_folder={tmp_path}"]).train_config()
    json_path, yaml_path = save_config_files(tc)
    assert json_path.parent == yaml_path.parent == tmp_path and json_path.stem == yaml_path.stem
    from_yaml = compose([], config_name=yaml_path.stem, config_dir=str(tmp_path)).train_config()
    from_json = compose([f"legacy.load_json_path={json_path}"]).train_config()
    assert fields_except_legacy(from_yaml) == fields_except_legacy(from_json) == fields_except_legacy(tc)
    assert from_yaml.legacy.save_json_only is False  # training with the YAML trains
    assert compose(["scheduler=cosine"], config_name=yaml_path.stem,
                   config_dir=str(tmp_path)).train_config().scheduler.name == "cosine"
    with pytest.raises(UserError, match=r"legacy\.save_json_only: is true but legacy\.save_json_folder is null"):
        compose(["legacy.save_json_only=true"]).train_config()


def test_imported_yaml_equals_loading_the_file(tmp_path: Path) -> None:
    path = write_json(tmp_path / "lets.json", {**LETS, "base_model": "tiny"})
    conversion = convert_file(path)
    (tmp_path / "mine.yaml").write_text(render_yaml(conversion.values(), ["a header"]))
    from_yaml = compose([], config_name="mine", config_dir=str(tmp_path)).train_config()
    loaded = compose([f"legacy.load_json_path={path}"]).train_config()
    assert fields_except_legacy(from_yaml) == fields_except_legacy(loaded)
    assert OmegaConf.load(tmp_path / "mine.yaml").defaults[0] == "train"
    overridden = compose(["scheduler=linear", "network.dim=4"], config_name="mine",
                         config_dir=str(tmp_path)).train_config()
    assert (overridden.scheduler.name, overridden.network.dim) == ("linear", 4)


def test_to_lets_dict_writes_every_lets_key_of_the_seed() -> None:
    data = to_lets_dict(compose([]).train_config())
    assert {lets for _, lets in SEED_PARAMETERS} <= set(data)
    assert data["multi_run_folder"] is None and data["save_json_only"] is False


def test_multirun_check_reads_every_legacy_file(tmp_path: Path) -> None:
    good = write_json(tmp_path / "good.json", {"net_dim": 4})
    bad = write_json(tmp_path / "bad.json", {"net_dim": "four"})
    check_multirun([f"legacy.load_json_path={good}"])
    with pytest.raises(UserError, match=r"bad\.json: net_dim: expected an integer"):
        check_multirun([f"legacy.load_json_path={good},{bad}", "optimizer.lr=1e-3,1e-4"])
    with pytest.raises(UserError, match=r"legacy\.save_json_only: .*multirun"):
        check_multirun(["legacy.save_json_only=true", f"legacy.save_json_folder={tmp_path}", "network.dim=2,4"])


def test_split_hydra_args(tmp_path: Path) -> None:
    assert split_hydra_args(["-m", "--config-dir", str(tmp_path), "--config-name=mine.yaml", "a=1"]) == \
        (["a=1"], "mine", str(tmp_path.resolve()))
    with pytest.raises(UserError, match=r"--config-dir: .* is not a folder"):
        split_hydra_args(["--config-dir", str(tmp_path / "nope")])
    with pytest.raises(UserError, match="--config-path"):
        split_hydra_args(["--config-path", "x"])
    with pytest.raises(UserError, match=r"--config-name: there is no nothere\.yaml"):
        compose([], config_name="nothere", config_dir=str(tmp_path))


def test_parameters_doc_shows_nested_keys_and_legacy_names() -> None:
    text = render()
    row = next(line for line in text.splitlines() if line.startswith("| `data.buckets.step` |"))
    assert "LETS `bucket_reso_steps`" in row and "kohya `--bucket_reso_steps`" in row
    alpha = next(line for line in text.splitlines() if line.startswith("| `network.alpha` |"))
    assert "seed `alfa`" in alpha and "LETS `alpha`" in alpha
    queue = next(line for line in text.splitlines() if line.startswith("| `multi_run_folder`"))
    assert "`lorasweep queue DIR`" in queue


@pytest.mark.parametrize(("settings", "epochs", "max_steps"), [
    ({"num_epochs": 10}, 10, None),  # no max_steps: lorasweep's default step count must not win
    ({"num_epochs": 10, "max_steps": 500}, 10, None),  # kohya: max_train_epochs overrides max_train_steps
    ({"num_epochs": None, "max_steps": 500}, 1, 500),
])
def test_lets_epochs_and_steps_follow_kohya(tmp_path: Path, settings: dict[str, Any], epochs: int,
                                            max_steps: int | None) -> None:
    cfg = compose([f"legacy.load_json_path={write_json(tmp_path / 'lets.json', settings)}"]).train_config()
    assert (cfg.training.epochs, cfg.training.max_steps) == (epochs, max_steps)


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("network.dim", 8, 8), ("network.dim", 8.0, 8), ("network.dim", "8", 8), ("network.dim", "1e3", 1000),
    ("network.dim", 10**20, 10**20),
    ("optimizer.lr", "1e-4", 1e-4), ("optimizer.lr", 3, 3.0), ("optimizer.lr", " 0.5 ", 0.5),
])
def test_legacy_numbers_are_read_from_numbers_and_numeric_strings(key: str, value: Any, expected: Any) -> None:
    from lorasweep.legacy.schema import coerce

    got = coerce(key, value)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize(("key", "value"), [
    ("network.dim", "8.5"), ("network.dim", True), ("network.dim", "eight"), ("network.dim", float("inf")),
    ("optimizer.lr", "nan"), ("optimizer.lr", float("nan")), ("optimizer.lr", False), ("optimizer.lr", [1e-4]),
])
def test_legacy_values_that_are_not_numbers_are_refused(key: str, value: Any) -> None:
    from lorasweep.legacy.schema import BadValue, coerce

    with pytest.raises(BadValue):
        coerce(key, value)
