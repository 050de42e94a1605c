"""The local run's terminal: one line per task as it ends, every task's own log in a file.

kfp.local prints each task's streamed log and outputs to stdout; a run is a thousand lines.
`TaskProgress` takes that stream (it replaces sys.stdout for the run), writes all of it to
the log file and prints one line per task: its name, status and time. A failed task's last
lines are kept so that the error can be shown without the rest.
"""

from __future__ import annotations

import io
import re
import time
from collections import deque
from typing import TextIO

ANSI = re.compile(r"\x1b\[[0-9;]*m")
STARTED = re.compile(r"Executing task '([^']+)'")
FINISHED = re.compile(r"Task '([^']+)' finished with status (\w+)")


class TaskProgress(io.TextIOBase):
    """A write-only text stream: everything to `log`, a line per finished task to `out`."""

    def __init__(self, log: TextIO, out: TextIO, names: dict[str, str] | None = None,
                 tail_lines: int = 40):
        self.log, self.out = log, out
        self.names = names or {}  # kfp.local's task key -> the display name the UI shows
        self.partial = ""
        self.started: dict[str, float] = {}
        self.tail: deque[str] = deque(maxlen=tail_lines)  # the running task's last lines
        self.failed: str | None = None
        self.failed_tail: list[str] = []

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.log.write(text)
        *lines, self.partial = (self.partial + text).split("\n")
        for line in lines:
            self._line(ANSI.sub("", line))
        return len(text)

    def flush(self) -> None:
        self.log.flush()
        self.out.flush()

    def _line(self, line: str) -> None:
        """Every task start and end in the line, in order (a task's print without its newline
        and kfp.local's next record share a line)."""
        events = sorted([*STARTED.finditer(line), *FINISHED.finditer(line)],
                        key=lambda m: m.start())
        for match in events:
            if match.re is STARTED:
                self.started[match[1]] = time.perf_counter()
                self.tail.clear()
                continue
            task, status = match[1], match[2]
            seconds = time.perf_counter() - self.started.get(task, time.perf_counter())
            print(f"  {self.names.get(task, task):<20} {status.lower():<8} {seconds:6.1f} s",
                  file=self.out, flush=True)
            if status != "SUCCESS":
                self.failed, self.failed_tail = task, list(self.tail)
        if not events and line.strip():
            self.tail.append(line)
