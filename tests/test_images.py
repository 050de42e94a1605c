"""Dockerfiles (no Docker engine here): pinned bases, existing COPY sources, non-root, labels."""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((ROOT / "images").glob("*.Dockerfile"))
IGNORED = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
           if line.strip() and not line.startswith("#")]
# pip install options that take a value (the value is not a requirement).
VALUE_OPTIONS = {"-c", "--constraint", "-r", "--requirement", "-i", "--index-url",
                 "--extra-index-url", "-f", "--find-links", "-t", "--target", "--prefix", "--root",
                 "--platform", "--python-version", "--implementation", "--abi", "--cache-dir",
                 "--src", "--progress-bar", "--report", "--upgrade-strategy"}
HASHED_PIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(?:\[[^\]]*\])?==[0-9][\w.+!-]*"
                        r"(?: ; [^\\]+)? \\\n(?:    --hash=sha256:[0-9a-f]{64}(?: \\\n|\n))+")


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


def _pip_installs(instruction: str):
    """The words after `pip install` of each pip command in a RUN instruction."""
    for command in re.split(r"&&|;|\|\|", instruction[4:]):
        words = shlex.split(command)
        at = next((i for i in range(len(words) - 1) if words[i].rsplit("/", 1)[-1] == "pip"
                   and words[i + 1] == "install"), None)
        if at is not None:
            yield words[at + 2:]


def lock_problems(text: str) -> list[str]:
    """What in a lock file is not a pin with hashes (uv's layout: name==version, a hash per
    line, `# via` comments)."""
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    left = HASHED_PIN.sub("", body + "\n").strip()
    return [f"not a pin with hashes: {line!r}" for line in left.splitlines()[:3]]


def pin_problems(text: str, locks: dict[str, str]) -> list[str]:
    """What in a Dockerfile is not pinned: a base image without a version tag (or digest); a
    `pip install` requirement that is not `name==version`; a requirements file that is not an
    image lock the Dockerfile COPYs (`locks`: their text by path), installed without
    `--require-hashes --no-deps`; the project (`.`) installed without `--no-deps`, which would
    let pip choose its dependencies' versions."""
    problems = []
    instructions = _instructions(text)
    stages, copied = set(), {}
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
        elif keyword == "COPY" and "--from" not in instruction:
            for source in words[1:-1]:
                if source in locks:
                    copied[Path(words[-1]).name] = source
    for instruction in instructions:
        if not instruction.upper().startswith("RUN "):
            continue
        for words in _pip_installs(instruction):
            flags, requirements, files, args = set(), [], [], iter(words)
            for word in args:
                option, _, value = word.partition("=")
                if option in VALUE_OPTIONS:
                    value = value or next(args, "")
                    if option in ("-r", "--requirement"):
                        files.append(value)
                    elif option in ("-c", "--constraint"):
                        problems.append(f"constraints file {value}: install from a lock")
                elif word.startswith("-"):
                    flags.add(word)
                else:
                    requirements.append(word)
            for value in files:
                source = copied.get(Path(value).name)
                if source is None:
                    problems.append(f"requirements file {value} is not an image lock")
                    continue
                if not {"--require-hashes", "--no-deps"} <= flags:
                    problems.append(f"{source} installed without --require-hashes --no-deps")
                problems += [f"{source}: {p}" for p in lock_problems(locks[source])]
            for requirement in requirements:
                if re.fullmatch(r"\.(?:/)?(?:\[[^\]]*\])?", requirement):
                    if "--no-deps" not in flags:
                        problems.append(f"the project ({requirement}) is installed without "
                                        "--no-deps: its dependencies come from the lock")
                elif not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==[0-9][\w.+!-]*",
                                      requirement):
                    problems.append(f"{requirement} is not pinned (name==version)")
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


LOCKS = {f"images/{p.name}": p.read_text() for p in (ROOT / "images").glob("*.lock")}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_base_image_and_package_is_pinned(dockerfile):
    assert pin_problems(dockerfile.read_text(), LOCKS) == []


SYNTHETIC = """FROM python:3.11.10-slim-bookworm AS build
COPY images/x.lock ./x.lock
RUN pip install --no-cache-dir --upgrade pip==24.3.1 \\
 && pip install --no-cache-dir {lock_flags} -r x.lock {extra}
COPY apr ./apr
RUN pip install --no-deps . && pip check
FROM {base}
USER 10001
"""
GOOD_LOCK = ("# header\nminio==7.2.20 \\\n    --hash=sha256:" + "a" * 64 + " \\\n"
             "    --hash=sha256:" + "b" * 64 + "\n    # via apr (pyproject.toml)\n"
             "pywin32==311 ; sys_platform == 'win32' \\\n    --hash=sha256:" + "c" * 64 + "\n")


@pytest.mark.parametrize("extra, flags, base, lock, expected", [
    ("", "--require-hashes --no-deps", "python:3.11.10-slim-bookworm", GOOD_LOCK, []),
    ("requests", "--require-hashes --no-deps", "python:3.11.10-slim-bookworm", GOOD_LOCK,
     ["requests is not pinned"]),
    ('"requests>=2"', "--require-hashes --no-deps", "python:3.11.10-slim-bookworm", GOOD_LOCK,
     ["requests>=2 is not pinned"]),
    ("", "--no-deps", "python:3.11.10-slim-bookworm", GOOD_LOCK,
     ["images/x.lock installed without --require-hashes"]),
    ("", "--require-hashes --no-deps", "python:3.11.10-slim-bookworm",
     GOOD_LOCK + "numpy>=2\n", ["images/x.lock: not a pin with hashes: 'numpy>=2'"]),
    ("-c c.txt", "--require-hashes --no-deps", "python:3.11.10-slim-bookworm", GOOD_LOCK,
     ["constraints file c.txt"]),
    ("-r other.txt", "--require-hashes --no-deps", "python:3.11.10-slim-bookworm", GOOD_LOCK,
     ["requirements file other.txt is not an image lock"]),
    ('".[serve]"', "--require-hashes --no-deps", "python:3.11.10-slim-bookworm", GOOD_LOCK,
     []),  # the project without its dependencies
    ("", "--require-hashes --no-deps", "python:latest", GOOD_LOCK, ["base image python:latest"]),
    ("", "--require-hashes --no-deps", "python", GOOD_LOCK, ["base image python is not"]),
    ("", "--require-hashes --no-deps", "registry.example:5000/python", GOOD_LOCK,
     ["base image registry.example:5000/python"]),
    ("", "--require-hashes --no-deps", "build", GOOD_LOCK, []),  # an earlier stage
    ("git+https://example.com/x.git", "--require-hashes --no-deps", "build", GOOD_LOCK,
     ["git+https://example.com/x.git is not pinned"]),
], ids=["pinned", "bare", "range", "no-hashes", "unhashed-line", "constraints",
        "other-requirements", "project-beside-the-lock", "latest", "untagged",
        "registry-port-untagged", "stage", "url"])
def test_pin_check_finds_what_is_not_pinned(extra, flags, base, lock, expected):
    text = SYNTHETIC.format(extra=extra, lock_flags=flags, base=base)
    problems = pin_problems(text, {"images/x.lock": lock})
    assert len(problems) == len(expected), problems
    for problem, start in zip(problems, expected):
        assert problem.startswith(start), problems


def test_pin_check_wants_the_project_without_its_dependencies():
    text = SYNTHETIC.format(extra="", lock_flags="--require-hashes --no-deps",
                            base="python:3.11.10-slim-bookworm")
    assert pin_problems(text.replace("pip install --no-deps .", "pip install ."),
                        {"images/x.lock": GOOD_LOCK}) == [
        "the project (.) is installed without --no-deps: its dependencies come from the lock"]


# --- the locks: current, resolved for each image's Python and platform -----------------------
sys.path.insert(0, str(ROOT / "scripts"))
import lock_images  # noqa: E402

# glibc of each base image's distribution: the newest manylinux tag its wheels may carry.
GLIBC = {"bookworm": "2_36", "ubuntu24.04": "2_39"}


def lock_pins(text: str) -> dict[str, str]:
    return {re.sub(r"[-_.]+", "-", m.group(1)).lower(): m.group(2)
            for m in re.finditer(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", text, re.M)}


def test_every_image_has_a_lock_its_dockerfile_installs():
    assert {lock.dockerfile for lock in lock_images.LOCKS} == set(DOCKERFILES)
    for lock in lock_images.LOCKS:
        text = lock.dockerfile.read_text()
        assert f"COPY images/{lock.image}.lock " in text
        assert lock_problems(lock.path.read_text()) == []


@pytest.mark.parametrize("lock", lock_images.LOCKS, ids=lambda lock: lock.image)
def test_each_lock_is_resolved_for_its_images_python_and_platform(lock):
    text = lock.dockerfile.read_text()
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    distribution = next(d for d in GLIBC if base.endswith(d))
    assert lock.platform == f"x86_64-manylinux_{GLIBC[distribution]}"
    official = re.fullmatch(r"python:(\d+\.\d+)\.\d+-slim-\w+", base)
    python = official.group(1) if official else re.search(r"python(\d+\.\d+) -m venv",
                                                          text).group(1)
    assert lock.python == python


def test_the_gpu_image_holds_sglang_on_torch_built_for_cuda_13():
    pins = lock_pins(lock_images.LOCKS[-1].path.read_text())
    assert (pins["sglang"], pins["torch"]) == ("0.5.23", "2.14.1")
    assert pins["nvidia-cuda-runtime"].startswith("13.")
    assert "accelerate" in pins  # transformers' torch extra: its torch floor was resolved


def _resolve_or_skip(lock, constraints=()):
    try:
        return lock_images.resolve(lock, constraints)
    except lock_images.LockError as e:
        if "No solution found" in str(e) or os.environ.get("APR_REQUIRE_TOOLS") == "1":
            raise
        pytest.skip(f"the resolver could not reach the package index: {str(e)[-300:]}")


@pytest.mark.slow
@pytest.mark.parametrize("lock", lock_images.LOCKS, ids=lambda lock: lock.image)
def test_each_lock_is_what_its_inputs_resolve_to_now(lock):
    assert _resolve_or_skip(lock) == lock.path.read_text(), \
        f"{lock.path.name} is not current: run `{lock_images.COMMAND}`"


@pytest.mark.slow
def test_a_pin_that_needs_a_newer_torch_than_the_image_has_fails_the_lock():
    with pytest.raises(lock_images.LockError, match=r"No solution found[\s\S]*torch"):
        _resolve_or_skip(lock_images.LOCKS[-1], ("torch==2.13.0",))


# --- the CPU images' build stage, run here -------------------------------------------------
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def run_build_stage(dockerfile: Path, root: Path) -> Path:
    """The build stage of a python-slim Dockerfile run on this machine, as the image builder
    would run it: WORKDIR and /opt/apr under `root`, COPY as copies, each RUN through sh, pip
    with no configuration of this machine's. Returns the environment it made (/opt/apr)."""
    import shutil
    import subprocess

    text = dockerfile.read_text()
    build = text[:text.index("\nFROM ", text.index("FROM ") + 1)]
    env = {"PATH": os.environ["PATH"], "HOME": str(root), "PIP_CONFIG_FILE": os.devnull,
           "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    if Path(CA_BUNDLE).is_file():  # this network's TLS goes through its own authority
        env["PIP_CERT"] = CA_BUNDLE
    workdir = root
    for instruction in _instructions(build):
        keyword, _, rest = instruction.partition(" ")
        if keyword == "WORKDIR":
            workdir = root / rest.strip().lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif keyword == "COPY":
            *sources, target = rest.split()
            for source in sources:
                destination = workdir / target
                if (ROOT / source).is_dir():
                    shutil.copytree(ROOT / source, destination, dirs_exist_ok=True)
                else:
                    shutil.copy(ROOT / source, destination if not target.endswith("/")
                                else destination / Path(source).name)
        elif keyword == "RUN":
            command = rest.replace("/opt/apr", str(root / "opt" / "apr"))
            run = subprocess.run(["sh", "-c", command], cwd=workdir, env=env,
                                 capture_output=True, text=True, timeout=900)
            if run.returncode != 0 and "Could not fetch URL" in run.stdout + run.stderr \
                    and os.environ.get("APR_REQUIRE_TOOLS") != "1":
                pytest.skip("the package index is not reachable")
            assert run.returncode == 0, f"RUN {rest[:80]}...: {(run.stdout + run.stderr)[-2000:]}"
    return root / "opt" / "apr"


@pytest.mark.slow
@pytest.mark.parametrize("image, command", [
    ("apr", "import apr.cluster.jobs, apr.report, apr.stages.datagen, kfp.compiler, minio"),
    ("apr-serve", "import apr.serve.app, apr.decode.sglang, apr.storage, minio"),
])
def test_a_cpu_image_builds_from_its_lock_and_runs_its_role(image, command, tmp_path):
    venv = run_build_stage(ROOT / "images" / f"{image}.Dockerfile", tmp_path)
    import subprocess

    for args in ([str(venv / "bin" / "python"), "-c", command],
                 [str(venv / "bin" / "apr"), "--help"]):
        run = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert run.returncode == 0, run.stderr[-1500:]
    frozen = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "freeze"],
                            capture_output=True, text=True).stdout
    pins = lock_pins((ROOT / "images" / f"{image}.lock").read_text())
    installed = lock_pins(frozen)
    assert {k: installed.get(k) for k in pins} == pins
