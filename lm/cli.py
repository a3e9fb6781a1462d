"""`lm <command>`: the command-line entry point."""

from __future__ import annotations

import argparse
import sys

from lm.config import ConfigError, load_config

_USAGE_ERRORS = (ConfigError, FileNotFoundError, ValueError)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in [
        ("pretrain", "pretrain a causal language model (resumes an existing run dir)"),
        ("bench", "measure train-step tokens/s and MFU on synthetic batches"),
    ]:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--config", help="YAML file (see configs/)")
        sub.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.lr=3e-4")
        if name == "bench":
            sub.add_argument("--steps", type=int, default=10, help="timed steps")
            sub.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.command == "pretrain":
            from lm.pretrain import pretrain

            pretrain(cfg)
        else:
            from lm.bench import bench

            bench(cfg, steps=args.steps, warmup=args.warmup)
    except _USAGE_ERRORS as error:
        print(f"lm {args.command}: error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        print(f"lm {args.command}: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
