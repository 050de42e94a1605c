"""Shared, cached corpora of seeded problems and solver traces (built once per test session)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import httpx
import pytest
from hypothesis import settings

from apr.countdown.problems import Problem, ProblemSpace, candidates
from apr.countdown.search import (
    HEURISTICS,
    AprTrace,
    SearchParams,
    SosTrace,
    apr_search,
    sos_search,
)
from apr.ports import free_port

# Property tests: modest by default (the suite stays fast); HYPOTHESIS_PROFILE=thorough for more.
settings.register_profile("default", max_examples=100, deadline=None)
settings.register_profile("thorough", max_examples=3000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# Fixed settings spanning the knobs (beam 1..10, sub beam up to 15, every threshold, both
# heuristics); each problem also gets one setting drawn at random from the same ranges.
FIXED_SETTINGS = (
    SearchParams(1, "mult", 0.9, 1),
    SearchParams(4, "sum", 0.5, 9),
    SearchParams(10, "mult", 1.0, 15),
    SearchParams(6, "sum", 0.0, 6),
)
THRESHOLDS = (0.0, 0.5, 0.9, 1.0)


def drawn_setting(rng: random.Random) -> SearchParams:
    beam = rng.randint(1, 10)
    return SearchParams(beam, rng.choice(HEURISTICS), rng.choice(THRESHOLDS),
                        rng.randint(beam, 15))


@lru_cache(maxsize=None)
def problems(seed: int, n: int, space: ProblemSpace = ProblemSpace()) -> tuple[Problem, ...]:
    return tuple(candidates(space, seed, 0, n))


@dataclass(frozen=True)
class Solved:
    """One search of one problem: the problem, the knobs, the trace."""

    problem: Problem
    params: SearchParams
    trace: AprTrace | SosTrace


@lru_cache(maxsize=None)
def corpus(kind: str, seed: int, n: int) -> tuple[Solved, ...]:
    """APR or SoS+ traces of `n` seeded problems under every fixed setting plus a drawn one."""
    search = apr_search if kind == "apr" else sos_search
    out = []
    for p in problems(seed, n):
        knobs = FIXED_SETTINGS + (drawn_setting(random.Random(f"params:{seed}:{p.id}")),)
        for k, params in enumerate(knobs):
            rng = random.Random(f"{kind}:{seed}:{p.id}:{k}")
            out.append(Solved(p, params, search(p.nums, p.target, params, rng)))
    return tuple(out)


def rotate(items: tuple[Solved, ...]) -> tuple[Solved, ...]:
    """One search per problem, cycling through the settings (problem i gets setting i mod 5)."""
    per = len(FIXED_SETTINGS) + 1
    return tuple(x for i, x in enumerate(items) if i % per == (i // per) % per)


@pytest.fixture(scope="session")
def apr_corpus() -> tuple[Solved, ...]:
    return corpus("apr", 11, 300)


@pytest.fixture(scope="session")
def sos_corpus() -> tuple[Solved, ...]:
    return corpus("sos", 11, 300)


@pytest.fixture(scope="session")
def small_apr_corpus() -> tuple[Solved, ...]:
    """~100 problems' worth of traces for the slower per-trace checks (tokenizer)."""
    return rotate(corpus("apr", 11, 300))[:100]


@pytest.fixture(scope="session")
def small_sos_corpus() -> tuple[Solved, ...]:
    return rotate(corpus("sos", 11, 300))[:100]


def make_dataset(out: Path, train: int, val: int, seed: int, chunk: int = 10,
                 n_numbers: int = 4) -> Path:
    """A small `apr datagen` output (no test split), for the stages that read one."""
    from apr.config import from_dict
    from apr.stages import datagen

    config = from_dict(datagen.DatagenConfig, {
        "problems": {"train_size": train, "val_size": val, "test_size": 0, "seed": seed,
                     "n_numbers": n_numbers},
        "workers": 1, "chunk_size": chunk, "shard_size": chunk * max(1, (train + val) // chunk)})
    datagen.run(config, out, progress=False)
    return out


class ServedApp:
    """An ASGI app served by uvicorn on a free loopback port, in a background thread.

    `settings`: more `uvicorn.Config` arguments (e.g. timeout_graceful_shutdown)."""

    def __init__(self, app, port: int = 0, **settings):
        import threading

        import uvicorn

        port = port or free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                                    **{"log_level": "warning", **settings}))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "ServedApp":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def __exit__(self, *exc) -> None:
        self.stop()


S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing-access", "AWS_SECRET_ACCESS_KEY": "testing-secret-value"}


@pytest.fixture(scope="module")
def s3():
    """A real S3-compatible server (moto's standalone server) on loopback: its settings."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            httpx.get(url, timeout=0.5)
            break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("the S3 server did not start")
    from apr.storage import S3Settings

    yield S3Settings.from_env({"S3_ENDPOINT": url, **S3_KEYS})
    proc.terminate()
    proc.wait(timeout=10)


# --- real SGLang ------------------------------------------------------------------------
REPO = Path(__file__).resolve().parent.parent


def sglang_python_or_skip() -> str:
    """The interpreter of the SGLang environment: $APR_SGLANG_PYTHON, else the one `make
    sglang` builds. Without it the SGLang tests skip, or fail with APR_REQUIRE_TOOLS=1 (CI)."""
    from apr.decode.rollout_server import MAKE_SGLANG_PYTHON, SGLANG_PYTHON_ENV

    python = os.environ.get(SGLANG_PYTHON_ENV) or str(REPO / MAKE_SGLANG_PYTHON)
    if not Path(python).is_file():
        message = (f"real SGLang is not installed ({python} is missing): `make sglang` builds "
                   f"it, or set {SGLANG_PYTHON_ENV}")
        if os.environ.get("APR_REQUIRE_TOOLS") == "1":
            pytest.fail(message + " (APR_REQUIRE_TOOLS=1)")
        pytest.skip(message)
    return python


@pytest.fixture(scope="session")
def sglang_python() -> str:
    return sglang_python_or_skip()
