"""bench/gpu_suite.py in its CPU smoke mode: the one-call GPU suite must not first break on the
GPU, where each try costs minutes of a lent machine, so every part runs here, tiny."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_smoke_run_prints_every_part_and_writes_finite_json(tmp_path):
    out = tmp_path / "table.json"
    done = subprocess.run([sys.executable, "bench/gpu_suite.py", "--smoke", "--workdir",
                           str(tmp_path / "work"), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("| ")][1:]  # no header
    rows = [tuple(cell.strip() for cell in line.strip("|").split("|")[:3]) for line in lines]

    def printed(part: str, setting: str, metric: str) -> bool:
        return any(p == part and s.startswith(setting) and m == metric for p, s, m in rows)

    for variant in ("dense baseline", "ours, buckets", "ours, packed rows"):
        assert printed("sft throughput", f"tiny: {variant}", "tokens/s"), variant
    assert printed("decoding", "generate, static cache", "ms/step")
    assert printed("decoding", "runtime", "ms/step")
    assert printed("evaluate", "APR,", "accuracy") and printed("evaluate", "SoS+,", "accuracy")
    record = json.loads(out.read_text())
    assert record["complete"] and not record["failed"] and len(record["rows"]) == len(rows)
    assert all(isinstance(r["value"], float) and math.isfinite(r["value"])
               for r in record["rows"])
