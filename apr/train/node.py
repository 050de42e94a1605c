"""One node of a multi-node SFT run (a Kubeflow Trainer TrainJob's `node` container).

    apr sft-node --data s3://store/sft-jobs/J/data --out s3://store/sft-jobs/J \
        --config paper --set traces=apr

Fetches the dataset artifact, runs `apr sft` under torchrun (which takes the nodes, the
processes per node, this node's rank and the rendezvous address from the PET_* variables
the Trainer sets), mirrors checkpoints under `<out>/checkpoints` so that a restarted TrainJob
resumes, and on node 0 publishes the model and sft.json under `<out>/result`.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

from apr.storage import download, is_remote, upload
from apr.train.launch import sft_args, torchrun

log = logging.getLogger(__name__)


def run(data_uri: str, out_uri: str, preset: str, overrides: list[str], workdir: str | Path
        ) -> int:
    """This node's part of the run; returns torchrun's exit code."""
    workdir, out_uri = Path(workdir), out_uri.rstrip("/")
    data, run_dir = workdir / "data", workdir / "run"
    download(data_uri, data)  # a complete artifact, verified
    mirror = f"{out_uri}/checkpoints" if is_remote(out_uri) else None
    command = torchrun(sft_args(preset, overrides, str(data), str(run_dir), mirror))
    log.info("node %s: %s", os.environ.get("PET_NODE_RANK", "0"), " ".join(command))
    code = subprocess.run(command).returncode
    if code != 0:
        return code
    if os.environ.get("PET_NODE_RANK", "0") == "0":  # rank 0 of the run writes the model
        result = workdir / "result"
        shutil.rmtree(result, ignore_errors=True)
        shutil.copytree(run_dir / "model", result / "model")
        shutil.copy2(run_dir / "sft.json", result / "sft.json")
        upload(result, f"{out_uri}/result")
        log.info("model published at %s/result", out_uri)
    return 0
