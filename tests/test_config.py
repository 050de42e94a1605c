"""Configs: defaults, presets, overrides, and errors that name the key; the CLI's exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from apr import cli
from apr.config import ConfigError, apply_override, dump, from_dict, load
from apr.stages.datagen import (
    SECTION,
    AprSolverConfig,
    DatagenConfig,
    ProblemsConfig,
    SosSolverConfig,
)
from apr.stages.grpo import GRPOConfig

CONFIGS = Path(__file__).resolve().parent.parent / "apr" / "presets"


def load_datagen(*overrides: str, path=None) -> DatagenConfig:
    return load(DatagenConfig, path, SECTION, list(overrides))


def error(*overrides: str, path=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_datagen(*overrides, path=path)
    return str(info.value)


def test_defaults_are_the_papers():
    config = load(DatagenConfig, None, "datagen")
    assert config == DatagenConfig()
    assert config.problems == ProblemsConfig()
    p = config.problems
    assert (p.n_numbers, p.num_min, p.num_max, p.target_min, p.target_max) == (4, 1, 99, 10, 100)
    assert (config.apr.beam_min, config.apr.beam_max, config.apr.sub_beam_max) == (1, 10, 15)
    assert (config.apr.promising_threshold, config.apr.heuristic) == (0.9, "mult")
    assert (config.sos.beam_min, config.sos.beam_max, config.sos.promising_threshold) == (1, 5, 0.5)


PRESETS = sorted(CONFIGS.glob("*.yaml"))


@pytest.mark.skipif(not PRESETS, reason="configs/ holds no presets yet")
@pytest.mark.parametrize("path", PRESETS, ids=[p.name for p in PRESETS])
def test_every_preset_has_a_datagen_section_that_loads(path):
    document = yaml.safe_load(path.read_text())
    assert isinstance(document, dict) and isinstance(document.get(SECTION), dict), path
    assert isinstance(load_datagen(path=path), DatagenConfig)


def test_overrides_and_presets(tmp_path):
    config = load_datagen("problems.train_size=1000", "apr.promising_threshold=1",
                          "sos.heuristic=sum", "compression=gzip", "apr.budget_prefix=true")
    assert config.problems.train_size == 1000
    assert config.apr.promising_threshold == 1.0 and type(config.apr.promising_threshold) is float
    assert config.sos.heuristic == "sum" and config.compression == "gzip"
    assert config.apr.budget_prefix is True
    preset = tmp_path / "preset.yaml"
    preset.write_text("datagen:\n  problems:\n    train_size: 50\n    seed: 3\n  workers: 1\n"
                      "sft:\n  anything: 1\n")
    config = load_datagen("problems.seed=4", path=preset)
    assert (config.problems.train_size, config.problems.seed, config.workers) == (50, 4, 1)
    # a file without the section gives the defaults
    other = tmp_path / "other.yaml"
    other.write_text("sft:\n  lr: 1\n")
    assert load_datagen(path=other) == DatagenConfig()


def test_dump_loads_back(tmp_path):
    config = load_datagen("problems.train_size=7", "apr.heuristic=sum", "sos.beam_max=3")
    path = tmp_path / "config.yaml"
    path.write_text(dump(config, SECTION))
    assert load_datagen(path=path) == config


def test_out_of_range_names_the_key_and_range():
    message = error("problems.n_numbers=7")
    assert "datagen.problems.n_numbers" in message and "2" in message and "6" in message
    message = error("problems.n_numbers=1")
    assert "datagen.problems.n_numbers" in message


def test_empty_ranges_name_the_key():
    message = error("problems.target_min=50", "problems.target_max=20")
    assert "datagen.problems.target_max" in message and "empty" in message
    message = error("problems.num_min=50", "problems.num_max=20")
    assert "datagen.problems.num_max" in message and "empty" in message


@pytest.mark.parametrize("key", ["train_size", "val_size", "test_size"])
def test_negative_sizes(key):
    message = error(f"problems.{key}=-1")
    assert f"datagen.problems.{key}" in message and ">= 0" in message


def test_unknown_key():
    message = error("problems.foo=1")
    assert "foo" in message and "unknown key" in message and "datagen.problems.foo" in message
    message = error("bogus=1")
    assert "datagen.bogus" in message and "unknown key" in message


def test_wrong_types():
    message = error("problems.seed=abc")
    assert "datagen.problems.seed" in message and "expected an integer" in message
    assert "expected an integer" in error("problems.seed=1.5")
    assert "expected an integer" in error("problems.seed=true")
    assert "expected a number" in error("apr.promising_threshold=high")
    assert "expected true or false" in error("apr.budget_prefix=3")
    assert "expected a string" in error("sos.heuristic=3")
    assert "expected a mapping" in error("problems=3")


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "nan", "inf", "1e999"])
def test_nan_and_infinity_are_refused_before_any_range_check(value):
    """NaN compares false with every bound, so a range check alone would let it through."""
    assert "expected a finite number" in error(f"apr.promising_threshold={value}")
    with pytest.raises(ConfigError, match="lr: expected a finite number"):
        from_dict(GRPOConfig, {"lr": float(value.lstrip(".").replace("-.", "-"))}, "grpo")


def test_bad_choices_list_the_choices():
    message = error("apr.heuristic=bogus")
    assert "datagen.apr.heuristic" in message and "'mult'" in message and "'sum'" in message
    message = error("compression=zip")
    assert "datagen.compression" in message and "'none'" in message and "'gzip'" in message


def test_cross_field_checks():
    assert "datagen.shard_size" in error("shard_size=25", "chunk_size=10")
    assert "datagen.apr.sub_beam_max" in error("apr.sub_beam_max=5")
    assert "datagen.apr.beam_max" in error("apr.beam_min=4", "apr.beam_max=3")
    assert "datagen.sos.promising_threshold" in error("sos.promising_threshold=1.5")
    assert "datagen.workers" in error("workers=-1")


def test_missing_or_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="neither a file nor a preset"):
        load_datagen(path=tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError):
        load_datagen(path=bad)
    bad.write_text("datagen: 3\n")
    with pytest.raises(ConfigError):
        load_datagen(path=bad)


def test_malformed_overrides():
    with pytest.raises(ConfigError, match="key=value"):
        apply_override({}, "problems.seed")
    with pytest.raises(ConfigError, match="not a section"):
        apply_override({"problems": 3}, "problems.seed=1")
    data: dict = {}
    apply_override(data, "a.b.c=0.5")
    assert data == {"a": {"b": {"c": 0.5}}}


def test_solver_configs_draw_within_their_ranges():
    import random

    rng = random.Random(0)
    for _ in range(200):
        a = AprSolverConfig().draw(rng)
        assert 1 <= a.beam_size <= 10 and a.beam_size <= a.sub_beam_size <= 15
        s = SosSolverConfig().draw(rng)
        assert 1 <= s.beam_size <= 5 and s.sub_beam_size == 0


def test_cli_rejects_a_bad_config_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "data"
    assert cli.main(["datagen", "--out", str(out), "--set", "problems.n_numbers=9"]) == 2
    assert not out.exists() and not (tmp_path / "data.partial").exists()
    assert list(tmp_path.iterdir()) == []
    assert "datagen.problems.n_numbers" in capsys.readouterr().err
    assert cli.main(["datagen", "--out", str(out), "--config", str(tmp_path / "x.yaml")]) == 2
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_an_existing_out(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    assert cli.main(["datagen", "--out", str(out), "--no-progress"]) == 2
    assert list(out.iterdir()) == []


def test_cli_runs_datagen(tmp_path, capsys):
    out = tmp_path / "data"
    code = cli.main(["datagen", "--out", str(out), "--no-progress", "--set", "workers=1",
                     "--set", "problems.train_size=10", "--set", "problems.val_size=5",
                     "--set", "problems.test_size=5", "--set", "chunk_size=5",
                     "--set", "shard_size=10"])
    assert code == 0
    assert (out / "stats.json").is_file() and (out / "problems" / "train.jsonl").is_file()
    assert "problems" in capsys.readouterr().out


# --- every stage's keys: docs, presets, `apr config show` ---------------------------------
def stage_configs() -> dict[str, tuple[type, str]]:
    """stage -> (config class, section), as `apr config show` finds them."""
    import importlib

    out = {}
    for stage, (module_name, class_name) in cli.CONFIGS.items():
        module = importlib.import_module(module_name)
        out[stage] = (getattr(module, class_name), module.SECTION)
    return out


def test_config_show_knows_every_stage():
    assert set(cli.CONFIGS) == {"datagen", "sft", "grpo", "evaluate"}
    assert {stage: section for stage, (_, section) in stage_configs().items()} == {
        s: s for s in cli.CONFIGS}


def undocumented(cls: type, prefix: str = "") -> list[str]:
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    missing = []
    for f in dataclasses.fields(cls):
        doc = f.metadata.get("doc")
        if not isinstance(doc, str) or not doc.strip():
            missing.append(prefix + f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            missing += undocumented(hints[f.name], f"{prefix}{f.name}.")
    return missing


@pytest.mark.parametrize("stage", ["datagen", "sft", "grpo", "evaluate"])
def test_every_config_field_has_a_doc(stage):
    cls, _ = stage_configs()[stage]
    assert undocumented(cls) == [], f"{cls.__name__}: fields without option(..., doc)"


def test_config_keys_flatten_nested_configs_with_types_and_docs():
    from apr.config import config_keys

    keys = {k.name: k for k in config_keys(DatagenConfig)}
    assert "problems" not in keys and "apr" not in keys
    key = keys["problems.train_size"]
    assert (key.type, key.value) == ("int", 500_000) and key.doc
    assert keys["apr.promising_threshold"].type == "float"
    assert keys["compression"].value == "none"
    loaded = {k.name: k.value for k in config_keys(load_datagen("problems.train_size=7"))}
    assert loaded["problems.train_size"] == 7


def flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def test_every_preset_loads_every_stage():
    from apr.config import preset_path, presets, to_dict

    names = presets()
    assert {"local", "gpu-small", "paper"} <= set(names)
    configs = stage_configs()
    for name in names:
        document = yaml.safe_load(preset_path(name).read_text())
        unknown = set(document) - set(configs)
        assert not unknown, f"preset {name}: sections the code does not know: {sorted(unknown)}"
        for stage, (cls, section) in configs.items():
            assert isinstance(document.get(section), dict), f"preset {name} has no {section}:"
            config = load(cls, name, section)  # unknown keys and bad values raise ConfigError
            assert isinstance(config, cls)
            config.validate()
            loaded = flatten(to_dict(config))
            for key, value in flatten(document[section]).items():
                assert loaded[key] == value, f"preset {name}: {section}.{key}"


@pytest.mark.parametrize("stage", ["datagen", "sft", "grpo", "evaluate"])
def test_shown_values_paste_back_into_set(stage):
    from apr.config import config_keys, format_value

    cls, section = stage_configs()[stage]
    config = load(cls, "paper", section)
    overrides = [f"{k.name}={format_value(k.value)}" for k in config_keys(config)]
    assert load(cls, None, section, overrides) == config


def show_lines(capsys, *argv: str) -> dict[str, str]:
    import re

    assert cli.main(["config", "show", *argv]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines
    # aligned: the value column and the doc column start at the same place on every line
    assert len({re.match(r"\S+ +", line).end() for line in lines}) == 1
    assert len({line.index("  # ") for line in lines}) == 1
    return {line.split()[0]: line for line in lines}


def test_cli_config_show_prints_keys_values_and_docs(capsys):
    import re

    from apr.config import config_keys, format_value
    from apr.stages.sft import SFTConfig

    lines = show_lines(capsys, "sft", "--config", "local")
    config = load(SFTConfig, "local", "sft")
    assert list(lines) == [k.name for k in config_keys(SFTConfig)]
    for key in config_keys(config):
        assert re.fullmatch(rf"{re.escape(key.name)} +{re.escape(format_value(key.value))} +"
                            rf"# {re.escape(key.doc)}", lines[key.name]), lines[key.name]
    assert lines["shape"].split()[1] == "tiny" and lines["max_steps"].split()[1] == "40"
    lines = show_lines(capsys, "sft", "--config", "local", "--set", "shape=small")
    assert lines["shape"].split()[1] == "small" and lines["max_steps"].split()[1] == "40"
    # without --config: the defaults; nested keys are dotted
    assert show_lines(capsys, "sft")["shape"].split()[1] == "paper"
    assert show_lines(capsys, "datagen")["problems.train_size"].split()[1] == "500000"


def test_cli_config_show_rejects_a_bad_value(capsys):
    assert cli.main(["config", "show", "sft", "--set", "shape=huge"]) == 2
    err = capsys.readouterr().err
    assert "sft.shape" in err and "'tiny'" in err


@pytest.mark.parametrize("stage", ["datagen", "sft", "grpo", "evaluate"])
def test_stage_help_points_to_config_show(stage, capsys):
    with pytest.raises(SystemExit):
        cli.main([stage, "--help"])
    assert f"keys: apr config show {stage}" in capsys.readouterr().out


def test_yaml_syntax_errors_name_the_file_or_key(tmp_path, capsys):
    from apr.stages.sft import SFTConfig

    bad = tmp_path / "bad.yaml"
    bad.write_text("sft:\n  shape: tiny\n  lr: [1.0e-3\n")
    with pytest.raises(ConfigError) as info:
        load(SFTConfig, bad, "sft")
    assert str(bad) in str(info.value) and "YAML" in str(info.value) and "line" in str(info.value)
    # the CLI prints the message, not a traceback
    assert cli.main(["config", "show", "sft", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "Traceback" not in err
    with pytest.raises(ConfigError) as info:
        load(SFTConfig, None, "sft", ["lr=[1e-3"])
    assert "lr" in str(info.value) and "YAML" in str(info.value)
    assert cli.main(["sft", "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                     "--set", "shape=a: b: c"]) == 2
    err = capsys.readouterr().err
    assert "shape" in err and "YAML" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
