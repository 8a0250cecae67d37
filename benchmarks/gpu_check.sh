#!/usr/bin/env bash
# One command for a lent GPU machine: install, describe, GPU tests, GPU benchmark; all output in $OUT.
#
#   OUT=/some/empty/dir bash benchmarks/gpu_check.sh        # from the repository root
#
# Worst case 8 minutes (typically 5-6): every stage runs under `timeout`, so a hang costs its own stage only, and
# the benchmark stops starting new workloads when its budget is spent (results so far are kept).
# Order: the benchmark first (the numbers are the point), then the tile sweep, then the GPU tests.
# STAGES picks stages (default "bench tune host tests grid"); BENCH_ARGS adds `safeloss bench` arguments.
# The machine may be offline: nothing here needs the network unless triton is missing.
# At the end the logs are packed into $OUT/logs.tgz (the device tool brings back at most 8 files).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
PY="${PYTHON:-$(command -v python || command -v python3)}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # works even if the editable install fails
export PYTHONUNBUFFERED=1
T_INSTALL=${T_INSTALL:-30} T_TESTS=${T_TESTS:-60} T_GRID=${T_GRID:-100} T_BENCH=${T_BENCH:-200} T_TUNE=${T_TUNE:-50} T_HOST=${T_HOST:-40}
export SAFELOSS_BENCH_BUDGET_S=${SAFELOSS_BENCH_BUDGET_S:-170}  # < T_BENCH: leaves time for plots
STAGES=${STAGES:-bench tune host tests grid}
BENCH_ARGS=${BENCH_ARGS:-}
# The catalogue passes CPU tensors (its value checks raise in the call only on CPU): CI runs it
# through the interpreter, so on the device only the tests with device tensors run.
GRID_TESTS=${GRID_TESTS:-tests/test_differential.py tests/test_compile_fullgraph.py}
want() { [[ " $STAGES " == *" $1 "* ]]; }

stage() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }
rcs=()

stage "install (timeout ${T_INSTALL}s)"
# The lent machines cannot reach a registry: test-only packages (pytest, hypothesis, expecttest)
# travel as wheels in .whl/ (see benchmarks/README.md), unpacked beside the image's packages.
# Not inside the piped block below: the PYTHONPATH export must reach the later stages.
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >"$OUT/wheels.log" 2>&1 \
    && export PYTHONPATH="/tmp/site:$PYTHONPATH" && echo "installed carried wheels: $(ls .whl | tr '\n' ' ')"
fi
"$PY" -c "import pytest" 2>/dev/null || echo "pytest missing: carry it as a wheel in .whl/ (benchmarks/README.md)"
{
  # --no-build-isolation: use the installed setuptools instead of downloading one (offline box).
  timeout "$T_INSTALL" "$PY" -m pip install --quiet --no-deps --no-build-isolation -e . \
    || echo "editable install failed; running from the source tree via PYTHONPATH"
  if ! "$PY" -c "import triton" 2>/dev/null; then
    timeout "$T_INSTALL" "$PY" -m pip install --quiet triton || echo "triton missing and not installable"
  fi
} 2>&1 | tee "$OUT/install.log"

stage "machine and versions"
{
  nvidia-smi || echo "nvidia-smi not found"
  git log -1 --format='git %H %cI %s' 2>/dev/null; git status --short 2>/dev/null | head -20
  "$PY" - <<'EOF'
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.0f} GiB", "sm", f"{p.major}.{p.minor}",
          "L2", getattr(p, "L2_cache_size", "?"))
for d in ("triton", "safeloss", "liger-kernel", "quack-kernels", "pytest", "hypothesis", "numpy", "matplotlib"):
    try:
        print(f"{d} {md.version(d)}")
    except md.PackageNotFoundError:
        print(f"{d} (not installed)")
EOF
} 2>&1 | tee "$OUT/env.txt"

if want bench; then
stage "benchmark: safeloss bench --quick --device cuda $BENCH_ARGS (timeout ${T_BENCH}s, budget ${SAFELOSS_BENCH_BUDGET_S}s)"
# shellcheck disable=SC2086
timeout "$T_BENCH" "$PY" -m safeloss bench --quick --device cuda --out "$OUT/bench" $BENCH_ARGS >"$OUT/bench.log" 2>&1
rc=$?; rcs+=("bench=$rc"); echo "bench rc=$rc (124 = timed out)"
grep -vE '^\s*[0-9]+%\|' "$OUT/bench.log" | tail -n 5
fi

if want tune; then
stage "tile sweep: benchmarks/gpu_tune.py (timeout ${T_TUNE}s)"
timeout "$T_TUNE" "$PY" benchmarks/gpu_tune.py --budget-s $((T_TUNE - 15)) >"$OUT/tune.txt" 2>&1
rc=$?; rcs+=("tune=$rc"); cat "$OUT/tune.txt" | head -n 60; echo "tune rc=$rc (124 = timed out)"
fi

if want host; then
stage "host time per call: benchmarks/gpu_host_profile.py (timeout ${T_HOST}s)"
timeout "$T_HOST" "$PY" benchmarks/gpu_host_profile.py >"$OUT/host_profile.txt" 2>&1
rc=$?; rcs+=("host=$rc"); head -n 8 "$OUT/host_profile.txt"; echo "host rc=$rc (124 = timed out)"
fi

if want tests; then
stage "GPU tests: pytest -m gpu -x -q (timeout ${T_TESTS}s)"
# --continue-on-collection-errors: a test module needing a package this box lacks must not hide
# the GPU tests of the other modules.
timeout "$T_TESTS" "$PY" -m pytest -m gpu -x -q -rs --continue-on-collection-errors \
  --junitxml="$OUT/pytest-gpu.xml" -p no:cacheprovider >"$OUT/pytest-gpu.log" 2>&1
rc=$?; rcs+=("pytest=$rc"); tail -n 30 "$OUT/pytest-gpu.log"; echo "pytest rc=$rc (124 = timed out)"
fi

if want grid; then
stage "Triton backend on the GPU: differential grid and catalogue (timeout ${T_GRID}s)"
# The same grid CI runs through the interpreter, now compiled for the real device.
# shellcheck disable=SC2086
timeout "$T_GRID" "$PY" -m pytest -q -x -k triton -p no:cacheprovider $GRID_TESTS \
  --junitxml="$OUT/pytest-grid.xml" >"$OUT/pytest-grid.log" 2>&1
rc=$?; rcs+=("grid=$rc"); tail -n 25 "$OUT/pytest-grid.log"; echo "grid rc=$rc (124 = timed out)"
fi

stage "summary"
{
  echo "stages: ${rcs[*]}"
  if [ -f "$OUT/bench/results.md" ]; then
    # The GPU-target verdicts, then the headline workload's table.
    awk '/^## GPU targets/{p=1} /^## llm-N8192-V128256-bf16/{p=1} /^## /&&!/GPU targets|llm-N8192-V128256-bf16$/{p=0} p' \
      "$OUT/bench/results.md"
  else
    echo "no benchmark results"
  fi
} 2>&1 | tee "$OUT/summary.txt"
# At most 8 files come back from the device machine: keep the results, pack the logs.
(cd "$OUT" && tar czf logs.tgz --remove-files ./*.log ./*.xml env.txt tune.txt host_profile.txt 2>/dev/null)
ls -la "$OUT" "$OUT/bench" 2>/dev/null | tail -n 20
