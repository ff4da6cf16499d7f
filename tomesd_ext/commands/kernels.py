"""`tomesd-ext kernels`: report which kernel backend runs; `--build` compiles the CUDA extension ahead of time."""

from __future__ import annotations

import os
import sys
import time


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "kernels",
        help="show or build the CUDA kernels",
        description="Report the kernel backend (TOMESD_EXT_KERNELS, extension status); with --build, "
        "compile the CUDA extension into its cache directory and report the result.",
    )
    p.add_argument("--build", action="store_true", help="compile (or load the cached) CUDA extension now")
    p.add_argument(
        "--arch",
        default=None,
        help="TORCH_CUDA_ARCH_LIST to build for, e.g. '9.0' or '8.0;9.0' (needed when no GPU is visible)",
    )
    p.add_argument("--verbose", action="store_true", help="show the compiler commands")
    p.set_defaults(run=run)


def run(args) -> int:
    import torch

    from .. import kernels
    from ..kernels import build

    try:
        kernels.check_kernel_setting()
    except ValueError as exc:
        print(f"tomesd-ext kernels: error: {exc}", file=sys.stderr)
        return 2
    if args.arch:
        os.environ["TORCH_CUDA_ARCH_LIST"] = args.arch
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), "
          f"GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none visible'}")
    print(f"TOMESD_EXT_KERNELS={kernels.mode()}; sources {build.SOURCE_DIR}; cache {build.build_dir()}")
    if args.build:
        reason = build.missing_requirement()
        if reason is not None:
            print(f"cannot build: {reason}")
            return 1
        start = time.perf_counter()
        try:
            module = build.load(verbose=args.verbose)
        except RuntimeError as exc:
            print(f"build FAILED after {time.perf_counter() - start:.1f} s: {exc}")
            return 1
        print(f"built/loaded {module.__file__} in {time.perf_counter() - start:.1f} s")
        if not torch.cuda.is_available():
            print("no GPU visible: CUDA tensors cannot exist here, every call runs the torch path")
        return 0
    state = kernels.status()
    print(f"backend for CUDA tensors: {state['backend']}" + (f" ({state['reason']})" if state["reason"] else ""))
    return 0


def main(argv=None) -> int:
    """`python -m tomesd_ext.commands.kernels [--build]` (same as `tomesd-ext kernels`)."""
    import argparse

    parser = argparse.ArgumentParser(prog="tomesd-ext")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["kernels", *(argv if argv is not None else __import__("sys").argv[1:])])
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
