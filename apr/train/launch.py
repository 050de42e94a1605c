"""The command lines that run `apr sft` over several processes: torchrun on one node (the
pipeline's SFT step with `gpus` > 1) and on each node of a Kubeflow Trainer TrainJob. One
builder for both, so the arguments a cluster runs are the ones the tests run on the CPU."""

from __future__ import annotations

import sys


def sft_args(preset: str, overrides: list[str], data: str, out: str,
             mirror: str | None = None) -> list[str]:
    """`apr sft`, resuming from its checkpoints in `out` (or `mirror`), as a module run."""
    args = ["-m", "apr.cli", "sft", "--config", preset]
    for override in overrides:
        args += ["--set", override]
    args += ["--data", data, "--out", out, "--resume", "--no-progress"]
    return args + (["--mirror", mirror] if mirror else [])


def torchrun(args: list[str], processes: int | None = None) -> list[str]:
    """`args` under torchrun: in `processes` processes on this machine (a rendezvous of its
    own), or, with None, on one node of several, where torchrun reads the nodes, processes
    per node, this node's rank and the rendezvous address from the PET_* variables the
    Trainer sets."""
    here = ["--standalone", "--nproc_per_node", str(processes)] if processes else []
    return [sys.executable, "-m", "torch.distributed.run", *here, *args]
