"""Cost of entering and leaving ``safeloss.patch()``, against the number of loaded modules.

``with safeloss.patch():`` around a training step is a natural way to scope it, so entering and
leaving must cost nothing next to a step. Measured here: the first ``patch()`` of the process
(one walk of ``sys.modules``, importing ``torch._dynamo``, the one-time checks of the third-party
routes), then the median of many ``with safeloss.patch(): pass`` blocks, with Transformers
imported (about 3,000 modules) and again with 20,000 more (empty) modules: the two medians
should agree, as each module is looked at once.

    python benchmarks/patch_overhead.py
    python benchmarks/patch_overhead.py --no-transformers   # torch and safeloss only
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import types


def _blocks(n: int) -> list[float]:
    import safeloss

    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        with safeloss.patch():
            pass
        out.append(time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-transformers", action="store_true", help="do not import transformers")
    ap.add_argument("--blocks", type=int, default=2000, help="with-blocks per measurement")
    args = ap.parse_args(argv)

    import torch

    import safeloss

    if not args.no_transformers:
        try:
            import transformers.trainer  # noqa: F401  (what a Trainer script has loaded)
        except ImportError:
            print("transformers is not installed: measuring with torch and safeloss only")
    rows = []
    t0 = time.perf_counter()
    with safeloss.patch():
        pass
    rows.append(("first patch() of the process", len(sys.modules), (time.perf_counter() - t0) * 1e3, None))
    times = _blocks(args.blocks)
    rows.append(("with safeloss.patch(): pass", len(sys.modules), statistics.median(times) * 1e3, max(times) * 1e3))
    fakes = {f"_bench_fake_module_{i}": types.ModuleType(f"_bench_fake_module_{i}") for i in range(20000)}
    sys.modules.update(fakes)
    try:
        t0 = time.perf_counter()
        with safeloss.patch():
            pass
        rows.append(("first block after 20,000 new modules", len(sys.modules), (time.perf_counter() - t0) * 1e3, None))
        times = _blocks(args.blocks)
        rows.append(("with safeloss.patch(): pass", len(sys.modules), statistics.median(times) * 1e3, max(times) * 1e3))
    finally:
        for name in fakes:
            sys.modules.pop(name, None)

    from safeloss.patch import thirdparty

    print(f"safeloss.patch() enter + exit, torch {torch.__version__}, {args.blocks} blocks per median")
    print(f"third-party routes installed while patched: {', '.join(r.name for r in thirdparty.ROUTES if r.verdicts) or 'none'}")
    print(f"{'what':40s} {'modules':>8s} {'median ms':>10s} {'max ms':>8s}")
    for what, n, med, worst in rows:
        print(f"{what:40s} {n:8d} {med:10.4f} {'' if worst is None else f'{worst:8.3f}'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
