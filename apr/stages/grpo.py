"""GRPO over parent and child threads, with rollouts decoded by a separate server.

    apr grpo --config local --model runs/x/sft-apr/model --problems runs/x/data --out runs/x/grpo

Each step: pick `prompts_per_step` training problems (a seeded order, so a resumed run sees
the same ones), decode `group_size` rollouts of each through the APR runtime (or SoS+) on the
rollout server, reward 1 when the verifier accepts the answer, normalise rewards within each
group, and train every sampled token of every thread of a rollout (parent segments and
children; never prompts or the runtime's join text) with that rollout's advantage: PPO's
clipped ratio against the sampling policy plus a KL penalty to the frozen SFT model, averaged
over tokens, for `inner_steps` optimizer steps. Then the new weights go to the server
(safetensors in a shared directory, then SGLang's pause / update_weights_from_disk /
continue) as `weight_version` = the step, and the next rollouts must report that version.

The server is SGLang as a sidecar in the cluster (`apr/cluster/grpo_job.py`), or a subprocess this run
starts (`apr/decode/rollout_server.py`). Engine faults end the run with a checkpoint to `--resume` from.
The sampling policy's log-probs are the trainer's own at the first inner step (it holds the
exact weights the server was sent); the server's log-probs are compared with them every step
(`logprob_gap`), a live check that the server samples from the trainer's weights.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from apr import model as model_lib
from apr.config import check, check_choice, check_range, dump, option
from apr.countdown.threads import APR, STYLES
from apr.decode.rollout_server import KINDS
from apr.rl.losses import group_advantages
from apr.rl.trainer import Trainer, push_weights
from apr.train.checkpoints import MIRROR_SLOTS, check_fresh, pull_mirror, push_mirror

if TYPE_CHECKING:
    from apr.decode.runtime import Budgets

log = logging.getLogger(__name__)

SECTION = "grpo"
LOSS_AVERAGES = ("token", "rollout")
LOGS = ("metrics.jsonl", "rollouts.jsonl")  # mirrored with each checkpoint


class GRPOError(RuntimeError):
    """The run stopped on an infrastructure fault; a checkpoint to resume from was kept."""


@dataclass
class GRPOConfig:
    """Defaults are the paper's public recipe (its tinyrl configs); presets shorten it."""

    mode: str = option("apr", 'rollouts through the APR runtime, or serialized "sos"')
    group_size: int = option(5, "rollouts per problem, whose rewards are normalised together "
                             "(paper: 5)")
    prompts_per_step: int = option(64, "training problems per step (paper: 64)")
    steps: int = option(150, "GRPO steps (paper: 150)")
    lr: float = option(1e-5, "AdamW learning rate (paper: 1e-5)")
    warmup_steps: int = option(0, "steps of linear warmup to `lr`")
    weight_decay: float = option(0.0, "AdamW weight decay")
    clip: float = option(0.2, "PPO ratio clip (paper: 0.2)")
    kl_beta: float = option(0.001, "weight of the KL to the frozen SFT model (paper: 0.001)")
    inner_steps: int = option(2, "optimizer passes over each batch of rollouts")
    loss_average: str = option("token", '"token" (the paper\'s recipe) or "rollout" '
                               "(each rollout weighs the same)")
    temperature: float = option(1.0, "sampling temperature of the rollouts (paper: 1.0)")
    grad_clip: float = option(1.0, "gradient norm clip")
    context: int = option(4096, "tokens any one thread may hold (paper: 4096)")
    budget: int = option(0, "the rollouts' budget prefix, for a model trained on datagen's "
                         "budget_prefix: `Sub Call Budget: N` (apr), `Token Budget: N` (sos); "
                         "0: none")
    children_per_spawn: int = option(0, "children run per spawn (the rest join as No Solution);"
                                     " 0: every child the parent asks for")
    tokens_per_batch: int = option(65_536, "tokens per training micro-batch, padding included")
    pad_multiple: int = option(64, "batch widths are rounded up to this (fewer compiled shapes)")
    val_every: int = option(10, "steps between greedy validation accuracies (and at start "
                            "and end)")
    val_problems: int = option(200, "validation problems (0: no validation)")
    val_samples: int = option(0, "sampled solves per val problem at `temperature`, beside "
                              "greedy")
    checkpoint_every: int = option(10, "steps between checkpoints (and at the end)")
    keep_checkpoints: int = option(2, "complete checkpoints kept; older ones are deleted")
    seed: int = option(0, "seed of the problem order and the batch order")
    dtype: str = option("auto", '"auto": bf16 autocast on CUDA, fp32 on CPU; or bf16, fp32')
    sidecar: str = option("auto", "the server this run starts without --engine-url: auto, "
                          "sglang, engine-serve")
    sidecar_device: str = option("auto", "device of the started server: auto, cpu or cuda")
    sidecar_python: str = option("", "interpreter that starts SGLang (its own environment, e.g. "
                                 "what `make sglang` prints); empty: $APR_SGLANG_PYTHON, else "
                                 "this one")
    sidecar_startup_s: float = option(600.0, "seconds the rollout server may take to be ready")
    engine_timeout_s: float = option(600.0, "seconds one HTTP request to the rollout server "
                                     "may take")

    def validate(self) -> None:
        check_choice("mode", self.mode, STYLES)
        check_choice("dtype", self.dtype, ("auto", "bf16", "fp32"))
        check_choice("sidecar", self.sidecar, KINDS)
        check_choice("loss_average", self.loss_average, LOSS_AVERAGES)
        check_range("group_size", self.group_size, 2)
        for key in ("prompts_per_step", "steps", "inner_steps", "val_every", "checkpoint_every",
                    "keep_checkpoints", "pad_multiple"):
            check_range(key, getattr(self, key), 1)
        check_range("lr", self.lr, 0.0)
        check_range("warmup_steps", self.warmup_steps, 0)
        check_range("clip", self.clip, 0.0, 1.0)
        check_range("kl_beta", self.kl_beta, 0.0)
        check_range("temperature", self.temperature, 0.0)
        check(self.temperature > 0, "temperature", "GRPO needs sampled rollouts: set it above 0")
        check_range("context", self.context, 16)
        check_range("children_per_spawn", self.children_per_spawn, 0)
        check_range("budget", self.budget, 0)
        check(self.tokens_per_batch >= self.context, "tokens_per_batch",
              f"{self.tokens_per_batch} cannot hold one {self.context}-token thread: "
              "make it at least `context`")
        check_range("val_problems", self.val_problems, 0)
        check_range("val_samples", self.val_samples, 0)
        check_range("sidecar_startup_s", self.sidecar_startup_s, 1.0)
        check_range("engine_timeout_s", self.engine_timeout_s, 1.0)

    def budgets(self) -> Budgets:
        """The runtime's budgets of every rollout and validation solve."""
        from apr.decode.runtime import Budgets

        prefix = {"sub_call_budget" if self.mode == APR else "token_budget": self.budget}
        return Budgets(context=self.context, children_per_spawn=self.children_per_spawn,
                       **prefix)


# --- the run's pieces --------------------------------------------------------------------
def step_problems(n: int, per_step: int, seed: int, step: int) -> list[int]:
    """The training problems of `step`: epochs of seeded permutations, read in order."""
    out, cache = [], {}
    for i in range(step * per_step, (step + 1) * per_step):
        epoch, position = divmod(i, n)
        if epoch not in cache:
            cache[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
        out.append(int(cache[epoch][position]))
    return out


@dataclass
class RunPaths:
    """Where the run works (always local) and where it publishes (local or s3://)."""

    out: str
    local: Path

    @classmethod
    def of(cls, out: str | Path, workdir: str | Path | None) -> RunPaths:
        from apr.storage import is_remote

        if not is_remote(out):
            return cls(str(out), Path(out))
        digest = hashlib.sha256(str(out).encode()).hexdigest()[:12]
        base = Path(workdir) if workdir else Path(tempfile.gettempdir()) / "apr-grpo"
        return cls(str(out), base / digest)

    @property
    def remote(self) -> bool:
        from apr.storage import is_remote

        return is_remote(self.out)


def _fetch(uri: str | Path, local: Path) -> Path:
    """A local copy of a model or data artifact (downloaded and verified when remote)."""
    from apr.storage import download, is_remote

    if not is_remote(uri):
        return Path(uri)
    return local if local.is_dir() else download(uri, local)


async def validate(engine, problems: list[dict], config: GRPOConfig, version: str) -> dict:
    """Greedy accuracy on the validation problems, through the same runtime and server, and
    with `val_samples` the mean reward of sampled solves: what GRPO optimises, and steadier
    than a small model's argmax, whose solved set reshuffles at a tiny KL."""
    from apr.decode.runtime import solve_apr, solve_sos
    from apr.rl.rollouts import check_version

    if not problems:
        return {}
    solver = solve_apr if config.mode == APR else solve_sos
    budgets = config.budgets()
    k = config.val_samples
    jobs = [solver(engine, p["nums"], p["target"], budgets, 0.0) for p in problems]
    jobs += [solver(engine, p["nums"], p["target"], budgets, config.temperature)
             for p in problems for _ in range(k)]
    solves = await asyncio.gather(*jobs)
    check_version(solves, version)
    greedy, sampled = solves[:len(problems)], solves[len(problems):]
    result = {"val_accuracy": round(sum(s.correct for s in greedy) / len(greedy), 4),
              "val_children": round(sum(s.children for s in greedy) / len(greedy), 3),
              # which ones: two validations compare problem by problem, not only in total
              "val_solved": [i for i, s in enumerate(greedy) if s.correct]}
    if k:
        per_problem = [sum(s.correct for s in sampled[i * k:(i + 1) * k])
                       for i in range(len(problems))]
        result |= {"val_reward": round(sum(per_problem) / (k * len(problems)), 4),
                   "val_sampled_solved": per_problem}  # of k, problem by problem
    return result


# --- the run -----------------------------------------------------------------------------
@dataclass
class GRPOResult:
    model_dir: Path  # local
    out: str  # where the run was published (a directory or s3:// URI)
    steps: int
    val_accuracy: float | None
    initial_val_accuracy: float | None


def run(config: GRPOConfig, model: str | Path, problems: str | Path, out: str | Path,
        engine_url: str | None = None, weights_dir: str | Path | None = None,
        resume: bool = False, progress: bool = True, workdir: str | Path | None = None
        ) -> GRPOResult:
    """Train; writes `out/model`, `out/metrics.jsonl`, `out/rollouts.jsonl`, `out/grpo.json`
    and checkpoints. Without `engine_url` the rollout server is started here and stopped after."""
    from apr.shutdown import sigterm_as_exit

    with sigterm_as_exit():
        return asyncio.run(_run(config, model, problems, out, engine_url, weights_dir, resume,
                                progress, workdir))


async def _run(config, model, problems, out, engine_url, weights_dir, resume, progress,
               workdir) -> GRPOResult:
    from apr.dataset import load_problems
    from apr.decode.rollout_server import RolloutServer

    paths = RunPaths.of(out, workdir)
    local = paths.local
    if (local / "model" / "config.json").is_file() and not resume and not paths.remote:
        raise FileExistsError(f"{out} already holds a trained model: choose another --out")
    if not resume and not paths.remote:  # a remote run's workdir is scratch
        check_fresh(local / "checkpoints")
    if not str(model).startswith("s3://"):
        model_lib.check_directory(model)  # before anything is written
    local.mkdir(parents=True, exist_ok=True)
    model_dir = model_lib.check_directory(_fetch(model, local / "initial"))
    data = _fetch(problems, local / "problems")
    train = load_problems(data, "train", 1 << 40)
    val = load_problems(data, "val", config.val_problems) if config.val_problems else []
    (local / "config.yaml").write_text(dump(config, SECTION))
    trainer = Trainer(model_dir, config)
    state = _restore(paths, trainer, resume)
    weights = Path(weights_dir) if weights_dir else local / "weights"
    weights.mkdir(parents=True, exist_ok=True)
    sidecar = None
    if not engine_url:
        sidecar = RolloutServer(model_dir, local / "sidecar.log", config.sidecar,
                                device=config.sidecar_device, python=config.sidecar_python,
                                startup_timeout_s=config.sidecar_startup_s).start()
    try:
        return await _loop(config, paths, trainer, state, train, val, weights,
                           engine_url or sidecar.url, sidecar, progress)
    finally:
        if sidecar is not None:
            sidecar.stop()


def _restore(paths: RunPaths, trainer: Trainer, resume: bool) -> dict:
    from apr.train.checkpoints import resume as resume_checkpoint
    from apr.train.checkpoints import truncate_log

    checkpoints = paths.local / "checkpoints"
    if resume and paths.remote:
        _pull_remote_checkpoint(paths)
    state = {"step": 0, "initial_val_accuracy": None, "val_accuracy": None}
    if resume and (restored := resume_checkpoint(checkpoints, trainer.policy, trainer.optimizer,
                                        trainer.device)) is not None:
        latest, state = restored
        for name in ("metrics.jsonl", "rollouts.jsonl"):
            truncate_log(paths.local / name, state["step"])
        log.info("resumed from %s (step %d)", latest, state["step"])
    return state


def _pull_remote_checkpoint(paths: RunPaths) -> None:
    """Bring the newer of the two remote checkpoint slots (and the logs) back to the workdir."""
    pull_mirror(paths.out, paths.local / "checkpoints", paths.local, LOGS)


async def _loop(config, paths, trainer, state, train, val, weights, url, sidecar, progress
                ) -> GRPOResult:
    import httpx
    from tqdm import tqdm

    from apr.decode.engine import EngineError
    from apr.decode.rollout_server import RolloutServerError
    from apr.decode.sglang import SGLangEngine
    from apr.rl.rollouts import StalePolicy, check_version, collect, training_rows

    engine = SGLangEngine(url, timeout_s=config.engine_timeout_s)
    budgets = config.budgets()
    metrics = open(paths.local / "metrics.jsonl", "a")
    rollout_log = open(paths.local / "rollouts.jsonl", "a")
    bar = tqdm(total=config.steps, initial=state["step"], desc="grpo", unit="step",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)

    def write(log, record: dict) -> None:
        log.write(json.dumps(record) + "\n")
        log.flush()

    async def validation(step: int) -> None:
        result = await validate(engine, val, config, str(step))
        if result:
            write(metrics, {"step": step, **result})
            state["val_accuracy"] = result["val_accuracy"]
            if step == 0:
                state["initial_val_accuracy"] = result["val_accuracy"]

    try:
        await _wait_ready(engine, config.sidecar_startup_s, sidecar)
        await push_weights(engine, trainer, weights, state["step"])
        if state["step"] == 0:
            await validation(0)
        while state["step"] < config.steps:
            step = state["step"]
            started = time.perf_counter()
            batch = [train[i] for i in step_problems(len(train), config.prompts_per_step,
                                                     config.seed, step)]
            rollouts = await collect(engine, batch, config.group_size, config.mode, budgets,
                                     config.temperature)
            check_version((r.solve for r in rollouts), str(step))
            rollout_s = time.perf_counter() - started
            advantages = _advantages(rollouts)
            rows = training_rows(rollouts, advantages)
            stats = trainer.update(rows, step)
            train_s = time.perf_counter() - started - rollout_s
            state["step"] = step + 1
            await push_weights(engine, trainer, weights, state["step"])
            sync_s = time.perf_counter() - started - rollout_s - train_s
            for r in rollouts:
                write(rollout_log, r.record(step))
            n = len(rollouts)
            groups = {}
            for r in rollouts:
                groups.setdefault(r.group, set()).add(r.reward)
            record = {"step": state["step"], "weight_version": str(step),
                      "reward": round(sum(r.reward for r in rollouts) / n, 4),
                      "groups_with_signal": round(sum(len(v) > 1 for v in groups.values())
                                                  / len(groups), 4),
                      "children_per_rollout": round(sum(r.solve.children for r in rollouts) / n, 3),
                      "generated_tokens": sum(r.solve.tokens_generated for r in rollouts),
                      "rows": len(rows), **stats,
                      "rollout_s": round(rollout_s, 3), "train_s": round(train_s, 3),
                      "sync_s": round(sync_s, 3)}
            write(metrics, record)
            bar.update(1)
            bar.set_postfix(reward=record["reward"], val=state["val_accuracy"])
            last = state["step"] == config.steps
            if state["step"] % config.val_every == 0 or last:
                await validation(state["step"])
            if state["step"] % config.checkpoint_every == 0 or last:
                _checkpoint(paths, trainer, state, config)
    except (EngineError, StalePolicy, RolloutServerError, httpx.HTTPError) as error:
        cause: Exception = error
        if sidecar is not None:
            try:
                sidecar.check_alive()  # a dead server explains an unreachable one
            except RolloutServerError as died:
                cause = died
        where = _checkpoint(paths, trainer, state, config)
        raise GRPOError(f"GRPO stopped at step {state['step']}: {cause}\nA checkpoint of step "
                        f"{state['step']} is at {where}: fix the rollout server and run the "
                        "same command with --resume") from cause
    finally:
        bar.close()
        metrics.close()
        rollout_log.close()
        await engine.close()
    return _finish(paths, trainer, state)


async def _wait_ready(engine, timeout_s: float, sidecar) -> None:
    """An external server (the cluster's sidecar) may still be loading: wait for it."""
    from apr.decode.engine import EngineError

    deadline = time.monotonic() + timeout_s
    while not await engine.ready():
        if sidecar is not None:
            sidecar.check_alive()
        if time.monotonic() > deadline:
            raise EngineError(f"the rollout server at {engine.base_url} was not ready within "
                              f"{timeout_s:.0f} s")
        await asyncio.sleep(1.0)


def _advantages(rollouts) -> list[float]:
    import torch

    rewards = torch.tensor([r.reward for r in rollouts])
    groups = torch.tensor([r.group for r in rollouts])
    return group_advantages(rewards, groups).tolist()


def _checkpoint(paths: RunPaths, trainer: Trainer, state: dict, config: GRPOConfig) -> str:
    """A checkpoint of the current state (kept locally, and in a remote slot when the run
    publishes to s3://, alternating so that one slot is always complete)."""
    from apr.train.checkpoints import save_checkpoint

    existing = paths.local / "checkpoints" / f"step-{state['step']:07d}"
    if (existing / "trainer.json").is_file():  # this state is saved already (a fault after it)
        return f"{paths.out}/{MIRROR_SLOTS[state['slot']]}" if paths.remote else str(existing)
    if paths.remote:
        state["slot"] = (state.get("slot", 1) + 1) % 2  # recorded in the checkpoint it names
    local = save_checkpoint(paths.local / "checkpoints", trainer.policy, trainer.optimizer,
                            state, config.keep_checkpoints)
    if not paths.remote:
        return str(local)
    return push_mirror(paths.out, local, [paths.local / log for log in LOGS], state["slot"],
                       paths.local / "upload")


def _finish(paths: RunPaths, trainer: Trainer, state: dict) -> GRPOResult:
    from apr.storage import upload

    model_dir = model_lib.save(trainer.policy, paths.local / "model",
                               origin={"stage": "grpo", "step": state["step"],
                                       "from": trainer.start})
    summary = {"steps": state["step"], "val_accuracy": state["val_accuracy"],
               "initial_val_accuracy": state["initial_val_accuracy"]}
    (paths.local / "grpo.json").write_text(json.dumps(summary, indent=2) + "\n")
    if paths.remote:
        upload(model_dir, f"{paths.out}/model")
        logs = paths.local / "logs"
        logs.mkdir(exist_ok=True)
        for name in ("metrics.jsonl", "rollouts.jsonl", "grpo.json", "config.yaml", "sidecar.log"):
            if (paths.local / name).is_file():
                (logs / name).write_bytes((paths.local / name).read_bytes())
        upload(logs, f"{paths.out}/logs")
    return GRPOResult(model_dir, paths.out, state["step"], state["val_accuracy"],
                      state["initial_val_accuracy"])
