"""Training checkpoints: model, optimizer and trainer state in safetensors and JSON, never pickle.

A checkpoint is `step-NNNNNNN/`, written under a temporary name and renamed (`apr.atomic`), so
the latest complete one is the newest directory with its `trainer.json`. SFT and GRPO share
these, and a resumed run truncates its metrics log back to the checkpoint's step.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from apr import atomic

log = logging.getLogger(__name__)


def save_checkpoint(directory: Path, model, optimizer, state: dict, keep: int) -> Path:
    from safetensors.torch import save_file

    final = directory / f"step-{state['step']:07d}"
    with atomic.partial_dir(final, replace="trainer.json") as partial:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
                  partial / "model.safetensors")
        opt = optimizer.state_dict()
        tensors = {f"{p}.{name}": value.detach().contiguous().cpu()
                   for p, slots in opt["state"].items() for name, value in slots.items()}
        save_file(tensors, partial / "optimizer.safetensors")
        groups = [{k: v for k, v in g.items()} for g in opt["param_groups"]]
        (partial / "optimizer.json").write_text(json.dumps({"param_groups": groups}))
        (partial / "trainer.json").write_text(json.dumps(state, indent=2))
    for old in sorted(directory.glob("step-???????"))[:-keep]:
        shutil.rmtree(old)
    return final


def complete_checkpoints(directory: Path) -> list[Path]:
    """Checkpoints written whole (with their trainer.json), oldest first."""
    return sorted(p for p in directory.glob("step-???????") if (p / "trainer.json").is_file())


def latest_checkpoint(directory: Path) -> Path | None:
    done = complete_checkpoints(directory)
    return done[-1] if done else None


def resume(directory: Path, model, optimizer, device) -> tuple[Path, dict] | None:
    """Load the newest checkpoint that loads; a damaged one (a disk that lost its tail, a
    file edited by hand) is skipped with a warning for the one before it."""
    from safetensors import SafetensorError

    for path in reversed(complete_checkpoints(directory)):
        try:
            return path, load_checkpoint(path, model, optimizer, device)
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
            log.warning("checkpoint %s does not load (%s): trying the one before it", path, e)
    return None


def check_fresh(directory: Path) -> None:
    """A run started without --resume must not train over an earlier run's checkpoints (it
    would retrain, then fail to write its own): say so before any work."""
    if complete_checkpoints(directory):
        raise FileExistsError(f"{directory} holds an earlier run's checkpoints: add --resume to "
                              "continue that run, or choose another --out")


def load_checkpoint(path: Path, model, optimizer, device) -> dict:
    import torch
    from safetensors.torch import load_file

    # Every file is read before anything is loaded: a damaged checkpoint changes nothing.
    weights = load_file(path / "model.safetensors", device=str(device))
    flat = load_file(path / "optimizer.safetensors", device=str(device))
    groups = json.loads((path / "optimizer.json").read_text())["param_groups"]
    trainer = json.loads((path / "trainer.json").read_text())
    state: dict[int, dict] = {}
    for key, value in flat.items():
        p, name = key.split(".", 1)
        state.setdefault(int(p), {})[name] = value
    model.load_state_dict(weights)
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    for slots in optimizer.state.values():  # Adam's step counters live on the CPU as float32
        if "step" in slots and slots["step"].dim() == 0:
            slots["step"] = slots["step"].to(torch.float32)
    return trainer


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines a killed run wrote after the checkpoint it is resumed from."""
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if _step(line) <= step]
        atomic.write_text(path, "".join(line + "\n" for line in lines))


def _step(line: str) -> float:
    """A log line's step; a line cut short by the kill (or not a record) counts as after."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


# --- a mirror in the store: a retried pod resumes where the last one stopped ------------
MIRROR_SLOTS = ("checkpoint-a", "checkpoint-b")  # alternate: one is always whole


def push_mirror(uri: str, checkpoint: Path, logs: list[Path], slot: int, staging: Path,
                settings=None) -> str:
    """Upload `checkpoint` (and the run's logs, as they are at its step) into slot `slot` of
    the mirror at `uri`; the other slot keeps the checkpoint before it complete meanwhile.
    `settings`: the store's S3Settings (None: from the environment)."""
    from apr.storage import upload

    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(checkpoint, staging / "checkpoint")
    for path in logs:
        if path.is_file():
            shutil.copyfile(path, staging / path.name)
    target = f"{uri}/{MIRROR_SLOTS[slot]}"
    upload(staging, target, settings)
    return target


def pull_mirror(uri: str, checkpoints: Path, run_dir: Path, logs: tuple[str, ...],
                settings=None) -> int | None:
    """Bring the newest complete slot of the mirror at `uri` back: its checkpoint into
    `checkpoints`, its logs into `run_dir`. Returns its step (None: nothing mirrored yet)."""
    from apr.storage import download, is_complete

    best = None
    for slot in MIRROR_SLOTS:
        if is_complete(f"{uri}/{slot}", settings):
            local = download(f"{uri}/{slot}", run_dir / "pulled" / slot, settings)
            step = json.loads((local / "checkpoint" / "trainer.json").read_text())["step"]
            if best is None or step > best[0]:
                best = (step, local)
    if best is None:
        return None
    step, local = best
    target = checkpoints / f"step-{step:07d}"
    if not target.exists():
        shutil.copytree(local / "checkpoint", target)
    for name in logs:
        if (local / name).is_file():
            shutil.copyfile(local / name, run_dir / name)
    return step
