"""The `apr` command: one subcommand per stage, each `apr <stage> --config FILE [--set k=v]`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from apr.config import ConfigError, load


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apr", description="Adaptive Parallel Reasoning: data, training, decoding, serving")
    stages = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    p = stages.add_parser("datagen", help="Countdown problems, SoS+ and APR traces, tokenizer",
                          description="Generate problems and solver traces (see apr/datagen.py).")
    _add_config_args(p)
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    p.set_defaults(run=_datagen)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ConfigError, FileExistsError, FileNotFoundError) as e:
        print(f"apr {args.stage}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
