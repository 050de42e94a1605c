"""Threads: the units that SFT trains on and the runtime decodes, cut from solver traces.

A child thread's prompt is its `Moving to Node` and `Current State` lines; its text is its
search. The parent is cut into segments at its spawns: segment k's prompt is everything the
parent context holds before its k-th spawn block (earlier join blocks included), and its text
is what the parent writes next, up to and including that spawn block (or to the end). A SoS+
trace is one thread whose prompt is the root's `Current State` line.
"""

from __future__ import annotations

from dataclasses import dataclass

from apr.countdown.search import PROMPT_EVENTS, AprTrace, SosTrace
from apr.countdown.trace import Budget, render, render_line

PARENT, CHILD = "parent", "child"


@dataclass(frozen=True, slots=True)
class Thread:
    role: str  # "parent" (a segment of the parent thread) or "child"
    prompt: str  # what the model is given
    text: str  # what the model must write
    spawn: int  # parent: its segment index; child: the spawn it belongs to
    index: int = 0  # child: its index in the spawn block

    def to_json(self) -> dict:
        return {"role": self.role, "prompt": self.prompt, "text": self.text, "spawn": self.spawn,
                "index": self.index}

    @classmethod
    def from_json(cls, record: dict) -> Thread:
        return cls(record["role"], record["prompt"], record["text"], record["spawn"],
                   record.get("index", 0))


def apr_threads(trace: AprTrace, budget: Budget | None = None) -> list[Thread]:
    """Parent segments and children in decoding order: segment 0, its children, segment 1, ..."""
    lines = [render_line(e) + "\n" for e in trace.context]
    prefix = str(budget) if budget is not None else ""
    threads: list[Thread] = []
    start = PROMPT_EVENTS
    for k, spawn in enumerate(trace.spawns):
        threads.append(Thread(PARENT, prefix + "".join(lines[:start]),
                              "".join(lines[start:spawn.at]) + render(spawn.block), k))
        for i, child in enumerate(spawn.children):
            threads.append(Thread(CHILD, render(child.events[:PROMPT_EVENTS]),
                                  render(child.events[PROMPT_EVENTS:]), k, i))
        start = spawn.at + len(spawn.join)
    threads.append(Thread(PARENT, prefix + "".join(lines[:start]), "".join(lines[start:]),
                          len(trace.spawns)))
    return threads


def sos_threads(trace: SosTrace, budget: Budget | None = None) -> list[Thread]:
    """The one serialized thread: prompt = the root's `Current State` line."""
    return [Thread(PARENT, render(trace.events[:1], budget), render(trace.events[1:]), 0)]


def final_text(threads: list[Thread]) -> str:
    """The parent's final context: what the paper's data calls `search_path`."""
    last = threads[-1]
    return last.prompt + last.text
