"""`tomesd-ext` command line: one sub-command per module in tomesd_ext/commands/."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> module in tomesd_ext.commands defining `add_parser(subparsers)` and `run(args) -> int`
COMMANDS = {
    "bench": "bench",
    "kernels": "kernels",
    "edit-video": "edit_video",
    "bench-video": "bench_video",
    "calibrate": "calibrate",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tomesd-ext", description="Token merging for diffusion models")
    sub = parser.add_subparsers(dest="command", required=True)
    for module_name in COMMANDS.values():
        module = importlib.import_module(f"tomesd_ext.commands.{module_name}")
        module.add_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
