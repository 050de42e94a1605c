"""The `apr` command: one subcommand per stage, each `apr <stage> --config FILE [--set k=v]`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

from apr.config import InputError, load
from apr.decode.engine import BATCHING
from apr.stages import CONFIGS
from apr.storage import StorageError

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
log = logging.getLogger("apr")


def _port(text: str) -> int:
    port = _int(text)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (1 to 65535)")
    return port


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _at_least(low: int):
    def parse(text: str) -> int:
        value = _int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}")
        return value
    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a positive number of seconds")
    return value


def _device(text: str) -> str:
    kind, _, index = text.partition(":")
    if kind not in ("auto", "cpu", "cuda") or (index and (kind != "cuda" or not index.isdigit())):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: auto, cpu, cuda or cuda:N")
    return text


def _http_url(text: str) -> str:
    if text and not text.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"{text!r} is not an http:// or https:// URL "
                                         "(e.g. http://127.0.0.1:30000)")
    return text


def _s3_uri(text: str) -> str:
    from apr.storage import split_uri

    try:
        split_uri(text)
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _add_config_args(parser: argparse.ArgumentParser, progress: bool = True) -> None:
    parser.add_argument("--config", help="a preset (local, gpu-small, paper) or a YAML file; defaults when omitted")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config field, e.g. "
                        "problems.train_size=1000 (repeatable)")
    if progress:
        parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _datagen(args: argparse.Namespace) -> int:
    from apr.stages import datagen

    config = load(datagen.DatagenConfig, args.config, datagen.SECTION, args.overrides)
    if args.problems_only:
        if args.part or args.problems:
            raise InputError("--problems-only draws the problems alone: leave out --part and "
                             "--problems")
        print(json.dumps(datagen.draw(config, args.out, progress=not args.no_progress), indent=2))
        log.info("problem set written to %s", args.out)
        return 0
    part = datagen.Part.parse(args.part) if args.part else None
    stats = datagen.run(config, args.out, progress=not args.no_progress, part=part,
                        problems=args.problems)
    print(json.dumps(stats, indent=2))
    log.info("%s written to %s", f"part {part}" if part else "dataset", args.out)
    return 0


def _datagen_merge(args: argparse.Namespace) -> int:
    from apr.stages import datagen_merge

    stats = datagen_merge.merge(args.parts, args.out)
    print(json.dumps(stats, indent=2))
    log.info("dataset of %d parts written to %s", stats["parts"], args.out)
    return 0


def _sft_node(args: argparse.Namespace) -> int:
    from apr.train import node

    return node.run(args.data, args.out, args.config, args.overrides, args.workdir)


def _sft(args: argparse.Namespace) -> int:
    from apr.stages import sft

    config = load(sft.SFTConfig, args.config, sft.SECTION, args.overrides)
    result = sft.run(config, args.data, args.out, resume=args.resume,
                     progress=not args.no_progress, mirror=args.mirror)
    print(json.dumps({"model": str(result.model_dir), "steps": result.steps,
                      "train_loss": result.final_train_loss, "val_loss": result.val_loss,
                      "train_sequences": result.train_sequences,
                      "dropped_sequences": result.dropped_sequences}, indent=2))
    return 0


def _grpo(args: argparse.Namespace) -> int:
    from apr.stages import grpo

    config = load(grpo.GRPOConfig, args.config, grpo.SECTION, args.overrides)
    result = grpo.run(config, args.model, args.problems, args.out, engine_url=args.engine_url,
                      weights_dir=args.weights_dir, resume=args.resume,
                      progress=not args.no_progress, workdir=args.workdir)
    print(json.dumps({"model": str(result.model_dir), "out": result.out, "steps": result.steps,
                      "initial_val_accuracy": result.initial_val_accuracy,
                      "val_accuracy": result.val_accuracy}, indent=2))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from apr.stages import evaluate

    config = load(evaluate.EvalConfig, args.config, evaluate.SECTION, args.overrides)
    metrics = evaluate.run(config, args.model, args.problems, args.out,
                           progress=not args.no_progress)
    print(json.dumps({name: {"accuracy": m["accuracy"]} for name, m in
                      metrics["settings"].items()}, indent=2))
    log.info("report: %s/report.md", args.out)
    return 0




def _load_config(stage: str, config: str | None, overrides: list[str]):
    import importlib

    module_name, class_name = CONFIGS[stage]
    module = importlib.import_module(module_name)
    return load(getattr(module, class_name), config, module.SECTION, overrides)


def _config(args: argparse.Namespace) -> int:
    from apr.config import show

    print(show(_load_config(args.config_stage, args.config, args.overrides)), end="")
    return 0


def _keys_epilog(stage: str) -> str:
    return f"keys: apr config show {stage} (--config PRESET --set KEY=VALUE for their values)"


def _publish(args: argparse.Namespace) -> int:
    from apr.stages import publish

    print(publish.run(args.model, args.store, args.name, args.version, replace=args.replace))
    return 0


def _pull(args: argparse.Namespace) -> int:
    from apr import storage

    print(storage.download(args.uri, args.out))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from apr.report import run_compare

    run_compare(args.apr, args.sos, args.out)
    log.info("report: %s/report.md", args.out)
    return 0


def _pipeline(args: argparse.Namespace) -> int:
    from apr.cluster import pipeline

    if args.pipeline_command == "compile":
        for path in pipeline.compile_all():
            print(path)
    elif args.pipeline_command == "rbac":
        import yaml

        from apr.cluster.rbac import rbac_manifests

        print(yaml.safe_dump_all(rbac_manifests(args.namespace, args.service_account),
                                 sort_keys=False), end="")
    elif args.pipeline_command == "submit":
        token = _token(args.token_file, "KF_PIPELINES_TOKEN")
        run = pipeline.submit(pipeline.Submission(
            host=args.host, arguments=args.arg, experiment=args.experiment,
            run_name=args.run_name, namespace=args.namespace, token=token,
            register=args.register, version=args.version, package=args.package))
        print(f"run {run.run_id} submitted to {args.host}")
    else:
        overrides = {"datagen": args.datagen_set, "sft": args.sft_set, "grpo": args.grpo_set,
                     "evaluate": args.evaluate_set}
        for stage in CONFIGS:  # as each task will load it: a typo fails now, not minutes later
            _load_config(stage, args.preset, overrides[stage])
        summary = pipeline.run_local(args.workdir, args.preset, args.store, overrides,
                                     verbose=args.verbose, datagen_pods=args.datagen_pods)
        if summary["metrics"]:
            from apr.report import nothing_solved_note
            from apr.report import summary as report_summary

            metrics = json.loads(open(summary["metrics"]).read())
            print(report_summary(metrics))
            note = nothing_solved_note(args.preset, metrics)
            if note:
                print(note)
        print(f"report: {summary['report']}")
    return 0


def _token(token_file: str | None, variable: str) -> str | None:
    """A bearer token: the file's content (a mounted Secret), else $variable, else None."""
    import os

    if not token_file:
        return os.environ.get(variable) or None
    try:
        token = Path(token_file).read_text().strip()
    except OSError as e:
        raise InputError(f"--token-file {token_file}: {e.strerror}") from None
    if not token:
        raise InputError(f"--token-file {token_file} is empty")
    return token


def _serve(args: argparse.Namespace) -> int:
    from apr.serve.app import ServerLimits, serve

    if args.engine == "sglang" and not args.engine_url:
        raise InputError(f"--engine {args.engine} needs --engine-url (e.g. http://127.0.0.1:30000)")
    if args.engine == "local" and not args.model:
        raise InputError("--engine local needs --model (a model directory)")
    token = _token(args.token_file, "APR_API_TOKEN")
    max_tokens = args.max_tokens or ServerLimits.max_tokens
    if args.engine == "local":
        from apr.model import positions

        limit = positions(args.model)
        if args.max_tokens is None:
            max_tokens = limit
        elif args.max_tokens > limit:
            raise InputError(f"--max-tokens {args.max_tokens} is beyond the {limit} positions of "
                             f"{args.model}: pass {limit} or less")
    limits = ServerLimits(max_concurrency=args.max_concurrency, max_queue=args.max_queue,
                          request_timeout_s=args.request_timeout, max_tokens=max_tokens)
    serve(args.engine, args.engine_url, args.model, args.host, args.port, limits, token=token,
          shutdown_timeout_s=args.shutdown_timeout)
    return 0


def _engine_serve(args: argparse.Namespace) -> int:
    from apr.decode.engine_server import serve

    serve(args.model, host=args.host, port=args.port, device=args.device,
          max_batch=args.max_batch, weight_version=args.weight_version, batching=args.batching,
          shutdown_timeout_s=args.shutdown_timeout)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apr", description="Adaptive Parallel Reasoning: data, training, decoding, serving")
    parser.add_argument("--log-level", default="info", choices=LOG_LEVELS,
                        help="status messages on stderr at this level and above (default info)")
    stages = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    p = stages.add_parser("datagen", help="Countdown problems, SoS+ and APR traces, tokenizer",
                          description="Generate problems and solver traces (see apr/stages/datagen.py).",
                          epilog=_keys_epilog("datagen"))
    _add_config_args(p)
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    p.add_argument("--part", metavar="I/N", help="write part I (from 0) of N, to be joined by "
                   "`apr datagen-merge`: every N-th trace file, from file I on")
    p.add_argument("--problems-only", action="store_true",
                   help="draw the problems alone (a problem set, for the parts to share)")
    p.add_argument("--problems", metavar="SET", help="solve the problems of a problem set "
                   "(from --problems-only, drawn with the same problems.* keys) instead of "
                   "drawing them")
    p.set_defaults(run=_datagen)

    p = stages.add_parser("datagen-merge", help="join the parts of `apr datagen --part I/N`",
                          description="Join dataset parts into one dataset "
                          "(see apr/stages/datagen_merge.py).")
    p.add_argument("parts", nargs="+", help="the part directories, all N of them")
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    p.set_defaults(run=_datagen_merge)

    p = stages.add_parser("sft", help="supervised training on APR or SoS+ threads",
                          description="Train the model from scratch (see apr/stages/sft.py).",
                          epilog=_keys_epilog("sft"))
    _add_config_args(p)
    p.add_argument("--data", required=True, help="an `apr datagen` output directory")
    p.add_argument("--out", required=True, help="run directory (model/, checkpoints/, logs)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the last complete checkpoint in --out")
    p.add_argument("--mirror", default=None, type=_s3_uri, metavar="S3_URI",
                   help="also upload each checkpoint here; --resume with no checkpoint in "
                   "--out starts from the newest one here (S3 settings from the environment)")
    p.set_defaults(run=_sft)

    p = stages.add_parser("sft-node", help="one node of a multi-node SFT (a TrainJob's pods)",
                          description="Fetch the data, run `apr sft` under torchrun with the "
                          "PET_* rendezvous variables, publish the model from node 0 "
                          "(see apr/train/node.py).")
    p.add_argument("--data", required=True, help="the dataset artifact (s3:// URI or directory)")
    p.add_argument("--out", required=True,
                   help="where checkpoints/ and result/ go (s3:// URI or directory)")
    p.add_argument("--config", required=True, help="the preset or YAML file `apr sft` takes")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override an sft config field (repeatable)")
    p.add_argument("--workdir", default="/tmp/apr-sft", help="local scratch: data and run")
    p.set_defaults(run=_sft_node)

    p = stages.add_parser("grpo", help="RL over parent and child threads with a rollout server",
                          description="GRPO from an SFT model (see apr/stages/grpo.py).",
                          epilog=_keys_epilog("grpo"))
    _add_config_args(p)
    p.add_argument("--model", required=True, help="the SFT model: a directory or s3:// URI")
    p.add_argument("--problems", required=True,
                   help="an `apr datagen` output (directory or s3:// URI) or problems JSONL")
    p.add_argument("--out", required=True, help="run directory or s3:// URI (model/, logs)")
    p.add_argument("--engine-url", default=None, help="a running rollout server (SGLang or "
                   "`apr engine serve`); without it this run starts one and stops it after")
    p.add_argument("--weights-dir", default=None, help="where new weights are written for the "
                   "server to load (a directory both see; default: <out>/weights)")
    p.add_argument("--workdir", default=None, help="local work directory when --out is s3://")
    p.add_argument("--resume", action="store_true",
                   help="continue from the last complete checkpoint of --out")
    p.set_defaults(run=_grpo)

    p = stages.add_parser("evaluate", help="APR against SoS+: accuracy, tokens, latency, plots",
                          description="Evaluate a model on a problem split (see apr/stages/evaluate.py).",
                          epilog=_keys_epilog("evaluate"))
    _add_config_args(p)
    p.add_argument("--model", help="a model directory (not needed by the oracle or HTTP engines)")
    p.add_argument("--problems", required=True, help="an `apr datagen` output or problems JSONL")
    p.add_argument("--out", required=True, help="output directory: new, empty, or an earlier "
                   "evaluation (replaced once this one is complete)")
    p.set_defaults(run=_evaluate)

    p = stages.add_parser("config", help="a stage's config keys: value and meaning")
    commands = p.add_subparsers(dest="config_command", required=True, metavar="COMMAND")
    c = commands.add_parser("show", help="one line per key: `key  value  # doc`; the defaults, "
                            "or the values of --config and --set",
                            description="Print every key of a stage's config with its value "
                            "and what it means; without --config, the defaults.")
    c.add_argument("config_stage", metavar="STAGE", choices=list(CONFIGS),
                   help=", ".join(CONFIGS))
    _add_config_args(c, progress=False)
    c.set_defaults(run=_config)

    p = stages.add_parser("compare", help="the APR against SoS+ report of two evaluations")
    p.add_argument("--apr", required=True, help="`apr evaluate` output of the APR model")
    p.add_argument("--sos", required=True, help="`apr evaluate` output of the SoS+ model")
    p.add_argument("--out", required=True)
    p.set_defaults(run=_compare)

    p = stages.add_parser("publish", help="upload a model to <store>/models/<name>/<version>/")
    p.add_argument("--model", required=True, help="a model directory")
    p.add_argument("--store", required=True, help="s3://bucket[/prefix] or a local directory")
    p.add_argument("--name", default="apr-countdown")
    p.add_argument("--version", required=True)
    p.add_argument("--replace", action="store_true",
                   help="publish over an existing version (versions are immutable otherwise)")
    p.set_defaults(run=_publish)

    p = stages.add_parser("pull", help="download a published artifact (checked against its manifest)")
    p.add_argument("--uri", required=True, help="s3://bucket/models/<name>/<version> or a directory")
    p.add_argument("--out", required=True, help="local directory: new, empty, or an earlier pull (replaced once complete)")
    p.set_defaults(run=_pull)

    p = stages.add_parser("pipeline", help="the Kubeflow pipeline: compile, submit, run locally")
    commands = p.add_subparsers(dest="pipeline_command", required=True, metavar="COMMAND")
    commands.add_parser("compile", help="write pipelines/apr_pipeline.yaml (for the Kubeflow "
                        "UI) and components/<stage>.yaml")
    c = commands.add_parser("rbac", help="the Role that lets pipeline steps run GRPO Jobs "
                            "(pipe it to `kubectl apply -f -`)")
    c.add_argument("--namespace", default="kubeflow")
    c.add_argument("--service-account", default="pipeline-runner")
    c = commands.add_parser("submit", help="upload and run the compiled pipeline (kfp.Client)")
    c.add_argument("--host", required=True, help="the KFP API, e.g. http://localhost:8080")
    c.add_argument("--package", default=None, help="a compiled pipeline (default: the "
                   "checkout's pipelines/apr_pipeline.yaml)")
    c.add_argument("--experiment", default="apr")
    c.add_argument("--arg", action="append", default=[], metavar="NAME=VALUE",
                   help="a pipeline parameter, e.g. preset=gpu-small or "
                   "sft_overrides=[max_steps=100] (repeatable; typed as the pipeline declares)")
    c.add_argument("--run-name", default=None, help="the run's name in the UI")
    c.add_argument("--namespace", default=None, help="the Kubeflow profile (multi-user)")
    c.add_argument("--token-file", default=None,
                   help="a bearer token for the KFP API, e.g. a service-account token "
                   "(default: $KF_PIPELINES_TOKEN, else none)")
    c.add_argument("--register", default=None, metavar="NAME",
                   help="register the package as pipeline NAME (a new version when it exists) "
                   "and run that version, so it is listed in the UI")
    c.add_argument("--version", default=None,
                   help="the registered version's name (default: v<date>-<time>)")
    c = commands.add_parser("run", help="run the pipeline here through kfp.local")
    c.add_argument("--local", action="store_true", required=True,
                   help="use kfp.local's SubprocessRunner (the only runner here)")
    c.add_argument("--preset", default="local")
    c.add_argument("--workdir", default="runs/pipeline", help="pipeline root and local store")
    c.add_argument("--store", default=None, help="publish to this s3:// URI instead")
    c.add_argument("--datagen-pods", type=int, default=1, metavar="N",
                   help="write the traces in N parts side by side, then join them (the "
                   "pipeline's datagen_pods)")
    c.add_argument("--verbose", action="store_true",
                   help="stream every task's log here (default: a line per task, the logs in "
                   "WORKDIR/pipeline.log)")
    for stage in ("datagen", "sft", "grpo", "evaluate"):
        c.add_argument(f"--{stage}-set", action="append", default=[], metavar="KEY=VALUE",
                       help=f"override a {stage} config field (repeatable)")
    p.set_defaults(run=_pipeline)

    p = stages.add_parser("serve", help="the APR server: POST /v1/solve, /healthz, /readyz, /metrics")
    p.add_argument("--engine", default="sglang", choices=["sglang", "local"],
                   help="sglang: the HTTP client of SGLang (or `apr engine serve`) at "
                        "--engine-url; local: the model in this process")
    p.add_argument("--engine-url", default="", type=_http_url,
                   help="the SGLang (or `apr engine serve`) URL")
    p.add_argument("--model", help="a model directory, for --engine local")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--max-concurrency", type=_at_least(1), default=64,
                   help="solves decoded at once")
    p.add_argument("--max-queue", type=_at_least(0), default=256,
                   help="solves waiting for a slot; beyond it a 429 (Retry-After)")
    p.add_argument("--request-timeout", type=_seconds, default=120.0, help="seconds per solve")
    p.add_argument("--max-tokens", type=_at_least(16), default=None,
                   help="context window of each thread (default: the model's positions with "
                   "--engine local, else 4096)")
    p.add_argument("--shutdown-timeout", type=_seconds, default=25.0,
                   help="seconds requests get to finish after SIGTERM (keep it under the pod's "
                   "terminationGracePeriodSeconds)")
    p.add_argument("--token-file", help="require `Authorization: Bearer <token>` with the token "
                   "in this file (a mounted Secret); default: $APR_API_TOKEN, else no auth")
    p.set_defaults(run=_serve)

    p = stages.add_parser("engine", help="generation engines (serve the SGLang-compatible API)")
    engine = p.add_subparsers(dest="engine_command", required=True, metavar="COMMAND")
    serve = engine.add_parser("serve", help="SGLang's HTTP subset over the local engine")
    serve.add_argument("--model", required=True, help="a model directory (apr sft's model/)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=_port, default=30000)
    serve.add_argument("--device", default="auto", type=_device, help="auto, cpu, cuda or cuda:N")
    serve.add_argument("--max-batch", type=_at_least(1), default=64, help="rows per decoding batch")
    serve.add_argument("--batching", default="auto", choices=BATCHING,
                       help="decode loop: shrink (rows leave the batch as they end; CPU default) "
                            "or generate (transformers' static cache; CUDA default)")
    serve.add_argument("--shutdown-timeout", type=_seconds, default=25.0,
                       help="seconds requests get to finish after SIGTERM")
    serve.add_argument("--weight-version", default="default",
                       help="the version reported for the weights loaded at start (as SGLang)")
    serve.set_defaults(run=_engine_serve)
    _log_level_after_commands(parser)
    return parser


def _log_level_after_commands(parser: argparse.ArgumentParser) -> None:
    """`--log-level` also after a command (`apr serve ... --log-level debug`, as the Helm
    chart's `server.extraArgs` append it); not given there, the top-level value stands."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if not any("--log-level" in a.option_strings for a in sub._actions):
                    sub.add_argument("--log-level", choices=LOG_LEVELS, default=argparse.SUPPRESS,
                                     help="as `apr --log-level`")
                _log_level_after_commands(sub)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The only place logging is configured: the library and the servers only log.
    logging.basicConfig(format=LOG_FORMAT, stream=sys.stderr)
    logging.getLogger().setLevel(args.log_level.upper())
    for name in ("httpx", "uvicorn.access"):  # a line per HTTP request (engine calls, probes):
        logging.getLogger(name).setLevel(logging.WARNING if args.log_level == "info"  # not at info
                                         else logging.NOTSET)
    try:
        return args.run(args)
    except (InputError, FileExistsError, FileNotFoundError, StorageError) as e:
        print(f"apr {args.stage}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine refused: a path under a file, no permission, a full disk
        where = f"{e.filename}: " if e.filename else ""
        print(f"apr {args.stage}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # a stage's own fault report (GRPOError, RolloutServerError, ...)
        if type(e).__module__.startswith("apr."):
            print(f"apr {args.stage}: error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
