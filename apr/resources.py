"""What memory this machine (or its container) can give: a size that cannot fit is refused
with a message before it is tried, never met by the kernel's OOM killer minutes later."""

from __future__ import annotations

from pathlib import Path

from apr.config import ConfigError

GIB = 1 << 30


def available_bytes() -> int:
    """Memory a new allocation can get now: the kernel's MemAvailable, capped by the cgroup's
    limit (a pod's `resources.limits.memory`) less what the cgroup already uses."""
    available = _meminfo_available()
    limit, used = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    if limit is not None and used is not None:
        available = min(available, max(0, limit - used))
    return available


def check_fits(key: str, value: int, bytes_needed: float, fix: str,
               available: int | None = None) -> None:
    """A ConfigError naming `key` when `bytes_needed` (a lower bound of what `value` takes)
    exceeds `available` (default: this machine's memory)."""
    available = available_bytes() if available is None else available
    if bytes_needed > available:
        raise ConfigError(f"{key}: {value} needs at least {bytes_needed / GIB:,.1f} GiB of memory, "
                          f"{available / GIB:,.1f} GiB are available: {fix}")


def _meminfo_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 1 << 62  # unknown (not Linux): nothing is refused on this ground


def _read_int(path: str) -> int | None:
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):  # absent, or "max" (no limit)
        return None
