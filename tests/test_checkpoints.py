"""Resuming after a kill or a damaged disk: the newest checkpoint that loads, a log without
its half-written tail, and no fresh run over an earlier run's checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from apr.train.checkpoints import check_fresh, resume, save_checkpoint, truncate_log


def _trained(steps: int, seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    for _ in range(steps):
        model(torch.ones(3, 4)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(tmp_path):
    for step in (1, 2):
        model, optimizer = _trained(step)
        save_checkpoint(tmp_path, model, optimizer, {"step": step}, keep=2)
    expected = {k: v.clone() for k, v in _trained(1)[0].state_dict().items()}
    weights = tmp_path / "step-0000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # the disk lost the tail

    model, optimizer = _trained(0, seed=1)
    path, state = resume(tmp_path, model, optimizer, "cpu")
    assert path.name == "step-0000001" and state == {"step": 1}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())


def test_no_checkpoint_that_loads_means_a_fresh_start(tmp_path):
    model, optimizer = _trained(1)
    save_checkpoint(tmp_path, model, optimizer, {"step": 1}, keep=1)
    (tmp_path / "step-0000001" / "optimizer.json").write_text("{")
    model, optimizer = _trained(0, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert resume(tmp_path, model, optimizer, "cpu") is None
    # nothing of the damaged checkpoint was loaded into the fresh model
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_a_half_written_log_line_is_dropped_on_resume(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    truncate_log(log, 2)
    assert log.read_text().splitlines() == ['{"step": 1}', '{"step": 2}']


def test_a_fresh_run_refuses_an_earlier_runs_checkpoints(tmp_path):
    check_fresh(tmp_path)  # none: fine
    save_checkpoint(tmp_path, *_trained(1), {"step": 1}, keep=1)
    with pytest.raises(FileExistsError, match="--resume"):
        check_fresh(tmp_path)
