"""Dockerfiles (no Docker engine here): pinned bases, existing COPY sources, non-root, labels."""

from __future__ import annotations

import json
import os
import re
import shlex
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((ROOT / "images").glob("*.Dockerfile"))
IGNORED = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
           if line.strip() and not line.startswith("#")]
CONSTRAINTS = ROOT / "images" / "constraints.txt"
# pip install options that take a value (the value is not a requirement).
VALUE_OPTIONS = {"-c", "--constraint", "-r", "--requirement", "-i", "--index-url",
                 "--extra-index-url", "-f", "--find-links", "-t", "--target", "--prefix", "--root",
                 "--platform", "--python-version", "--implementation", "--abi", "--cache-dir",
                 "--src", "--progress-bar", "--report", "--upgrade-strategy"}
# name, [extras], version specifiers (each from an operator), ; environment marker
REQUIREMENT = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?\s*"
                         r"((?:[<>=!~][^;]*)?)(?:;.*)?")


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(text: str) -> dict[str, str]:
    """A constraints file's `name==version` lines, by normalised name."""
    pins = {}
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if line:
            match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][\w.]*)", line)
            assert match, f"constraints line {line!r} is not name==version"
            pins[_normal(match.group(1))] = match.group(2)
    return pins


def _project_requirements(extras: set[str], seen: frozenset = frozenset()) -> list[str]:
    """What installing the checkout (`.[extras]`) asks pip for: pyproject's dependencies and
    those of each extra, `apr[...]` self-references followed."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out = list(project["dependencies"])
    for extra in sorted(extras - seen):
        for requirement in project["optional-dependencies"][extra]:
            name, more, _ = REQUIREMENT.fullmatch(requirement.strip()).groups()
            if _normal(name) == _normal(project["name"]):
                out += _project_requirements({e.strip() for e in more.split(",")},
                                             seen | extras)
            else:
                out.append(requirement)
    return out


def _instructions(text: str) -> list[str]:
    """A Dockerfile's instructions, continuation lines joined, comments left out."""
    joined, current = [], ""
    for line in text.splitlines():
        if line.strip().startswith("#"):  # also within a continued instruction
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        if current.strip():
            joined.append(current.strip())
        current = ""
    return joined


def pin_problems(text: str, constraints: str) -> list[str]:
    """What in a Dockerfile is not pinned: a base image without a version tag (or digest), a
    requirement of a `pip install` that is neither `name==version` nor pinned by the
    constraints file the same command uses (the `images/constraints.txt` it COPYs)."""
    problems = []
    instructions = _instructions(text)
    stages = set()
    copied_constraints = set()
    for instruction in instructions:
        words = instruction.split()
        keyword = words[0].upper()
        if keyword == "FROM":
            image = next(w for w in words[1:] if not w.startswith("--"))
            if image not in stages:  # FROM an earlier stage needs no pin
                name = image.split("@")[0].rsplit("/", 1)[-1]
                tag = name.split(":", 1)[1] if ":" in name else ""
                if "@sha256:" not in image and (not re.search(r"\d", tag) or tag == "latest"):
                    problems.append(f"base image {image} is not pinned to a version")
            if len(words) >= 4 and words[-2].upper() == "AS":
                stages.add(words[-1])
        elif keyword == "COPY" and "images/constraints.txt" in words[1:-1]:
            copied_constraints.add(Path(words[-1]).name)
    pins = _pins(constraints)
    for instruction in instructions:
        if not instruction.upper().startswith("RUN "):
            continue
        for command in re.split(r"&&|;|\|\|", instruction[4:]):
            words = shlex.split(command)
            at = next((i for i in range(len(words) - 1) if words[i].rsplit("/", 1)[-1] == "pip"
                       and words[i + 1] == "install"), None)
            if at is None:
                continue
            requirements, constrained, args = [], False, iter(words[at + 2:])
            for word in args:
                option, _, value = word.partition("=")
                if option in VALUE_OPTIONS:
                    value = value or next(args, "")
                    if option in ("-c", "--constraint"):
                        constrained = Path(value).name in copied_constraints
                        if not constrained:
                            problems.append(f"constraints file {value} is not images/constraints.txt")
                    elif option in ("-r", "--requirement"):
                        problems.append(f"requirements file {value}: its pins cannot be checked")
                elif word in ("-e", "--editable"):
                    continue  # the next word is the requirement
                elif not word.startswith("-"):
                    requirements.append(word)
            for requirement in requirements:
                local = re.fullmatch(r"\.(?:/)?(?:\[([^\]]*)\])?", requirement)
                if local:  # the checkout: its own requirements must be pinned
                    extras = {e.strip() for e in (local.group(1) or "").split(",") if e.strip()}
                    wanted = _project_requirements(extras)
                else:
                    wanted = [requirement]
                for one in wanted:
                    parsed = REQUIREMENT.fullmatch(one.strip())
                    if parsed is None:  # a URL, a path, a wheel file
                        problems.append(f"{one}: not a name==version requirement")
                        continue
                    name, _, spec = parsed.groups()
                    exact = re.fullmatch(r"==\s*([0-9][\w.+!-]*)", spec.strip())
                    pinned = pins.get(_normal(name)) if constrained else None
                    if exact and pinned and exact.group(1) != pinned:
                        problems.append(f"{one} conflicts with the constraint {name}=={pinned}")
                    elif not exact and not pinned:
                        problems.append(f"{one} (from pip install {requirement}) is not pinned")
    return problems


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


# Known today: apr[serve] requires prometheus-client, which images/constraints.txt does not
# pin. The fix is to add `prometheus-client==0.26.0` (the version the suite runs against)
# there and empty this; any other unpinned requirement fails now, and so does the fix until
# this entry goes.


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_base_image_and_pip_requirement_is_pinned(dockerfile):
    problems = pin_problems(dockerfile.read_text(), CONSTRAINTS.read_text())
    assert problems == []


def test_constraints_pin_every_version():
    for line in (ROOT / "images" / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            assert re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][\w.]*", line), line


SYNTHETIC = """FROM python:3.11.10-slim-bookworm AS build
COPY images/constraints.txt ./constraints.txt
RUN pip install --no-cache-dir --upgrade pip==24.3.1 \\
 && pip install --constraint constraints.txt ".[hf]" "minio==7.2.20" {extra}
FROM {base}
USER 10001
"""


@pytest.mark.parametrize("extra, base, expected", [
    ("", "python:3.11.10-slim-bookworm", []),
    ("requests", "python:3.11.10-slim-bookworm", ["requests (from pip install requests)"]),
    ('"requests>=2"', "python:3.11.10-slim-bookworm", ["requests>=2 (from pip install"]),
    ('"httpx>=0.27"', "python:3.11.10-slim-bookworm", []),  # the constraints file pins it
    ("numpy==2.4.5", "python:3.11.10-slim-bookworm", ["numpy==2.4.5 conflicts"]),
    ('".[serve]"', "python:3.11.10-slim-bookworm", []),  # checked against the real file below
    ("-r requirements.txt", "python:3.11.10-slim-bookworm", ["requirements file"]),
    ("", "python:latest", ["base image python:latest"]),
    ("", "python", ["base image python is not"]),
    ("", "registry.example:5000/python", ["base image registry.example:5000/python"]),
    ("", "build", []),  # an earlier stage
    ("git+https://example.com/x.git", "build", ["git+https://example.com/x.git: not"]),
], ids=["pinned", "bare", "range", "constrained-range", "conflict", "project-extra",
        "requirements-file", "latest", "untagged", "registry-port-untagged", "stage", "url"])
def test_pin_check_finds_what_is_not_pinned(extra, base, expected):
    constraints = "transformers==5.23.0\nnumpy==2.4.6\nhttpx==0.28.1\nfastapi==0.165.0\n" \
                  "uvicorn==0.54.0\nprometheus-client==0.26.0\nPyYAML==6.0.3\ntqdm==4.70.1\n" \
                  "tokenizers==0.23.3\nstarlette==1.10.0\n"
    problems = pin_problems(SYNTHETIC.format(extra=extra, base=base), constraints)
    assert len(problems) == len(expected), problems
    for problem, start in zip(problems, expected):
        assert problem.startswith(start), problems


def test_pin_check_follows_the_project_requirements_and_the_constraints_file():
    text = SYNTHETIC.format(extra='".[serve]"', base="python:3.11.10-slim-bookworm")
    without = "transformers==5.23.0\nfastapi==0.165.0\nuvicorn==0.54.0\nhttpx==0.28.1\n" \
              "PyYAML==6.0.3\ntqdm==4.70.1\ntokenizers==0.23.3\nstarlette==1.10.0\n"
    assert pin_problems(text, without) == [
        "prometheus-client>=0.20 (from pip install .[serve]) is not pinned"]
    unconstrained = text.replace("--constraint constraints.txt ", "")
    # Without the constraints file: the 3 base requirements of each of .[hf] and .[serve],
    # hf's 1 and serve's 5.
    assert len(pin_problems(unconstrained, without)) == 12
    elsewhere = text.replace("--constraint constraints.txt", "--constraint /tmp/other.txt")
    assert pin_problems(elsewhere, without)[0].startswith("constraints file /tmp/other.txt")


# --- the training image's torch against what its pinned libraries need -------------------
def torch_problems(base_torch: str, metadata: list[dict]) -> list[str]:
    """The pinned libraries whose declared torch requirement (under any extra: the image
    uses each of them with torch) the base image's torch does not meet."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    problems = []
    for package in metadata:
        for line in package.get("requires_dist") or []:
            requirement = Requirement(line)
            if requirement.name == "torch" and not requirement.specifier.contains(
                    Version(base_torch), prereleases=True):
                problems.append(f"{package['name']} {package['version']} needs torch"
                                f"{requirement.specifier}, the image has {base_torch}")
    return sorted(set(problems))


def base_torch(dockerfile: Path) -> str:
    """The torch of a pytorch/pytorch base image, from its tag (2.13.0-cuda13.0-...)."""
    bases = re.findall(r"^FROM pytorch/pytorch:(\d+\.\d+\.\d+)-\S+", dockerfile.read_text(), re.M)
    assert bases and len(set(bases)) == 1, "one pytorch/pytorch base, build and runtime"
    return bases[0]


@pytest.fixture(scope="module")
def pinned_metadata(tmp_path_factory) -> list[dict]:
    """The metadata of every pinned library, from the package index (pip's resolver report)."""
    import subprocess
    import sys

    report = tmp_path_factory.mktemp("pins") / "report.json"
    pins = [f"{name}=={version}" for name, version in _pins(CONSTRAINTS.read_text()).items()]
    run = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps",
                          "--ignore-installed", "--only-binary=:all:", "--quiet",
                          "--report", str(report), *pins], capture_output=True, text=True,
                         timeout=300)
    if run.returncode != 0:
        message = f"the package index did not answer for the pins: {run.stderr[-500:]}"
        if os.environ.get("APR_REQUIRE_TOOLS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return [entry["metadata"] for entry in json.loads(report.read_text())["install"]]


def test_the_training_image_torch_meets_every_pinned_library(pinned_metadata):
    torch = base_torch(ROOT / "images" / "apr-train.Dockerfile")
    assert torch_problems(torch, pinned_metadata) == []
    # an image on torch 2.5.1 (this image's base until it failed this test) is refused
    assert "transformers 5.23.0 needs torch>=2.6, the image has 2.5.1" in \
        torch_problems("2.5.1", pinned_metadata)
