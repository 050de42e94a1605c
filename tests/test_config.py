"""Configs: defaults, presets, overrides, and errors that name the key; the CLI's exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from apr import cli
from apr.config import ConfigError, apply_override, dump, load
from apr.stages.datagen import (
    SECTION,
    AprSolverConfig,
    DatagenConfig,
    ProblemsConfig,
    SosSolverConfig,
)

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
