"""Write, then rename: an output appears complete, or not at all.

Every stage writes its outputs here first under `<name>.partial`, which a later run clears
(a killed writer left it, so it is incomplete by construction), fsyncs what it wrote, then
renames it into place. A reader therefore never sees half an output under its real name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

PARTIAL = ".partial"


def partial_path(final: str | Path) -> Path:
    final = Path(final)
    return final.with_name(final.name + PARTIAL)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file() and not path.is_symlink():
            _fsync(path)
    _fsync(directory)


def _clear(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def check_replaceable(final: str | Path, replace: bool | str = False) -> bool:
    """Whether `final` holds an output to replace (see `partial_dir`); raises FileExistsError
    when it holds something else. Call it before long work, so a run fails at its start."""
    final = Path(final)
    taken = final.exists() and (not final.is_dir() or any(final.iterdir()))
    if taken and not (replace is True or (isinstance(replace, str) and final.is_dir()
                                          and (final / replace).exists())):
        earlier = f" and holds no {replace}, so it is not an earlier output of this command" \
            if isinstance(replace, str) else ""
        raise FileExistsError(f"{final} already exists{earlier}: remove it or choose another path")
    return taken


def _put_in_place(partial: Path, final: Path, replace: bool | str) -> None:
    if check_replaceable(final, replace):
        # Move the old output aside before the new one takes its name, so a crash leaves
        # one of the two under `final`, never neither; then remove the old one.
        old = final.with_name(final.name + ".old")
        _clear(old)
        os.replace(final, old)
        os.replace(partial, final)
        _clear(old)
    else:
        os.replace(partial, final)  # onto nothing, or an empty directory
    _fsync(final.parent)


@contextlib.contextmanager
def partial_dir(final: str | Path, replace: bool | str = False) -> Iterator[Path]:
    """Yield an empty `<final>.partial` directory; on success it becomes `final`.

    An existing non-empty `final` is replaced only when `replace` is True, or names a file
    it holds (the mark of an earlier output of the same writer: a command never deletes
    what it did not write); otherwise it is an error. On an exception the partial directory
    is removed.
    """
    final = Path(final)
    partial = partial_path(final)
    _clear(partial)
    partial.mkdir(parents=True)
    try:
        yield partial
        _fsync_tree(partial)
        _put_in_place(partial, final, replace)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


@contextlib.contextmanager
def partial_file(final: str | Path) -> Iterator[Path]:
    """Yield `<final>.partial` to write one file into; on success it replaces `final`."""
    final = Path(final)
    partial = partial_path(final)
    _clear(partial)
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield partial
        _fsync(partial)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
        raise
    os.replace(partial, final)


def write_text(final: str | Path, text: str) -> Path:
    """Replace `final` with `text`, atomically."""
    with partial_file(final) as partial:
        partial.write_text(text)
    return Path(final)
