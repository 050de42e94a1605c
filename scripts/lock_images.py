"""The container images' lock files: every package an image installs, pinned with its hashes,
resolved by uv from the project's extras for the image's Python and platform.

    python scripts/lock_images.py            write images/<image>.lock for every image
    python scripts/lock_images.py --check    exit 1 naming each lock its inputs no longer give

The resolver sees the package index as it was at `EXCLUDE_NEWER`, so the same inputs give the
same lock on any day: a lock differs from a new resolution only when pyproject.toml or an
image's entry here changed. Move the date forward to take newer releases. Each Dockerfile
installs its lock with `--require-hashes --no-deps`, then the project itself with `--no-deps`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from apr import atomic

ROOT = Path(__file__).resolve().parents[1]
EXCLUDE_NEWER = "2026-12-01T00:00:00Z"
COMMAND = "python scripts/lock_images.py"


@dataclass(frozen=True)
class ImageLock:
    """One image's resolution: the project's extras it installs, on its base's Python and
    glibc (the manylinux tag its wheels may carry)."""

    image: str
    extras: tuple[str, ...]
    python: str
    platform: str

    @property
    def path(self) -> Path:
        return ROOT / "images" / f"{self.image}.lock"

    @property
    def dockerfile(self) -> Path:
        return ROOT / "images" / f"{self.image}.Dockerfile"


# python:3.11.10-slim-bookworm has glibc 2.36; nvidia/cuda's ubuntu24.04 images have 2.39.
LOCKS = (
    ImageLock("apr", ("hf", "eval", "pipeline"), "3.11", "x86_64-manylinux_2_36"),
    ImageLock("apr-serve", ("serve", "store"), "3.11", "x86_64-manylinux_2_36"),
    ImageLock("apr-train", ("gpu",), "3.12", "x86_64-manylinux_2_39"),
)


class LockError(Exception):
    """The resolver failed or could not run; the message says why in one paragraph."""


def resolve(lock: ImageLock, constraints: tuple[str, ...] = ()) -> str:
    """The lock file's text for `lock`, as uv resolves it now (`constraints`: extra pins,
    for asking whether the inputs still resolve under them)."""
    command = [sys.executable, "-m", "uv", "pip", "compile", "pyproject.toml",
               *(f"--extra={e}" for e in lock.extras), f"--python-version={lock.python}",
               f"--python-platform={lock.platform}", "--generate-hashes",
               f"--exclude-newer={EXCLUDE_NEWER}", f"--custom-compile-command={COMMAND}",
               "--no-config", "--no-python-downloads"]
    with tempfile.TemporaryDirectory() as scratch:
        if constraints:
            extra = Path(scratch) / "constraints.txt"
            extra.write_text("\n".join(constraints) + "\n")
            command.append(f"--constraint={extra}")
        try:
            run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                                 timeout=600)
        except FileNotFoundError as e:
            raise LockError(f"cannot run uv ({e}): pip install uv") from None
    if run.returncode != 0:
        raise LockError(f"uv could not resolve {lock.image}: {run.stderr.strip()}")
    if "==" not in run.stdout:
        raise LockError(f"uv wrote no pins for {lock.image}: {run.stderr.strip()}")
    return run.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="compare each lock with a new resolution instead of writing it")
    args = parser.parse_args()
    stale = []
    for lock in LOCKS:
        try:
            text = resolve(lock)
        except LockError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if args.check:
            if not lock.path.is_file() or lock.path.read_text() != text:
                stale.append(lock.path.relative_to(ROOT))
            continue
        atomic.write_text(lock.path, text)
        print(f"wrote {lock.path.relative_to(ROOT)} ({text.count('==')} packages)")
    if stale:
        print(f"not current: {', '.join(map(str, stale))}: run `{COMMAND}`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
