"""``safeloss`` console command: ``safeloss demo`` and ``safeloss bench``."""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="safeloss",
        description="A drop-in, safe and fast replacement for torch.nn.CrossEntropyLoss.",
    )
    parser.add_argument("--version", action="version", version=f"safeloss {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="show each classic cross-entropy mistake: stock torch vs safeloss")
    demo.add_argument("--only", metavar="NAME",
                      help="run only the cases whose name contains NAME (searched among all of --all's cases)")
    demo.add_argument("--no-color", action="store_true", help="plain text output")
    demo.add_argument("--all", action="store_true", help="also every other message (the full error catalogue)")
    bench = sub.add_parser("bench", help="benchmark safeloss against stock torch (and others)")
    bench.add_argument("--quick", action="store_true", help="small preset, a minute or two")
    bench.add_argument("--device", choices=["cpu", "cuda"], default=None)
    bench.add_argument("--out", default="bench-out", help="folder for JSON, markdown and PNGs")
    bench.add_argument("--workload", action="append", default=None,
                       help="run only workloads whose name contains this (repeatable)")
    bench.add_argument("--threads", type=int, default=None,
                       help="torch threads (default on CPU: 1; more makes shared-machine timings noise)")
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import main as demo_main

            return demo_main(only=args.only, color=not args.no_color and sys.stdout.isatty(),
                             all_cases=args.all)
        from .bench import main as bench_main

        return bench_main(quick=args.quick, device=args.device, out=args.out, workloads=args.workload,
                          threads=args.threads)
    except BrokenPipeError:
        # `safeloss demo | head`: the reader left, which is not an error worth a traceback. The
        # interpreter flushes stdout again at exit, so point it at devnull (Python's docs recipe).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
