"""The config schema: shipped files validate; bad values give errors naming file, key and value."""

from pathlib import Path

import pytest

from dnc_lab.config import ConfigError, config_from_dict, load_config, parse_override, save_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_round_trips(path, tmp_path):
    from babi_fixtures import write_release  # bAbI reads its vocabulary from the data: a small stand-in

    overrides = [f"task.path={write_release(tmp_path)}"] if path.name == "babi.yaml" else []
    cfg = load_config(path, overrides)
    assert cfg.model.input_size and cfg.model.output_size  # filled in from the task
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_shipped_configs_exist():
    assert {p.name for p in CONFIGS} >= {"copy.yaml", "repeat_copy.yaml"}


def test_defaults_and_task_sizes():
    cfg = config_from_dict({"task": {"name": "copy", "bits": 6}})
    assert (cfg.model.input_size, cfg.model.output_size) == (6, 6)
    assert cfg.train.optimizer == "adam" and cfg.viz.port == 8097
    cfg = config_from_dict({"task": {"name": "repeat-copy", "num_bits": 3}})  # '-' accepted for '_'
    assert (cfg.task.name, cfg.model.input_size, cfg.model.output_size) == ("repeat_copy", 5, 4)


def test_overrides_are_yaml_scalars_and_validated():
    cfg = config_from_dict({"task": {"name": "copy"}},
                           overrides=["train.lr=3e-4", "viz.enabled=false", "model.rnn_type=gru", "viz.env=null"])
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.viz.enabled is False and cfg.model.rnn_type == "gru"
    assert parse_override("task.bits=5") == ("task", "bits", 5)
    with pytest.raises(ConfigError, match=r"--set train.lr=-1: train.lr = -1: expected a value > 0"):
        config_from_dict({"task": {"name": "copy"}}, overrides=["train.lr=-1"])


@pytest.mark.parametrize("raw, overrides, message", [
    ({"task": {"name": "copy"}, "modle": {}}, [], r"c.yaml: unknown section 'modle' \(did you mean 'model'\?\)"),
    ({"task": {"name": "copy"}, "model": {"hiden_size": 3}}, [],
     r"unknown key model.hiden_size \(did you mean 'hidden_size'\?\); allowed: input_size"),
    ({"task": {"name": "copy"}, "model": {"hidden_size": "big"}}, [],
     r"c.yaml: model.hidden_size = 'big': expected an integer"),
    ({"task": {"name": "copy"}, "model": {"hidden_size": 2.5}}, [], r"model.hidden_size = 2.5: expected an integer"),
    ({"task": {"name": "copy"}, "model": {"bias": "yes"}}, [], r"model.bias = 'yes': expected true or false"),
    ({"task": {"name": "copy"}, "model": {"rnn_type": "transformer"}}, [],
     r"model.rnn_type = 'transformer': expected one of 'lstm', 'gru', 'rnn', 'ff'"),
    ({"task": {"name": "copy"}, "train": {"batch_size": 0}}, [], r"train.batch_size = 0: expected a value >= 1"),
    ({"task": {"name": "copy"}, "model": {"dropout": 1.0}}, [], r"model.dropout = 1.0: expected a value >= 0.0 and < 1.0"),
    ({"task": {"name": "copy"}, "model": {"gpu_id": 0}}, [], r"model.gpu_id cannot be set in a config: the device is chosen with"),
    ({"task": {"name": "copy", "bits": 8}, "model": {"input_size": 5}}, [],
     r"model.input_size = 5 conflicts with task 'copy', which needs 8"),
    ({"task": {"name": "sort"}}, [], r"task.name = 'sort' is not a task.*allowed: copy, repeat_copy"),
    ({"task": {"bits": 3}}, [], r"task.name is required"),
    ({"task": {"name": "copy", "min_length": 5, "max_length": 3}}, [], r"min_length = 5 is larger than max_length = 3"),
    ({"task": {"name": "copy", "num_bits": 3}}, [], r"unknown key task.num_bits"),
    ({"task": {"name": "copy"}}, ["train.lr"], r"--set 'train.lr': expected section.key=value"),
    ({"task": {"name": "copy"}}, ["lr=1"], r"--set 'lr=1': the key must be section.key"),
    ({"task": {"name": "copy"}}, ["trian.lr=1"], r"unknown section 'trian' \(did you mean 'train'\?\)"),
    ({"task": {"name": "copy"}}, ["train.steps=[1, 2]"], r"expected a single value"),
    ({"task": {"name": "copy"}}, ["train.steps=ten"], r"--set train.steps=ten: train.steps = 'ten': expected an integer"),
    ([1, 2], [], r"c.yaml: expected a mapping with sections"),
])
def test_bad_values_name_source_key_value_and_what_is_allowed(raw, overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        config_from_dict(raw, source="c.yaml", overrides=overrides)
    assert info.value.exit_code == 2


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"config file '.*nope.yaml' not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("task:\n  name: copy\n  bits: [8\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: malformed YAML at line \d+, column \d+"):
        load_config(bad)
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text("task: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="malformed YAML"):  # safe_load refuses Python tags
        load_config(unsafe)


def test_model_section_matches_the_dnc_constructor():
    import dataclasses
    import inspect

    from dnc_lab import DNC
    from dnc_lab.config import MODEL_KEYS_SET_BY_RUNNER, ModelConfig

    keywords = set(inspect.signature(DNC.__init__).parameters) - {"self"}
    schema = {f.name for f in dataclasses.fields(ModelConfig)}
    assert schema | set(MODEL_KEYS_SET_BY_RUNNER) == keywords


def test_backend_and_its_earlier_alias(tmp_path):
    base = {"task": {"name": "copy"}, "model": {"native": True, "backend": "reference"}}
    with pytest.raises(ConfigError, match="model.native = true means backend: native, but model.backend = reference"):
        config_from_dict(base)
    assert config_from_dict({"task": {"name": "copy"}, "model": {"native": True}}).model.backend == "auto"
    with pytest.raises(ConfigError, match="model.backend = 'gpu': expected one of 'auto', 'reference', 'native', 'triton'"):
        config_from_dict({"task": {"name": "copy"}, "model": {"backend": "gpu"}})


def test_removed_model_keys_pass_when_off_and_say_why_when_on():
    old_run = {"task": {"name": "copy"}, "model": {"fused_link": 0, "compile_step": False, "native": True}}
    assert config_from_dict(old_run).model.native is True
    with pytest.raises(ConfigError, match="model.fused_link = 4 no longer exists: the native backend"):
        config_from_dict({"task": {"name": "copy"}, "model": {"fused_link": 4}})
