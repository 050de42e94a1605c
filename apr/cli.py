"""The `apr` command: one subcommand per stage, each `apr <stage> --config FILE [--set k=v]`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from apr.config import InputError, load


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="preset YAML (configs/*.yaml); defaults when omitted")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config field, e.g. "
                        "problems.train_size=1000 (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _datagen(args: argparse.Namespace) -> int:
    from apr import datagen

    config = load(datagen.DatagenConfig, args.config, datagen.SECTION, args.overrides)
    stats = datagen.run(config, args.out, progress=not args.no_progress)
    print(json.dumps(stats, indent=2))
    print(f"dataset written to {args.out}", file=sys.stderr)
    return 0


def _sft(args: argparse.Namespace) -> int:
    from apr import sft

    config = load(sft.SFTConfig, args.config, sft.SECTION, args.overrides)
    result = sft.run(config, args.data, args.out, resume=args.resume,
                     progress=not args.no_progress)
    print(json.dumps({"model": str(result.model_dir), "steps": result.steps,
                      "train_loss": result.final_train_loss, "val_loss": result.val_loss,
                      "train_sequences": result.train_sequences,
                      "dropped_sequences": result.dropped_sequences}, indent=2))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from apr import evaluate

    config = load(evaluate.EvalConfig, args.config, evaluate.SECTION, args.overrides)
    metrics = evaluate.run(config, args.model, args.problems, args.out,
                           progress=not args.no_progress)
    print(json.dumps({name: {"accuracy": m["accuracy"]} for name, m in
                      metrics["settings"].items()}, indent=2))
    print(f"report: {args.out}/report.md", file=sys.stderr)
    return 0


def _engine_serve(args: argparse.Namespace) -> int:
    from apr.engine.server import serve

    serve(args.model, host=args.host, port=args.port, device=args.device,
          max_batch=args.max_batch)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apr", description="Adaptive Parallel Reasoning: data, training, decoding, serving")
    stages = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    p = stages.add_parser("datagen", help="Countdown problems, SoS+ and APR traces, tokenizer",
                          description="Generate problems and solver traces (see apr/datagen.py).")
    _add_config_args(p)
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    p.set_defaults(run=_datagen)

    p = stages.add_parser("sft", help="supervised training on APR or SoS+ threads",
                          description="Train the model from scratch (see apr/sft.py).")
    _add_config_args(p)
    p.add_argument("--data", required=True, help="an `apr datagen` output directory")
    p.add_argument("--out", required=True, help="run directory (model/, checkpoints/, logs)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the last complete checkpoint in --out")
    p.set_defaults(run=_sft)

    p = stages.add_parser("evaluate", help="APR against SoS+: accuracy, tokens, latency, plots",
                          description="Evaluate a model on a problem split (see apr/evaluate.py).")
    _add_config_args(p)
    p.add_argument("--model", help="a model directory (not needed by the oracle or HTTP engines)")
    p.add_argument("--problems", required=True, help="an `apr datagen` output or problems JSONL")
    p.add_argument("--out", required=True, help="output directory (replaced when complete)")
    p.set_defaults(run=_evaluate)

    p = stages.add_parser("engine", help="generation engines (serve the SGLang-compatible API)")
    engine = p.add_subparsers(dest="engine_command", required=True, metavar="COMMAND")
    serve = engine.add_parser("serve", help="SGLang's HTTP subset over the local engine")
    serve.add_argument("--model", required=True, help="a model directory (apr sft's model/)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=30000)
    serve.add_argument("--device", default="auto", help="auto, cpu or cuda")
    serve.add_argument("--max-batch", type=int, default=64, help="rows per decoding batch")
    serve.set_defaults(run=_engine_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (InputError, FileExistsError, FileNotFoundError) as e:
        print(f"apr {args.stage}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
