"""``safeloss bench --quick --device cpu`` end to end, on one tiny workload: files and fields, no timings.

The CPU quick preset is what CI can afford; the GPU presets run via benchmarks/gpu_check.sh.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from safeloss import bench

WORKLOAD = "cls-N1024-C10-fp32"
ALWAYS = {"torch-eager", "safeloss-torch"}  # must have measured on any CPU
CUDA_ONLY = {"safeloss-triton", "safeloss-triton-inplace", "safeloss-triton-nocheck", "liger", "quack"}


_THREADS_BEFORE = __import__("torch").get_num_threads()


_LOG: dict[str, str] = {}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import contextlib
    import io

    out = tmp_path_factory.mktemp("bench")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert bench.main(quick=True, device="cpu", out=str(out), workloads=[WORKLOAD]) == 0
    _LOG["stderr"] = err.getvalue()
    return out


def test_writes_json_markdown_env_and_plots(run: Path) -> None:
    for name in ("results.json", "results.md", "env.txt", "time_vs_classes.png", "bandwidth_vs_classes.png"):
        f = run / name
        assert f.is_file() and f.stat().st_size > 0, name
    assert "PyTorch version" in (run / "env.txt").read_text()  # torch.utils.collect_env's report
    for png in run.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (run / "memory_vs_classes.png").exists()  # CPU runs measure no memory: no empty plot


def test_cpu_runs_one_thread_by_default_and_restore_the_setting(run: Path) -> None:
    import torch

    data = json.loads((run / "results.json").read_text())
    assert data["meta"]["cpu_threads"] == 1
    # one thread: the thread's CPU clock, which other processes' load does not inflate
    assert "(thread CPU time, providers interleaved, 1 thread;" in (run / "results.md").read_text()
    assert torch.get_num_threads() == _THREADS_BEFORE


def test_threads_flag_reaches_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    seen = []
    from safeloss.bench import runner

    monkeypatch.setattr(runner, "_run", lambda *a, **k: seen.append(torch.get_num_threads()) or [])
    from safeloss import cli
    from safeloss.bench import linear as bench_linear

    monkeypatch.setattr(bench_linear, "run", lambda *a, **k: 0)  # its heads take minutes on CPU

    assert cli.main(["bench", "--device", "cpu", "--threads", "2", "--out", str(tmp_path), "--quick"]) == 0
    assert cli.main(["bench", "--device", "cpu", "--out", str(tmp_path), "--quick"]) == 0
    assert seen == [2, 1]
    assert bench.main(device="cpu", out=str(tmp_path), threads=0) == 2


def test_spread_is_shown_and_wide_rows_are_flagged() -> None:
    w = bench._cls(4096, 1000, "fp32")
    raw = {}
    for name, (med, lo, hi) in {"torch-eager": (1.0, 0.97, 1.04), "safeloss-torch": (0.6, 0.3, 1.2),
                                "torch-compile": (0.5, 0.49, 0.52)}.items():
        p = next(p for p in bench.PROVIDERS if p.name == name)
        r = bench._base_row(w, p)
        r["fwd"] = r["fwdbwd"] = bench.Timing(med, lo, hi, 50)
        raw[name] = r
    rows = [bench._finish(r, raw[bench.BASELINE]) for r in raw.values()]
    by = {r["provider"]: r for r in rows}
    assert by["safeloss-torch"]["fwdbwd_spread"] == pytest.approx(1.5)
    assert by["safeloss-torch"]["noisy"] and "too noisy to trust" in by["safeloss-torch"]["note"]
    assert not by["torch-compile"].get("noisy") and not by["torch-eager"].get("noisy")
    meta = {"device": "cpu", "device_type": "cpu", "preset": "quick", "copy_gbps": 30.0, "torch": "x",
            "triton": None, "safeloss": "x", "liger_kernel": None, "quack": None, "python": "x",
            "git_commit": None, "git_dirty": None, "timestamp": "t", "cpu_threads": 1}
    md = bench.markdown(meta, rows, [])
    assert "| fwd+bwd q20-q80 |" in md
    assert "| safeloss-torch | 0.600 | 0.600 | 0.300-1.200 (150%) | 1.67x (noisy) | 1.67x (noisy) |" in md
    assert "| torch-compile | 0.500 | 0.500 | 0.490-0.520 (6%) | 2.00x | 2.00x |" in md


def test_json_rows(run: Path) -> None:
    data = json.loads((run / "results.json").read_text())
    rows = data["rows"]
    # only the providers that can run on a CPU: no rows of placeholders for the CUDA-only ones
    assert {r["provider"] for r in rows} == {p.name for p in bench.PROVIDERS if not p.cuda_only}
    assert {r["workload"] for r in rows} == {WORKLOAD}
    for r in rows:
        for key in ("device", "device_type", "torch", "triton", "safeloss", "git_commit", "timestamp",
                    "workload", "provider", "status", "note", "bytes_fwd", "bytes_fwdbwd"):
            assert key in r, key
        assert r["device_type"] == "cpu"
        assert r["status"] in {"ok", "skipped", "error"}, r
    by = {r["provider"]: r for r in rows}
    for name in ALWAYS:
        r = by[name]
        assert r["status"] == "ok", r
        for key in ("fwd_ms", "fwdbwd_ms", "speedup_fwd", "speedup_fwdbwd", "gbps_fwd", "gbps_fwdbwd",
                    "fwd_reps"):
            assert isinstance(r[key], (int, float)) and r[key] > 0, (name, key)
        assert r["loss_rel_err"] < 1e-5  # fp32 against an fp64 reference of the same inputs
    assert by["torch-eager"]["speedup_fwdbwd"] == pytest.approx(1.0)
    # torch.compile needs a C++ compiler on CPU: measured where one exists, else a reported error.
    assert by["torch-compile"]["status"] in {"ok", "error"}
    for name in CUDA_ONLY:  # left out with a reason, in the notes, never silently missing
        assert name not in by
        assert any(name in n and "CUDA" in n for n in data["notes"]), name
    assert data["meta"]["copy_gbps"] > 0


def test_markdown_table(run: Path) -> None:
    md = (run / "results.md").read_text()
    assert f"## {WORKLOAD}" in md
    for p in bench.PROVIDERS:
        assert (f"| {p.name} |" in md) == (not p.cuda_only), p.name
    assert "copy bandwidth" in md and "torch.utils.benchmark.Measurement" in md


def test_progress_for_every_section_and_the_true_file_list(run: Path) -> None:
    log = _LOG["stderr"]
    for section in ("environment:", "copy bandwidth:", f"{WORKLOAD}: timed", "plots:"):
        assert section in log, section
    wrote = next(line for line in log.splitlines() if line.startswith("wrote "))
    listed = {Path(p.strip()).name for p in wrote.removeprefix("wrote ").split(",")}
    assert listed == {f.name for f in run.iterdir()}


def test_linear_section_has_start_and_end_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from safeloss.bench import linear as bench_linear

    ran = []

    def fake_run(heads, dev, quick, out):  # bench/linear.py as it is, minus minutes of CPU
        ran.append([h.name for h in heads])
        (out / "linear_results.md").write_text("x")
        (out / "linear_results.json").write_text("{}")
        return 0

    monkeypatch.setattr(bench_linear, "run", fake_run)
    assert bench.main(quick=True, device="cpu", out=str(tmp_path), workloads=["lce"]) == 0
    err = capsys.readouterr().err
    assert ran == [[h.name for h in bench_linear.select("cpu", True, ["lce"])]]
    assert "linear + cross-entropy heads: lce-" in err and "linear + cross-entropy heads: done in" in err
    assert "linear_results.md" in err.splitlines()[-1]


def test_the_cpu_quick_preset_is_small() -> None:
    """A minute or two on two cores: three workloads, three providers, a CPU-sized linear head."""
    import torch

    from safeloss.bench import linear as bench_linear
    from safeloss.bench import runner

    wls = bench.quick_workloads("cpu")
    assert len(wls) == 3 and len({w.classes for w in wls}) == 3  # a trend at one N
    assert len(bench.for_device(torch.device("cpu"))[0]) == 3
    heads = runner._linear_heads(bench_linear, torch.device("cpu"), True, None)
    assert all(h.n * h.c <= 1024 * 8192 for h in heads)


def test_cpu_timing_blocks_calls_and_counts_every_one() -> None:
    calls = {"a": 0, "b": 0}

    def make(k: str):
        def f() -> None:
            calls[k] += 1
        return f

    times = bench.cpu_time_interleaved({"a": make("a"), "b": make("b")}, seconds=0.0, min_rounds=4, block_s=0.001)
    for k in ("a", "b"):
        tm = times[k]
        assert tm.reps == calls[k] - 1 and tm.reps >= 4 * 2  # blocks of several calls; warm-up not counted
        assert 0 < tm.q20_ms <= tm.median_ms <= tm.q80_ms


def test_noisy_points_are_flagged_on_the_plots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.figure import Figure

    w = [bench._cls(1024, c, "fp32") for c in (10, 100, 1000)]
    rows = []
    for wl in w:
        base = bench._base_row(wl, next(p for p in bench.PROVIDERS if p.name == "torch-eager"))
        base["fwd"] = base["fwdbwd"] = bench.Timing(1.0, 0.99, 1.01, 50)
        ours = bench._base_row(wl, next(p for p in bench.PROVIDERS if p.name == "safeloss-torch"))
        spread = (0.5, 2.0) if wl.classes == 100 else (0.99, 1.01)
        ours["fwd"] = ours["fwdbwd"] = bench.Timing(1.0, *spread, 50)
        b = bench._finish(base, None)
        rows += [b, bench._finish(ours, b)]
    titles = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: titles.append(self._suptitle.get_text()))
    meta = {"device": "cpu", "device_type": "cpu", "timestamp": "t", "copy_gbps": 10.0}
    bench.plots(tmp_path, meta, rows)
    assert titles and all("red rings: 1 point too noisy to trust" in t for t in titles)


def test_unknown_workload_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(quick=True, device="cpu", out=str(tmp_path), workloads=["no-such-workload"]) == 2
    assert "available" in capsys.readouterr().err


def test_presets_cover_the_issue() -> None:
    full = {w.name for w in bench.full_workloads()}
    for name in ("cls-N65536-C1000-fp32", "llm-N16384-V262144-bf16", "seg-B8-C150-512x512-bf16",
                 "llm-prob-N8192-V128256-bf16", "llm-smooth0.1-N8192-V128256-fp32"):
        assert name in full
    gpu = [w.name for w in bench.quick_workloads("cuda")]
    assert gpu[0] == "llm-N8192-V128256-bf16"  # the headline target is measured first
    assert {"cls-N4096-C10-fp32", "cls-N4096-C100-fp32"} <= set(gpu)


def test_byte_model() -> None:
    w = bench._llm(8192, 128256, "bf16")
    fwd, fb = bench.must_move_bytes(w)
    x = 8192 * 128256 * 2
    assert fwd == x + 8192 * 8 and fb == 2 * x + 8192 * 8
    assert bench.streamed_bytes(w) == 3 * x + 8192 * 8
    p = bench._llm(8192, 128256, "bf16", prob=True)
    assert bench.must_move_bytes(p)[1] == 3 * x and bench.streamed_bytes(p) == 5 * x


def _cuda_rows(loss_err: dict[str, float] | None = None) -> list[dict]:
    """Synthetic CUDA rows (made-up timings, not measurements) to exercise the GPU report path."""
    ms = {"torch-eager": 10.0, "torch-compile": 5.0, "safeloss-torch": 11.0, "safeloss-triton": 2.0,
          "safeloss-triton-inplace": 2.0, "safeloss-triton-nocheck": 1.99, "liger": 2.5, "quack": 2.1}
    rows = []
    for w in bench.quick_workloads("cuda")[:3]:
        raw = {}
        for p in bench.PROVIDERS:
            r = bench._base_row(w, p)
            r["fwd"] = bench.Timing(ms[p.name] / 3, ms[p.name] / 3, ms[p.name] / 3, -1)
            r["fwdbwd"] = bench.Timing(ms[p.name], ms[p.name], ms[p.name], -1)
            grad = 0 if p.inplace else r["grad_bytes"]
            r["peak_mem_bytes"], r["saved_mem_bytes"] = grad + 16 * w.positions, 12 * w.positions
            # bf16 rows: the rounding of a bf16 scalar, as every provider showed on the H200
            r["loss_rel_err"] = (loss_err or {}).get(p.name, 1.6e-3 if w.dtype != "fp32" else 1e-6)
            r["copy_gbps"] = 3000.0
            if w.logits_bytes() <= bench.GRAPH_MAX_LOGITS:
                r["graph_fwdbwd_ms"] = ms[p.name] / 2
            raw[p.name] = r
        rows += [bench._finish(r, raw[bench.BASELINE]) for r in raw.values()]
    return rows


def test_gpu_report_path(tmp_path: Path) -> None:
    rows = _cuda_rows()
    meta = {"device": "fake GPU", "device_type": "cuda", "preset": "quick", "copy_gbps": 3000.0,
            "torch": "x", "triton": "x", "safeloss": "x", "liger_kernel": None, "quack": None,
            "python": "x", "git_commit": None, "git_dirty": None, "timestamp": "t", "cpu_threads": 1}
    head = next(r for r in rows if r["workload"] == "llm-N8192-V128256-bf16" and r["provider"] == "safeloss-triton")
    assert head["speedup_fwdbwd"] == pytest.approx(5.0)
    assert head["peak_minus_grad_bytes"] == 16 * 8192
    md = bench.markdown(meta, rows, [])
    assert "## GPU targets" in md
    assert "| llm-N8192-V128256-bf16: safeloss-triton vs torch-eager (>= 2.5x) | 5.00x | PASS |" in md
    assert "| llm-N8192-V128256-bf16: safeloss-triton vs liger (>= 1.0x) | 1.25x | PASS |" in md
    assert "checks on / softmax check compiled out (<= 1.03x) | 1.01x | PASS |" in md
    assert "GPU time (CUDA graph replay) | 5.00x | PASS |" in md
    assert "| fwd+bwd ms, CUDA graph | speedup, CUDA graph |" in md
    assert "n/a" not in md.split("## llm-")[0]  # every target has its rows here
    written = bench.plots(tmp_path, meta, rows)
    assert set(written) == {"time_vs_classes.png", "bandwidth_vs_classes.png", "memory_vs_classes.png"}


def test_gpu_host_profile_tool_runs(capsys: pytest.CaptureFixture[str], benchmark_script) -> None:
    """benchmarks/gpu_host_profile.py (a gpu_check.sh stage) on CPU tensors, a few calls."""
    tool = benchmark_script("gpu_host_profile")
    tool.DEV, tool.CALLS, tool.N = "cpu", 3, 64
    tool.main()
    out = capsys.readouterr().out
    assert "us per call" in out and "## cProfile" in out and "## torch.profiler" in out


def test_inplace_providers_get_clean_logits_each_call() -> None:
    """In-place providers overwrite their logits; the timing loop restores them before each call
    (outside the timed interval), so every call sees the real input."""
    import torch

    pool = [(torch.randn(3, 5), torch.zeros(3, dtype=torch.long)) for _ in range(2)]
    clean = [x.clone() for x, _ in pool]
    seen = []

    def step(fn, x, t):
        seen.append(x.clone())
        x.fill_(7.0)  # what an in-place backward does to the logits

    at = [0]
    call, setup = bench._rotating(step, None, pool, at), bench._restorer(pool, clean, at)
    for _ in range(5):
        setup()
        call()
    assert all(torch.equal(v, clean[i % 2]) for i, v in enumerate(seen))
    assert bench._restorer(pool, None, at) is None


def test_markdown_cells_escape_pipes() -> None:
    assert bench._cell("a | b\nc") == "a \\| b c"


def test_cpu_overhead_script_runs(capsys: pytest.CaptureFixture[str], benchmark_script, tmp_path) -> None:
    """benchmarks/cpu_overhead.py end to end on tiny cases, a few rounds: every section prints
    its rows with a verdict, the stubbed Triton mode runs without a GPU and without
    TRITON_INTERPRET mattering (no kernel runs), and the results files are written."""
    tool = benchmark_script("cpu_overhead")
    # the issue's targets, as the script states them
    assert (8, 10, False, 1, 1.20) in tool.TORCH_CASES and (256, 10, False, 1, 1.15) in tool.TORCH_CASES
    assert (4096, 1000, False, 1, 1.05) in tool.TORCH_CASES
    assert {(4096, 1000, True, n, 1.10) for n in (1, 2)} <= set(tool.TORCH_CASES)
    assert tool.STUB_CASES == [(8, 10, 1.5), (4096, 10, 1.5)]
    import torch

    from safeloss.backends import triton_backend

    tool.TORCH_CASES = [(8, 10, False, 1, 99.0), (16, 8, True, 2, 99.0)]
    tool.STUB_CASES = [(8, 10, 99.0)]
    tool.LINEAR_SHAPE, tool.VOCAB_SHAPE = (4, 8, 6), (4, 6)
    tool.LARGE_ROUNDS = 3
    threads = torch.get_num_threads()
    kernels = triton_backend._kernels
    try:
        code = tool.main(["--seconds", "0", "--min-rounds", "3", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert triton_backend._kernels is kernels  # the stub is gone again
    out = capsys.readouterr().out
    for row in ("torch    (8, 10)", "(16, 8) prob", "stubbed  (8, 10)", "linear_cross_entropy",
                "vocab_parallel ", "vocab_parallel (plain)", "Python calls per fwd+bwd: stock"):
        assert row in out, row
    # the stubbed section's context rows: the bare autograd node and safeloss's own node
    stub_lines = [line for line in out.splitlines() if line.startswith("stubbed")]
    for api in ("floor", "node"):
        assert any(f" {api} " in line for line in stub_lines), api
    assert " thread " in out and " wall " in out  # 1 thread: the thread clock; 2 threads: wall
    # every targeted torch / stubbed row has a verdict; the family rows are judged against the
    # cross-entropy row of the same rounds (noise at 3 rounds: either verdict)
    verdicts = [line.split()[-1] for line in out.splitlines() if line.rstrip().endswith(("PASS", "FAIL"))]
    # 2 torch cases x 2 APIs, 1 stubbed case x 2, linear, vocab-parallel against both baselines
    assert len(verdicts) == 9
    assert code in (0, 1)
    import json

    data = json.loads((tmp_path / "results.json").read_text())
    assert {r["section"] for r in data["rows"]} == {"torch", "stubbed", "family"}
    assert data["meta"]["cpu"] and "| verdict |" in (tmp_path / "results.md").read_text()
    assert not __import__("safeloss").is_patched()


def test_cpu_overhead_instruction_counts(benchmark_script, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--instructions``: every step the valgrind children run exists and runs (here without
    valgrind, two calls each), and the rows are the counts' ratios and differences, the family
    rows judged on their extra instructions against the cross-entropy path's."""
    tool = benchmark_script("cpu_overhead")
    names = sorted({n for row in tool.ICOUNT_ROWS for n in row[3:5]})
    for name in names:
        tool._icount_child(name, 2)
    counts = {name: 100_000.0 for name in names}
    counts.update({"torch/safe-functional": 110_000.0, "linear/safe-linear": 109_000.0,
                   "stubbed/safe-module": 300_000.0, "vocab/safe-vocab": 150_000.0})
    monkeypatch.setattr(tool, "_instructions", lambda name, calls, workdir, lib: counts[name])
    monkeypatch.setattr(tool, "_callgrind_requests", lambda workdir: "")
    rows = {(r.section, r.api, r.case): r for r in tool.instruction_rows(calls=10)}
    assert all(r.clock == "instr" for r in rows.values())
    ce = rows[("torch", "functional", "(8, 10)")]
    assert ce.paired == pytest.approx(1.1) and ce.extra_us == pytest.approx(10.0) and ce.ok
    lin = rows[("family", "linear_cross_entropy", "(8, 16) x (10, 16)")]
    assert lin.limit == pytest.approx(10.0) and lin.extra_us == pytest.approx(9.0) and lin.ok
    vocab = rows[("family", "vocab_parallel", "(8, 10), 1 gloo rank")]
    assert vocab.extra_us == pytest.approx(50.0) and not vocab.ok
    assert not rows[("stubbed", "module", "(8, 10)")].ok  # 3x against 1.5x
    counts["linear/safe-linear"] = 111_000.0  # one instruction per call (in thousands) too many
    assert not next(r for r in tool.instruction_rows(calls=10) if r.api == "linear_cross_entropy").ok


def test_cpu_overhead_instruction_counts_need_valgrind(benchmark_script, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    tool = benchmark_script("cpu_overhead")
    monkeypatch.setattr(shutil, "which", lambda name: None if name == "valgrind" else f"/usr/bin/{name}")
    with pytest.raises(SystemExit, match=r"needs valgrind .* not found: valgrind \(Debian"):
        tool.instruction_rows(calls=1)


def test_a_skipped_row_is_not_flagged_for_the_baselines_noise() -> None:
    w = bench._cls(4096, 1000, "fp32")
    base = bench._base_row(w, next(p for p in bench.PROVIDERS if p.name == bench.BASELINE))
    base["fwd"] = base["fwdbwd"] = bench.Timing(1.0, 0.5, 1.5, 50)  # 100% spread
    base = bench._finish(base, base)
    skipped = {**bench._base_row(w, next(p for p in bench.PROVIDERS if p.name == "liger")),
               "status": "skipped", "note": "skipped: Liger-Kernel runs on CUDA only"}
    row = bench._finish(skipped, base)
    assert base["noisy"]
    assert not row.get("noisy") and row["note"] == "skipped: Liger-Kernel runs on CUDA only"


def test_logits_are_an_intermediate_so_inplace_providers_really_run_in_place() -> None:
    """safeloss's ``inplace_backward`` never overwrites a leaf requiring grad (the caller's own
    tensor); a training step's logits are a model's output. Leaf logits made the in-place
    provider time and measure the out-of-place path under an "in-place gradient" label."""
    import torch

    from safeloss.backends.triton_backend import _may_take_gradient

    for w in (bench._cls(16, 10, "fp32"), bench._llm(4, 64, "bf16", prob=True)):
        for x, _t in bench.make_inputs(w, torch.device("cpu"), 2):
            assert x.requires_grad and not x.is_leaf and x._base is None
            assert _may_take_gradient(x)
            g, = torch.autograd.grad(x.float().sum(), (x,))  # the harness differentiates w.r.t. x
            assert g.shape == x.shape


def test_nocheck_provider_turns_the_check_off_on_the_planned_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Repeated calls of one signature take a plan (``triton_backend.Planned``) that bypasses
    ``row_losses``: patching only the latter left the softmax check on in every timed call of
    ``safeloss-triton-nocheck``, so "checks on / off" compared the checked kernel with itself."""
    import torch

    import safeloss
    from safeloss.backends import triton_backend as tb
    from safeloss.bench.providers import _softmax_check_off
    from safeloss.core import checks

    seen: list[object] = []
    stand_in = tb._fwd_stand_in

    def record(*args, **kwargs):
        seen.append(kwargs.get("CHECK_SOFTMAX"))
        return stand_in(*args, **kwargs)

    monkeypatch.setattr(tb, "_fwd_stand_in", record)
    monkeypatch.setattr(checks, "DEFER_ON_CPU", True)
    x = torch.randn(8, 10).add(torch.zeros((), requires_grad=True))
    t = torch.randint(0, 10, (8,))
    with tb.stubbed_launches():
        for _ in range(3):  # the signature planned by the checked provider, as in a run
            safeloss.cross_entropy(x, t, backend="triton")
        with _softmax_check_off():
            for _ in range(3):
                safeloss.cross_entropy(x, t, backend="triton")
        checked_after = len(seen)
        safeloss.cross_entropy(x, t, backend="triton")
        safeloss.check_pending()
    assert seen[:3] == [True] * 3, seen
    assert seen[3:6] == [False] * 3, seen
    assert seen[checked_after:] == [True], seen  # and back on once the context is left


def test_a_negative_memory_reading_is_no_pass() -> None:
    """Memory freed inside the measurement (run 2's deferred records) gave peak - grad < 0,
    which the O(N) verdict judged PASS. An impossible reading is invalid, not a result."""
    rows = _cuda_rows()
    for r in rows:
        if r["workload"] == "llm-N8192-V128256-bf16" and r["provider"].startswith("safeloss-triton"):
            r["peak_minus_grad_bytes"] = -3_000_000
            r["saved_mem_bytes"] = -3_000_000
            if r["provider"] == "safeloss-triton-inplace":
                r["peak_mem_bytes"] = 0
    lines = [ln for ln in bench.targets(rows) if "peak" in ln]
    assert lines and not any("PASS" in ln for ln in lines), lines
    assert all("invalid" in ln for ln in lines), lines
    from safeloss.bench.runner import _memory_reading

    assert _memory_reading(2000, 0, 1000, False) == ({"peak_mem_bytes": 2000, "saved_mem_bytes": 0}, "")
    vals, note = _memory_reading(1500, -100, 1000, False)
    assert vals == {} and "memory not valid" in note
    vals, note = _memory_reading(500, 10, 1000, False)  # below the gradient it must hold
    assert vals == {} and "memory not valid" in note
    assert _memory_reading(0, 0, 1000, True)[0] == {"peak_mem_bytes": 0, "saved_mem_bytes": 0}


def test_a_wrong_loss_is_not_a_result() -> None:
    """A provider whose loss is off the fp64 reference gets no speedup and no target verdict."""
    rows = _cuda_rows(loss_err={"safeloss-triton": 0.5})
    head = next(r for r in rows if r["workload"] == "llm-N8192-V128256-bf16" and r["provider"] == "safeloss-triton")
    assert head["status"] == "wrong" and "fp64 reference" in head["note"]
    assert "speedup_fwdbwd" not in head
    md = bench.targets(rows)
    assert any("safeloss-triton vs torch-eager" in ln and "n/a" in ln for ln in md), md
    ok = next(r for r in rows if r["workload"] == "llm-N8192-V128256-bf16" and r["provider"] == "torch-eager")
    assert ok["status"] == "ok"  # bf16 rounding of the scalar (1.6e-3 on the H200) is no error


def test_linear_cuda_peak_flushes_deferred_records_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """The warm-up call's deferred check records, released by a later call, were freed inside
    the linear section's memory measurement (the bug of H200 run 2 in the cross-entropy one)."""
    import torch

    import safeloss
    from safeloss.bench import linear

    order: list[str] = []
    monkeypatch.setattr(safeloss, "check_pending", lambda *a, **k: order.append("flush"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a, **k: order.append("base") or 0)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 0)
    monkeypatch.setattr(linear, "_step", lambda *a: lambda: order.append("call"))
    x, w = torch.zeros(2, 3, requires_grad=True), torch.zeros(4, 3, requires_grad=True)
    linear._cuda_peak(None, x, w, torch.zeros(2, dtype=torch.long))
    assert order == ["call", "flush", "base", "call"], order
