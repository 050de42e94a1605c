"""Log, don't print: only `apr`'s main configures logging, from `--log-level`; the library
and the servers only log, and a server logs the traceback of every 5xx it answers."""

from __future__ import annotations

import ast
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from apr import cli
from apr.decode import engine_server

ROOT = Path(__file__).resolve().parents[1]
CONFIGURING = {"basicConfig", "dictConfig", "fileConfig", "addHandler", "setLevel",
               "removeHandler"}


def library_calls():
    """(module path, call node) for every call in apr/ but the CLI."""
    for path in sorted((ROOT / "apr").rglob("*.py")):
        if path == ROOT / "apr" / "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                yield path.relative_to(ROOT), node


def called_name(node: ast.Call) -> str:
    func = node.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def test_only_the_cli_configures_logging():
    found = [f"{path}:{node.lineno} {called_name(node)}" for path, node in library_calls()
             if called_name(node) in CONFIGURING]
    assert found == []


def test_the_library_prints_no_status_to_stderr():
    found = [f"{path}:{node.lineno}" for path, node in library_calls()
             if called_name(node) == "print" and any(
                 k.arg == "file" and ast.unparse(k.value) == "sys.stderr" for k in node.keywords)]
    assert found == []


def test_uvicorn_is_never_left_to_configure_logging():
    runs = [(path, node) for path, node in library_calls()
            if ast.unparse(node.func) in ("uvicorn.run", "uvicorn.Config")]
    assert len(runs) >= 2  # apr serve, apr engine serve
    for path, node in runs:
        keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
        assert keywords.get("log_config") == "None", f"{path}:{node.lineno}"
        assert keywords.get("log_level", "None") == "None", f"{path}:{node.lineno}"


PROBE = """
import logging, sys
from apr import cli
cli.main(sys.argv[1:])
for name in ("apr.probe", "httpx", "uvicorn.error", "uvicorn.access"):
    for level in ("debug", "info", "warning", "error"):
        getattr(logging.getLogger(name), level)(f"{name} {level}")
"""


COMMAND = ("config", "show", "datagen")


def probe(*argv: str) -> tuple[str, set[str]]:
    """The messages that reached stderr (`name level`) after `apr *argv`."""
    argv = argv if any(a in COMMAND for a in argv) else (*argv, *COMMAND)
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stderr, set(re.findall(r" (?:DEBUG|INFO|WARNING|ERROR) \S+: (\S+ \w+)$",
                                       done.stderr, re.MULTILINE))


@pytest.mark.slow
def test_log_level_sets_what_reaches_stderr_and_the_format():
    stderr, info = probe()  # the default is info
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO apr\.probe: apr\.probe info$",
                     stderr, re.MULTILINE), stderr
    assert {"apr.probe info", "apr.probe warning", "uvicorn.error info"} <= info
    assert "apr.probe debug" not in info
    # A line per HTTP request (the engine client's, uvicorn's access log) only at debug:
    assert {"httpx info", "uvicorn.access info"}.isdisjoint(info)
    assert "uvicorn.access warning" in info
    _, warning = probe("--log-level", "warning")
    assert {"apr.probe warning", "apr.probe error", "uvicorn.error warning"} <= warning
    assert {"apr.probe info", "uvicorn.error info"}.isdisjoint(warning)
    _, debug = probe("--log-level", "debug")
    assert {"apr.probe debug", "httpx info", "uvicorn.access info"} <= debug
    _, error = probe("--log-level", "error")
    assert {m.split()[1] for m in error} == {"error"}


@pytest.mark.slow
def test_log_level_may_also_follow_the_command():
    # As the chart's `server.extraArgs` give it: `apr serve ... --log-level debug`.
    _, after = probe(*COMMAND, "--log-level", "warning")
    assert "apr.probe warning" in after and "apr.probe info" not in after
    _, overridden = probe("--log-level", "error", *COMMAND, "--log-level", "debug")
    assert "apr.probe debug" in overridden
    _, kept = probe("--log-level", "error", *COMMAND)  # not given after: the first stands
    assert "apr.probe warning" not in kept


def test_an_unknown_log_level_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--log-level", "loud", "config", "show", "datagen"])
    assert exit_.value.code == 2 and "--log-level" in capsys.readouterr().err


class Broken:
    weight_version = "0"

    async def generate(self, prompts, sampling):
        raise IndexError("/models/secret/run-7 shard 3")

    async def ready(self):
        return True


def test_the_engine_server_answers_a_failure_with_a_clean_500_and_logs_it(caplog):
    client = TestClient(engine_server.create_app(Broken(), "/models/secret/run-7"))
    with caplog.at_level(logging.ERROR, logger="apr.decode.engine_server"):
        answer = client.post("/generate", json={"text": "1 2", "sampling_params": {}})
    assert answer.status_code == 500
    assert answer.json() == {"error": "internal error", "kind": "internal"}
    assert "IndexError" not in answer.text and "secret" not in answer.text
    (record,) = [r for r in caplog.records if r.name == "apr.decode.engine_server"]
    assert record.levelno == logging.ERROR and record.exc_info is not None
    assert "/generate" in record.getMessage()
    assert "Traceback" in caplog.text and "IndexError" in caplog.text
    # the server is up, and its health check, which generates a token, says the engine is not
    assert client.get("/model_info").status_code == 200
    assert client.get("/health").status_code == 503
