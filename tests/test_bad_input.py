"""Every entry point, fed what a user gets wrong: each case must end in one clear line on
stderr (`apr <stage>: error: ...`, or argparse's usage error) and a non-zero exit, never a
traceback, a hang, or a run on wrong data. Table-driven: a new bad input is one row."""

from __future__ import annotations

import gzip
import itertools
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from conftest import make_dataset

from apr import cli
from apr.storage import MANIFEST


@dataclass(frozen=True)
class Good:
    """Valid inputs the cases spoil a copy of."""

    data: Path  # an `apr datagen` output
    model: Path  # a saved tiny model
    problems: Path  # a problems JSONL
    tmp: Path  # the case's own scratch directory

    def copy(self, what: Path) -> Path:
        target = self.tmp / f"copy-{what.name}"
        shutil.copytree(what, target)
        return target


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    from apr import model as model_lib

    root = tmp_path_factory.mktemp("good")
    data = make_dataset(root / "data", train=20, val=10, seed=3, n_numbers=3)
    model = model_lib.save(model_lib.build("tiny", context=256), root / "model")
    return data, model


@pytest.fixture
def good(inputs, tmp_path) -> Good:
    data, model = inputs
    return Good(data, model, data / "problems" / "val.jsonl", tmp_path)


def _file_in_the_way(g: Good) -> Path:
    """An output path under a regular file: no directory can be made there."""
    blocker = g.tmp / "a-file"
    blocker.write_text("not a directory\n")
    return blocker / "out"


def _problems_with(g: Good, *lines: str, name: str = "problems.jsonl") -> Path:
    path = g.tmp / name
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _truncated_gz(g: Good) -> Path:
    path = g.tmp / "problems.jsonl.gz"
    blob = gzip.compress(g.problems.read_bytes())
    path.write_bytes(blob[:40])  # the first problem is cut short
    return path


def _model_with(g: Good, spoil: Callable[[Path], None]) -> Path:
    model = g.copy(g.model)
    spoil(model)
    return model


def _truncate_weights(model: Path) -> None:
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def _empty_weights(model: Path) -> None:
    (model / "model.safetensors").write_bytes(b"")


def _no_weights(model: Path) -> None:
    (model / "model.safetensors").unlink()


def _bad_config(model: Path) -> None:
    (model / "config.json").write_text('{"model_type": "llama", "hidden_size": ')


def _no_tokenizer(model: Path) -> None:
    (model / "tokenizer.json").unlink()


def _bad_tokenizer(model: Path) -> None:
    (model / "tokenizer.json").write_text('{"version": "1.0", "model": ')


def _data_with(g: Good, spoil: Callable[[Path], None]) -> Path:
    data = g.copy(g.data)
    spoil(data)
    return data


def _truncate_traces(data: Path) -> None:
    for shard in (data / "traces" / "apr").glob("train-*.jsonl"):
        text = shard.read_text()
        shard.write_text(text[: len(text) // 2])


def _as_part(data: Path) -> None:
    (data / "part.json").write_text('{"index": 0, "count": 2}')


def _bad_data_tokenizer(data: Path) -> None:
    (data / "tokenizer" / "tokenizer.json").write_text("{")


def _killed_run(g: Good) -> Path:
    """A run directory a kill left behind: a complete checkpoint, no model yet."""
    run = g.tmp / "run"
    (run / "checkpoints" / "step-0000002").mkdir(parents=True)
    (run / "checkpoints" / "step-0000002" / "trainer.json").write_text('{"step": 2}')
    (run / "config.yaml").write_text("the earlier run's\n")
    return run


def _yaml_file(g: Good, text: str) -> str:
    path = g.tmp / "config.yaml"
    path.write_text(text)
    return str(path)


def _unrelated_dir(g: Good) -> Path:
    """A directory the command did not write (somebody's notes): never to be deleted."""
    notes = g.tmp / "notes"
    notes.mkdir()
    (notes / "README.md").write_text("mine\n")
    return notes


def _bad_manifest(g: Good) -> Path:
    version = g.tmp / "store" / "models" / "m" / "v1"
    version.mkdir(parents=True)
    (version / MANIFEST).write_text('{"files": ')
    return version


DATAGEN = ["datagen", "--no-progress", "--config", "local"]
GRPO = ["grpo", "--no-progress", "--config", "local", "--set", "steps=1"]
SFT = ["sft", "--no-progress", "--config", "local", "--set", "max_steps=1"]
def _published(g: Good) -> Path:
    from apr.stages import publish

    return Path(publish.run(g.model, str(g.tmp / "store"), "m", "v1"))


def _evaluation(g: Good) -> Path:
    """A finished `apr evaluate` output (metrics only: what compare reads)."""
    out = g.tmp / "evaluation"
    if not out.is_dir():
        assert cli.main([*EVAL, "--model", str(g.model), "--problems", str(g.problems),
                         "--out", str(out)]) == 0
    return out


EVAL = ["evaluate", "--no-progress", "--set", "modes=[apr]", "--set", "max_problems=2",
        "--set", "context=128", "--set", "context_limits=[128]", "--set", "total_token_limits=[256]"]

# id -> argv built from the good inputs; each must fail cleanly.
CASES: dict[str, Callable[[Good], list[str]]] = {
    # config and arguments
    "datagen: --config file with a YAML syntax error": lambda g: [
        "datagen", "--config", _yaml_file(g, "problems: {train_size: 10\n"), "--out", str(g.tmp / "o")],
    "datagen: --set value with a YAML syntax error": lambda g: [
        *DATAGEN, "--set", "problems.train_size=[1,", "--out", str(g.tmp / "o")],
    "datagen: --set without =": lambda g: [*DATAGEN, "--set", "noequals", "--out", str(g.tmp / "o")],
    "datagen: unknown preset": lambda g: ["datagen", "--config", "no-such-preset", "--out", str(g.tmp / "o")],
    "datagen: a train split too big for memory": lambda g: [
        *DATAGEN, "--set", "problems.train_size=1000000000000", "--out", str(g.tmp / "o")],
    "datagen: more problems than memory holds": lambda g: [
        *DATAGEN, "--set", "problems.n_numbers=6", "--set", "problems.num_max=10000",
        "--set", "problems.train_size=100000000000", "--out", str(g.tmp / "o")],
    "datagen: output under a file": lambda g: [*DATAGEN, "--out", str(_file_in_the_way(g))],
    "datagen: output is a directory it did not write": lambda g: [*DATAGEN, "--out", str(_unrelated_dir(g))],
    "datagen: --part not I/N": lambda g: [*DATAGEN, "--part", "2", "--out", str(g.tmp / "o")],
    "datagen: --part index past the count": lambda g: [*DATAGEN, "--part", "4/4", "--out", str(g.tmp / "o")],
    "datagen-merge: a complete dataset, not a part": lambda g: [
        "datagen-merge", str(g.data), "--out", str(g.tmp / "o")],
    "datagen-merge: a directory that is not there": lambda g: [
        "datagen-merge", str(g.tmp / "none"), "--out", str(g.tmp / "o")],
    "sft: --mirror not an s3:// URI": lambda g: [
        *SFT, "--data", str(g.data), "--mirror", "s3:/bucket", "--out", str(g.tmp / "o")],
    "sft: one part of a dataset, not merged": lambda g: [
        *SFT, "--data", str(_data_with(g, _as_part)), "--out", str(g.tmp / "o")],
    # sft
    "sft: data directory missing": lambda g: [*SFT, "--data", str(g.tmp / "none"), "--out", str(g.tmp / "o")],
    "sft: truncated trace shard": lambda g: [
        *SFT, "--data", str(_data_with(g, _truncate_traces)), "--out", str(g.tmp / "o")],
    "sft: corrupt tokenizer.json in the data": lambda g: [
        *SFT, "--data", str(_data_with(g, _bad_data_tokenizer)), "--out", str(g.tmp / "o")],
    "sft: a batch too big for memory": lambda g: [
        *SFT, "--data", str(g.data), "--set", "tokens_per_batch=1000000000000000", "--out", str(g.tmp / "o")],
    "sft: infinite learning rate": lambda g: [
        *SFT, "--data", str(g.data), "--set", "lr=.inf", "--out", str(g.tmp / "o")],
    "sft: an earlier run's checkpoints, no --resume": lambda g: [
        *SFT, "--data", str(g.data), "--out", str(_killed_run(g))],
    "sft: output under a file": lambda g: [*SFT, "--data", str(g.data), "--out", str(_file_in_the_way(g))],
    # evaluate
    "evaluate: model directory missing": lambda g: [
        *EVAL, "--model", str(g.tmp / "none"), "--problems", str(g.problems), "--out", str(g.tmp / "o")],
    "evaluate: truncated weights": lambda g: [
        *EVAL, "--model", str(_model_with(g, _truncate_weights)), "--problems", str(g.problems),
        "--out", str(g.tmp / "o")],
    "evaluate: empty weights": lambda g: [
        *EVAL, "--model", str(_model_with(g, _empty_weights)), "--problems", str(g.problems),
        "--out", str(g.tmp / "o")],
    "evaluate: no weights": lambda g: [
        *EVAL, "--model", str(_model_with(g, _no_weights)), "--problems", str(g.problems),
        "--out", str(g.tmp / "o")],
    "evaluate: corrupt config.json": lambda g: [
        *EVAL, "--model", str(_model_with(g, _bad_config)), "--problems", str(g.problems),
        "--out", str(g.tmp / "o")],
    "evaluate: no tokenizer.json": lambda g: [
        *EVAL, "--model", str(_model_with(g, _no_tokenizer)), "--problems", str(g.problems),
        "--out", str(g.tmp / "o")],
    "evaluate: corrupt tokenizer.json": lambda g: [
        *EVAL, "--model", str(_model_with(g, _bad_tokenizer)), "--problems", str(g.problems),
        "--out", str(g.tmp / "o")],
    "evaluate: problems file missing": lambda g: [
        *EVAL, "--model", str(g.model), "--problems", str(g.tmp / "none.jsonl"), "--out", str(g.tmp / "o")],
    "evaluate: truncated problems .jsonl.gz": lambda g: [
        *EVAL, "--model", str(g.model), "--problems", str(_truncated_gz(g)), "--out", str(g.tmp / "o")],
    "evaluate: numbers given as a string": lambda g: [
        *EVAL, "--model", str(g.model), "--problems",
        str(_problems_with(g, '{"nums": "5,50,79", "target": 24}')), "--out", str(g.tmp / "o")],
    "evaluate: target null": lambda g: [
        *EVAL, "--model", str(g.model), "--problems",
        str(_problems_with(g, '{"nums": [5, 50, 79], "target": null}')), "--out", str(g.tmp / "o")],
    "evaluate: a context beyond the model's positions": lambda g: [
        *EVAL, "--set", "context=1000000000", "--model", str(g.model), "--problems", str(g.problems),
        "--out", str(g.tmp / "o")],
    "evaluate: output under a file": lambda g: [
        *EVAL, "--model", str(g.model), "--problems", str(g.problems), "--out", str(_file_in_the_way(g))],
    "evaluate: output is a directory it did not write": lambda g: [
        *EVAL, "--model", str(g.model), "--problems", str(g.problems), "--out", str(_unrelated_dir(g))],
    # grpo
    "grpo: truncated weights": lambda g: [
        *GRPO, "--model", str(_model_with(g, _truncate_weights)),
        "--problems", str(g.data), "--out", str(g.tmp / "o")],
    "grpo: corrupt config.json": lambda g: [
        *GRPO, "--model", str(_model_with(g, _bad_config)),
        "--problems", str(g.data), "--out", str(g.tmp / "o")],
    "grpo: problems missing": lambda g: [
        *GRPO, "--model", str(g.model), "--problems", str(g.tmp / "none"),
        "--out", str(g.tmp / "o")],
    "grpo: an earlier run's checkpoints, no --resume": lambda g: [
        *GRPO, "--model", str(g.model), "--problems", str(g.data), "--out", str(_killed_run(g))],
    "grpo: output under a file": lambda g: [
        *GRPO, "--model", str(g.model), "--problems", str(g.data),
        "--out", str(_file_in_the_way(g))],
    # storage
    "publish: model directory missing": lambda g: [
        "publish", "--model", str(g.tmp / "none"), "--store", str(g.tmp / "store"), "--version", "v1"],
    "publish: truncated weights": lambda g: [
        "publish", "--model", str(_model_with(g, _truncate_weights)), "--store", str(g.tmp / "store"),
        "--version", "v1"],
    "publish: invalid bucket name": lambda g: [
        "publish", "--model", str(g.model), "--store", "s3://Not_A_Bucket", "--version", "v1"],
    "publish: store is not a URI": lambda g: [
        "publish", "--model", str(g.model), "--store", "s3://", "--version", "v1"],
    "publish: output under a file": lambda g: [
        "publish", "--model", str(g.model), "--store", str(_file_in_the_way(g)), "--version", "v1"],
    "pull: corrupt manifest": lambda g: ["pull", "--uri", str(_bad_manifest(g)), "--out", str(g.tmp / "o")],
    "pull: output under a file": lambda g: [
        "pull", "--uri", str(_published(g)), "--out", str(_file_in_the_way(g))],
    "pull: nothing there": lambda g: ["pull", "--uri", str(g.tmp / "none"), "--out", str(g.tmp / "o")],
    "compare: evaluation missing": lambda g: [
        "compare", "--apr", str(g.tmp / "a"), "--sos", str(g.tmp / "s"), "--out", str(g.tmp / "o")],
    "compare: output under a file": lambda g: [
        "compare", "--apr", str(_evaluation(g)), "--sos", str(_evaluation(g)),
        "--out", str(_file_in_the_way(g))],
    "compare: output is a directory it did not write": lambda g: [
        "compare", "--apr", str(_evaluation(g)), "--sos", str(_evaluation(g)),
        "--out", str(_unrelated_dir(g))],
    # pipeline
    "pipeline submit: --arg without =": lambda g: [
        "pipeline", "submit", "--host", "http://127.0.0.1:9", "--arg", "noequals"],
    "pipeline run: unknown preset": lambda g: [
        "pipeline", "run", "--local", "--preset", "no-such-preset", "--workdir", str(g.tmp / "w")],
    # servers: each must refuse before it listens
    "serve: port out of range": lambda g: [
        "serve", "--engine", "local", "--model", str(g.model), "--port", "70000"],
    "serve: no concurrency": lambda g: [
        "serve", "--engine", "local", "--model", str(g.model), "--max-concurrency", "0"],
    "serve: negative queue": lambda g: [
        "serve", "--engine", "local", "--model", str(g.model), "--max-queue", "-1"],
    "serve: zero timeout": lambda g: [
        "serve", "--engine", "local", "--model", str(g.model), "--request-timeout", "0"],
    "serve: negative timeout": lambda g: [
        "serve", "--engine", "local", "--model", str(g.model), "--request-timeout", "-1"],
    "serve: max tokens beyond the model's positions": lambda g: [
        "serve", "--engine", "local", "--model", str(g.model), "--max-tokens", "4096"],
    "serve: truncated weights": lambda g: [
        "serve", "--engine", "local", "--model", str(_model_with(g, _truncate_weights))],
    "serve: no tokenizer.json": lambda g: [
        "serve", "--engine", "local", "--model", str(_model_with(g, _no_tokenizer))],
    "serve: engine URL without a scheme": lambda g: ["serve", "--engine-url", "localhost:30000"],
    "engine serve: unknown device": lambda g: ["engine", "serve", "--model", str(g.model), "--device", "tpu"],
    "engine serve: no rows per batch": lambda g: ["engine", "serve", "--model", str(g.model), "--max-batch", "0"],
    "engine serve: negative port": lambda g: ["engine", "serve", "--model", str(g.model), "--port", "-1"],
    "engine serve: truncated weights": lambda g: [
        "engine", "serve", "--model", str(_model_with(g, _truncate_weights))],
    "engine serve: corrupt config.json": lambda g: [
        "engine", "serve", "--model", str(_model_with(g, _bad_config))],
}


@pytest.fixture(autouse=True)
def never_listen(monkeypatch):
    """A server that got past its checks would block the test: fail it instead."""
    import uvicorn

    def refuse(*args, **kwargs):
        raise AssertionError("the server started: its bad input was not refused")

    monkeypatch.setattr(uvicorn, "run", refuse)


@pytest.mark.slow  # 15 s with its fixtures: CI runs it (`make test`), the minute loop does not
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_with_one_clear_line(case, good, capsys):
    argv = CASES[case](good)
    before = {p: p.read_bytes() for p in good.tmp.rglob("*") if p.is_file()}
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse: usage and one error line
        code = e.code
    err = capsys.readouterr().err
    assert code not in (0, None), f"exit {code}: {err}"
    errors = [line for line in err.splitlines() if ": error:" in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith("apr"), err
    # nothing the command did not write was changed or removed
    for path, content in before.items():
        assert path.is_file() and path.read_bytes() == content, f"{path} changed or removed"


def test_blank_lines_in_jsonl_are_skipped_and_a_cut_line_is_named(tmp_path):
    from apr.dataset import DataError, json_lines

    path = tmp_path / "records.jsonl"
    path.write_text('\n{"a": 1}\n   \n{"a": 2}\n{"a": ')
    lines = json_lines(path)
    assert [value for _, value in itertools.islice(lines, 2)] == [{"a": 1}, {"a": 2}]
    with pytest.raises(DataError, match="line 5: not JSON"):
        next(lines)

