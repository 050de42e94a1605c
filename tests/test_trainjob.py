"""SFT beyond one node: the TrainJob manifest against the Trainer's CRD schema, and its
node command run here, as the Trainer would start it, at two gloo processes on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from conftest import S3_KEYS, free_port, make_dataset

from apr import storage
from apr.cluster.trainjob import TrainJobSpec, trainjob
from apr.train.checkpoints import MIRROR_SLOTS

SCHEMA = json.loads((Path(__file__).parent / "fixtures" / "trainjob-v2.3.0.schema.json").read_text())
SPEC = TrainJobSpec(name="apr-sft-0123456789ab", data_uri="s3://apr-models/sft-jobs/j/data",
                    out_uri="s3://apr-models/sft-jobs/j", preset="paper",
                    overrides=("traces=apr",), nodes=4, gpus_per_node=8)


def undeclared(value, schema: dict, path: str = "") -> list[str]:
    """Fields the schema does not declare (the API server would drop them without a word)."""
    if isinstance(value, list):
        item = schema.get("items", {})
        return [p for i, v in enumerate(value) for p in undeclared(v, item, f"{path}[{i}]")]
    if not isinstance(value, dict) or schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    declared = schema.get("properties")
    if declared is None:  # a map of one schema (additionalProperties), or free-form
        extra = schema.get("additionalProperties")
        if not isinstance(extra, dict):
            return []
        return [p for k, v in value.items() for p in undeclared(v, extra, f"{path}.{k}")]
    found = []
    for key, v in value.items():
        found += undeclared(v, declared[key], f"{path}.{key}") if key in declared \
            else [f"{path}.{key}"]
    return found


def check(manifest: dict) -> None:
    jsonschema.Draft7Validator(SCHEMA).validate(manifest)
    assert undeclared(manifest, SCHEMA) == []


def test_the_manifest_fits_the_trainer_crd():
    manifest = trainjob(SPEC)
    check(manifest)
    trainer = manifest["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (4, 8)
    assert trainer["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": 8}
    # torchrun's rendezvous variables are the Trainer's to set: a TrainJob that sets one is refused
    assert not [e for e in trainer["env"] if e["name"].startswith("PET_")]


@pytest.mark.parametrize("spoil, message", [
    (lambda m: m["spec"]["trainer"].update(numNodes="4"), "is not of type 'integer'"),
    (lambda m: m["spec"].pop("runtimeRef"), "'runtimeRef' is a required property"),
])
def test_the_schema_check_catches_a_wrong_manifest(spoil, message):
    manifest = trainjob(SPEC)
    spoil(manifest)
    with pytest.raises(jsonschema.ValidationError, match=message):
        check(manifest)


def test_an_undeclared_field_is_caught():
    manifest = trainjob(SPEC)
    manifest["spec"]["trainer"]["nodeSelector"] = {"gpu": "yes"}  # not a trainer field
    assert undeclared(manifest, SCHEMA) == [".spec.trainer.nodeSelector"]


@pytest.mark.slow
def test_the_node_command_trains_and_publishes_at_two_processes(s3, tmp_path, monkeypatch):
    """The container's command, args and env as the manifest renders them, plus the PET_*
    variables the Trainer injects (one node of two processes here); the image's `apr` is
    this environment's."""
    data = make_dataset(tmp_path / "data", train=16, val=4, seed=3, chunk=4)
    base = "s3://apr-models/sft-jobs/j"
    storage.upload(data, f"{base}/data", s3)
    spec = TrainJobSpec(name="apr-sft-test", data_uri=f"{base}/data", out_uri=base,
                        preset="local", s3_endpoint=s3.url, nodes=1, gpus_per_node=2,
                        overrides=("traces=sos", "shape=tiny", "context=1024",
                                   "tokens_per_batch=2048", "max_steps=2", "eval_every=2",
                                   "checkpoint_every=1", "eval_sequences=4", "dtype=fp32"))
    manifest = trainjob(spec)
    check(manifest)
    trainer = manifest["spec"]["trainer"]
    secrets = {"accesskey": S3_KEYS["AWS_ACCESS_KEY_ID"],
               "secretkey": S3_KEYS["AWS_SECRET_ACCESS_KEY"]}
    env = {e["name"]: e["value"] if "value" in e else secrets[e["valueFrom"]["secretKeyRef"]["key"]]
           for e in trainer["env"]}
    env |= {"PET_NNODES": str(trainer["numNodes"]),
            "PET_NPROC_PER_NODE": str(trainer["numProcPerNode"]), "PET_NODE_RANK": "0",
            "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(free_port())}
    assert trainer["command"][0] == "apr"
    command = [sys.executable, "-m", "apr.cli", *trainer["command"][1:], *trainer["args"],
               "--workdir", str(tmp_path / "node")]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = tmp_path / "result"
    storage.download(f"{base}/result", result, s3)
    assert (result / "model" / "model.safetensors").is_file()
    assert json.loads((result / "sft.json").read_text())["processes"] == 2
    assert all(storage.is_complete(f"{base}/checkpoints/{slot}", s3) for slot in MIRROR_SLOTS)
