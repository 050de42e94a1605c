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
from apr.countdown.trace import Budget

PARENT, CHILD = "parent", "child"  # a thread's role
ROLES = (PARENT, CHILD)
# The two trace styles, and so the two decoding modes: APR (spawn and join child threads) and
# SoS+ (the same search serialized in one thread).
APR, SOS = "apr", "sos"
STYLES = (APR, SOS)
STYLE_NAMES = {APR: "APR", SOS: "SoS+"}  # as reports and plots write them


@dataclass(frozen=True, slots=True)
class Thread:
    role: str  # PARENT (a segment of the parent thread) or CHILD
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
    lines = trace.lines
    prompt = (str(budget) if budget is not None else "") + "".join(lines[:PROMPT_EVENTS])
    threads: list[Thread] = []
    start = PROMPT_EVENTS
    for k, spawn in enumerate(trace.spawns):
        written = "".join(lines[start:spawn.at])
        threads.append(Thread(PARENT, prompt, written + "".join(spawn.block_lines), k))
        for i, child in enumerate(spawn.children):
            child_lines = child.lines
            threads.append(Thread(CHILD, "".join(child_lines[:PROMPT_EVENTS]),
                                  "".join(child_lines[PROMPT_EVENTS:]), k, i))
        prompt += written + "".join(spawn.join_lines)  # the next segment's prompt
        start = spawn.at + len(spawn.join_lines)
    threads.append(Thread(PARENT, prompt, "".join(lines[start:]), len(trace.spawns)))
    return threads


def sos_threads(trace: SosTrace, budget: Budget | None = None) -> list[Thread]:
    """The one serialized thread: prompt = the root's `Current State` line."""
    prompt = trace.lines[0]
    if budget is not None:
        prompt = f"{budget}{prompt}"
    return [Thread(PARENT, prompt, "".join(trace.lines[1:]), 0)]


def final_text(threads: list[Thread]) -> str:
    """The parent's final context: what the paper's data calls `search_path`."""
    last = threads[-1]
    return last.prompt + last.text
