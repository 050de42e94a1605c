"""Dockerfiles (no Docker engine here): pinned bases, existing COPY sources, non-root, labels."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((ROOT / "images").glob("*.Dockerfile"))
IGNORED = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
           if line.strip() and not line.startswith("#")]


def test_there_is_an_image_per_role():
    assert {p.name for p in DOCKERFILES} == {"apr.Dockerfile", "apr-train.Dockerfile",
                                            "apr-serve.Dockerfile"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_pinned_non_root_labelled_and_its_sources_exist(dockerfile):
    lines = [l.strip() for l in dockerfile.read_text().splitlines()]
    bases = [l.split()[1] for l in lines if l.startswith("FROM ")]
    assert len(bases) >= 2, "multi-stage: a build stage and a runtime stage"
    for base in bases:
        assert "@sha256:" in base or re.search(r":[^:]*\d", base), f"{base} is not pinned"
        assert not base.endswith(":latest")
    for line in lines:
        if line.startswith("COPY ") and "--from=" not in line:
            *sources, _ = line.split()[1:]
            for source in sources:
                assert (ROOT / source).exists(), f"COPY source {source} does not exist"
                assert source.split("/")[0] not in IGNORED, f"{source} is in .dockerignore"
    final = "\n".join(lines[max(i for i, l in enumerate(lines) if l.startswith("FROM ")):])
    assert re.search(r"^USER (?!root|0\b)\S+", final, re.M), "the runtime stage must not run as root"
    assert "org.opencontainers.image.title" in final
    for match in re.finditer(r'"([A-Za-z0-9_.\[\]-]+)==([0-9][^"]*)"', dockerfile.read_text()):
        assert match.group(2)  # every package named in a pip line is pinned
    assert "--constraint" in dockerfile.read_text()


def test_constraints_pin_every_version():
    for line in (ROOT / "images" / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            assert re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][\w.]*", line), line
