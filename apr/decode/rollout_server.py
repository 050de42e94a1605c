"""The rollout sidecar outside a cluster: a generation server this process starts and stops.

GRPO decodes its rollouts over HTTP in a separate server process, as it does in the cluster
(where SGLang is a native sidecar of the Job's pod). Here the trainer starts that process
itself: SGLang when it is installed and a GPU is present, else `apr engine serve` (the same
HTTP subset over the local engine). The server is stopped when the trainer exits, also on an
error or SIGTERM, and dies with its parent even on SIGKILL (Linux's parent-death signal).

SGLang pins its own torch and transformers, so it usually lives in an environment of its own
(`make sglang` builds one that runs on a CPU): its interpreter is `python=`, else
$APR_SGLANG_PYTHON, else this one. On a CPU the server gets SGLang's CPU engine, float32 (the
trainer's dtype, so log-probs compare) and a bounded KV cache.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from apr.decode.sglang import HEALTH
from apr.ports import free_port

ENGINE_SERVE = "engine-serve"  # `apr engine serve`: SGLang's API over the local engine
KINDS = ("auto", "sglang", ENGINE_SERVE)
SGLANG_PYTHON_ENV = "APR_SGLANG_PYTHON"  # the interpreter of SGLang's environment
MAKE_SGLANG_PYTHON = ".venv-sglang/bin/sglang-python"  # what `make sglang` builds (repo-relative)
# SGLang sizes its KV cache from free memory: on a CPU that is most of the machine's RAM.
CPU_KV_TOKENS = 32_768


class RolloutServerError(RuntimeError):
    """The rollout server did not come up, or died: says why and where its log is."""


def resolve_kind(kind: str) -> str:
    if kind != "auto":
        return kind
    import torch

    has_sglang = (importlib.util.find_spec("sglang") is not None
                  or bool(os.environ.get(SGLANG_PYTHON_ENV)))
    return "sglang" if has_sglang and torch.cuda.is_available() else ENGINE_SERVE


def sglang_python(python: str = "") -> str:
    """The interpreter that starts SGLang: the one given, $APR_SGLANG_PYTHON, or this one."""
    return python or os.environ.get(SGLANG_PYTHON_ENV) or sys.executable


def on_cpu(device: str) -> bool:
    if device != "auto":
        return device == "cpu"
    import torch

    return not torch.cuda.is_available()


def sglang_cpu_args() -> list[str]:
    """SGLang's flags for a machine without a GPU (its CPU engine is chosen by the
    SGLANG_USE_CPU_ENGINE variable, which `server_env` sets)."""
    return ["--device", "cpu", "--dtype", "float32", "--max-total-tokens", str(CPU_KV_TOKENS)]


def server_command(kind: str, model_dir: str | Path, port: int, device: str = "auto",
                   extra: tuple[str, ...] = (), python: str = "") -> list[str]:
    """The command line of the server; both start on weight version "0", the model given."""
    if kind == "sglang":
        return [sglang_python(python), "-m", "sglang.launch_server",
                "--model-path", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
                "--allow-auto-truncate", "--weight-version", "0",
                *(sglang_cpu_args() if on_cpu(device) else []), *extra]
    return [sys.executable, "-m", "apr.cli", "engine", "serve", "--model", str(model_dir),
            "--host", "127.0.0.1", "--port", str(port), "--device", device,
            "--weight-version", "0", *extra]


def server_env(kind: str, device: str = "auto") -> dict[str, str]:
    env = dict(os.environ)
    if kind == "sglang" and on_cpu(device):
        env["SGLANG_USE_CPU_ENGINE"] = "1"
    return env


def _die_with_parent():
    """A function for the child to run between fork and exec that asks the kernel to SIGTERM
    it when this process dies (PR_SET_PDEATHSIG). libc is looked up here, in the parent: after
    a fork of a threaded process the child should do as little as possible."""
    try:
        import ctypes

        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGTERM)


class RolloutServer:
    """`with RolloutServer(model_dir, log_path) as server:` ... `server.url` ... (stopped after)."""

    def __init__(self, model_dir: str | Path, log_path: str | Path, kind: str = "auto",
                 port: int = 0, device: str = "auto", startup_timeout_s: float = 600.0,
                 extra_args: tuple[str, ...] = (), python: str = ""):
        if kind not in KINDS:
            raise ValueError(f"sidecar kind {kind!r}: choose one of {KINDS}")
        self.kind = resolve_kind(kind)
        self.port = port or free_port()
        self.command = server_command(self.kind, model_dir, self.port, device, extra_args,
                                      python)
        self.env = server_env(self.kind, device)
        self.log_path = Path(log_path)
        self.startup_timeout_s = startup_timeout_s
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> RolloutServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=self.env,
                                            start_new_session=True,
                                            preexec_fn=_die_with_parent())
        deadline = time.monotonic() + self.startup_timeout_s
        try:
            while time.monotonic() < deadline:
                self.check_alive()
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(self.url + HEALTH, timeout=2.0).status_code == 200:
                        return self
                time.sleep(0.25)
        except BaseException:  # an interrupt or SIGTERM while waiting: no server left behind
            self.stop()
            raise
        self.stop()
        raise RolloutServerError(f"the {self.kind} rollout server did not answer {HEALTH} within "
                           f"{self.startup_timeout_s:.0f} s (raise sidecar_startup_s if the "
                           f"model is large){self._log_tail()}")

    def check_alive(self) -> None:
        """Raise when the server process has exited."""
        if self.process is not None and self.process.poll() is not None:
            code = self.process.returncode
            raise RolloutServerError(f"the {self.kind} rollout server exited with code {code}"
                               f"{self._log_tail()}")

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM to the server's whole process group (SGLang's scheduler and detokenizer are
        its children, and may outlive it), SIGKILL after `grace_s`."""
        if self.process is None:
            return
        process, self.process = self.process, None  # once: the group id is not ours after
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # whatever of the group is still there
        process.wait()

    def _log_tail(self, lines: int = 20) -> str:
        try:
            tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return f" (no log at {self.log_path})"
        return f"; its log ({self.log_path}) ends:\n" + "\n".join(tail)

    def __enter__(self) -> RolloutServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
