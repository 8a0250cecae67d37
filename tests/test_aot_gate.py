"""The ahead-of-time compile gate (benchmarks/aot_gate.py): its enumeration follows the dispatch code,
and a configuration that does not compile or spills fails it. The full gate (every configuration
compiled for real GPU targets) runs in CI as ``python benchmarks/aot_gate.py --quick``."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_gate():
    spec = importlib.util.spec_from_file_location("aot_gate", os.path.join(ROOT, "benchmarks", "aot_gate.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["aot_gate"] = mod  # dataclasses resolve their module by name
    spec.loader.exec_module(mod)
    return mod


gate = _load_gate()

# A few calls that reach every kernel: CE forward / backward / fused rescale, the linear-CE tile,
# the vocab-parallel statistics.
SOME = re.compile(
    r"^ce (cls-N4096-C10|llm-N8192-V128256|seg-B8-C21-512x512) bfloat16 (index|prob-dtarget) (train|fused)$"
    r"|^linear lin-N4096-H256-C10 float32 eps=0.0 weight=False mean$"
    r"|^vocab-parallel vp-N4096-V1000-tp4 float32 eps=0.1 weight=True$"
)


def _some() -> list:
    return gate.enumerate_launches(only=lambda name: bool(SOME.search(name)))[0]


@pytest.fixture(scope="module")
def some() -> list:
    """The enumeration under the shipped tile rules (computed once for the tests that only read it)."""
    return _some()


def _launch_sites() -> set[str]:
    """Every ``name[grid](`` launch in the package's source: what the enumeration must find."""
    sites = set()
    for folder, _dirs, files in os.walk(os.path.join(ROOT, "safeloss")):
        for f in files:
            if f.endswith(".py"):
                with open(os.path.join(folder, f)) as fh:
                    sites |= set(re.findall(r"\b(\w+_kernel)\[", fh.read()))
    return sites


def test_enumeration_finds_every_launched_kernel(some):
    found = {launch.name for launch in some}
    assert _launch_sites() == {"ce_fwd_kernel", "ce_bwd_kernel", "ce_scale_kernel", "shard_stats_kernel"}
    assert found == _launch_sites()


def test_enumeration_records_what_a_cuda_launch_compiles(some):
    launches = some
    fwd = [x for x in launches if x.name == "ce_fwd_kernel" and "ce llm-N8192-V128256 bfloat16 index train" in x.cases]
    assert len(fwd) == 1
    x = fwd[0]
    assert x.signature["x_ptr"] == "*bf16" and x.signature["t_ptr"] == "*i64"
    c = x.own_constexprs()
    assert (c["BLOCK_P"], c["BLOCK_C"], c["PROB"], c["I64"]) == (1, 4096, False, False)
    assert x.num_warps == 4
    assert "xsc" in x.specialisation().split(";")[0]  # class stride 1: compiled as a constant
    # The linear-CE tile runs the CE forward on fp32 logits without the softmax check.
    lin = [x for x in launches if any(c.startswith("linear ") for c in x.cases)]
    assert lin and all(x.name == "ce_fwd_kernel" and x.own_constexprs()["CHECK_SOFTMAX"] is False for x in lin)
    # Narrow rows get the narrow register budget, LM rows the hardware limit.
    assert {gate.budget(x) for x in launches if x.max_classes <= 1024} == {gate.NARROW_REGS}
    # (at most what a block of its warps can hold in an SM: 128 a thread at 16 warps).
    assert {gate.budget(x) for x in launches if x.min_classes > 1024 and x.num_warps <= 8} == {gate.MAX_REGS}
    assert {gate.budget(x) for x in launches if x.min_classes > 1024 and x.num_warps == 16} == {128}
    assert all(x.options["maxnreg"] == gate.budget(x) for x in launches)  # the limit ptxas gets


def test_int64_offsets_only_past_int32():
    got = gate.enumerate_launches(only=lambda n: n.startswith("ce ") and " bfloat16 index train" in n
                                  and ("llm-N16384-V262144" in n or "llm-N8192-V128256" in n))[0]
    by_case = {c: x.own_constexprs()["I64"] for x in got for c in x.cases}
    assert by_case["ce llm-N16384-V262144 bfloat16 index train"] is True  # 2^32 logits
    assert by_case["ce llm-N8192-V128256 bfloat16 index train"] is False


@pytest.mark.parametrize(("n", "wide"), [(33_100_000, True), (33_000_000, False)])
def test_int64_sample_arithmetic(n, wide):
    """The softmax check's sample index multiplies a position by 65: past 2^31 / 65 positions the
    forward needs int64 even though the logits (n x 2) are far below 2^31 elements."""
    import math

    import torch

    from safeloss.backends import triton_backend as tb

    rec = gate.Recorder()
    x = torch.empty((n, 2), device="meta")
    t = torch.empty((n,), device="meta", dtype=torch.int64)
    with rec.active():
        tb._fwd_impl(x, t, None, -100, 0.0, False, True, False, False, math.inf)
    (launch,) = rec.launches.values()
    assert launch.own_constexprs()["I64"] is wide


def test_enumeration_follows_a_changed_tile_rule(monkeypatch, some):
    from safeloss.backends import triton_backend as tb

    before = {x.key for x in some}
    monkeypatch.setattr(tb, "FORCE_BLOCK_C", 64)
    after = _some()
    ce = [x for x in after if x.module == tb._kernels().__name__]
    assert ce and {x.own_constexprs()["BLOCK_C"] for x in ce} == {64}
    assert not {x.key for x in ce} & before


def test_committed_table_is_current():
    """Every configuration the dispatch code chooses today is in the committed table, compiled
    from today's kernel code (what ``--quick`` checks in CI before compiling; regenerate with
    ``python benchmarks/aot_gate.py --out benchmarks/results/aot-gate``)."""
    import triton

    table = gate.load_table(gate.TABLE)
    assert table is not None, f"no committed table at {gate.TABLE}"
    if table["meta"]["triton"] != f"triton {triton.__version__}":
        pytest.skip(f"table from {table['meta']['triton']}; keys depend on Triton's specialisation rules")
    launches, _n = gate.enumerate_launches()
    assert table["meta"]["sources"] == gate.source_hashes(launches), "kernel code changed: regenerate the table"
    known = {r["key"] for r in table["configurations"]}
    missing = [gate.describe(x) for x in launches if x.key not in known]
    assert not missing, f"{len(missing)} configurations missing from the table, e.g. {missing[:3]}"


def test_committed_table_has_no_budget_failures():
    table = gate.load_table(gate.TABLE)
    assert table is not None
    fails = [r for r in table["configurations"] if r["failures"]]
    assert not fails, fails[:3]


def test_every_configuration_launches_under_the_register_limit_it_passes():
    """Each configuration passed ptxas its register limit (``maxnreg``: the budget, never more than
    a block of its warps can hold in an SM), and fits an SM on every target."""
    table = gate.load_table(gate.TABLE)
    assert table is not None
    for r in table["configurations"]:
        warps, limit = r["options"]["num_warps"], r["options"].get("maxnreg")
        assert limit is not None and limit <= 65536 // (32 * warps), r["key"]
        assert limit == r["register_budget"], r["key"]
        for cc, res in r["results"].items():
            assert res["regs"] <= limit and gate.occupancy(res["regs"], warps, res["shared"]) > 0, (r["key"], cc)


def test_a_block_that_does_not_fit_an_sm_fails_the_gate():
    """168 registers at 16 warps (86016 > 65536): such a block does not launch on any target."""
    only = re.compile(r"^ce llm-N8192-V50257 float32 index train$")
    launch = next(x for x in gate.enumerate_launches(only=lambda n: bool(only.search(n)))[0] if x.num_warps == 16)
    res = [{"cc": 90, "ok": True, "regs": 168, "spill_stores": 0, "spill_loads": 0, "shared": 0}]
    assert any("does not launch" in v for v in gate.verdicts(launch, res))
    res[0]["regs"] = 128
    assert gate.verdicts(launch, res) == []


def test_quick_form_fails_only_on_what_the_table_does_not_record(monkeypatch, tmp_path):
    """CI's quick form prints a failure the committed table records as KNOWN and fails on a new one."""
    import json

    only = re.compile(r"^ce cls-N8-C10 float32 index train$")
    launches = gate.enumerate_launches(only=lambda n: bool(only.search(n)))[0]
    res = gate.compile_all(launches, [90], jobs=1)
    monkeypatch.setattr(gate, "verdicts", lambda launch, results: ["sm_90: spills (4 bytes stored, 4 loaded)"])
    rows = [gate.row(x, r) for x, r in zip(launches, res)]
    meta = gate._meta([90], launches, 1)
    table = tmp_path / "t.json"
    table.write_text(json.dumps({"meta": meta, "configurations": rows}))
    argv = ["--quick", "--only", only.pattern, "--table", str(table), "--jobs", "1"]
    assert gate.main(argv) == 0  # recorded: known
    rows[0]["failures"] = []
    table.write_text(json.dumps({"meta": meta, "configurations": rows}))
    assert gate.main(argv) == 1  # not recorded: a failure


def test_occupancy_on_h100():
    assert gate.occupancy(240, 4, 0) == 0.125  # 8 of 64 warps
    assert gate.occupancy(128, 4, 0) == 0.25
    assert gate.occupancy(32, 4, 0) == 1.0
    assert gate.occupancy(64, 32, 0) == 0.5  # one 32-warp block
    assert gate.occupancy(32, 4, 100_000) == pytest.approx(2 * 4 / 64)  # shared memory bound


def test_verdicts():
    x = gate.Launch("m", "k", {}, {}, {}, {"num_warps": 4}, min_classes=10, max_classes=10)
    ok = {"cc": 90, "ok": True, "regs": 96, "spill_stores": 0, "spill_loads": 0, "shared": 1024}
    assert gate.verdicts(x, [ok]) == []
    assert "spills" in gate.verdicts(x, [dict(ok, spill_stores=4)])[0]
    assert "registers" in gate.verdicts(x, [dict(ok, regs=129)])[0]
    assert "shared memory" in gate.verdicts(x, [dict(ok, shared=300_000)])[0]
    assert "does not compile" in gate.verdicts(x, [{"cc": 90, "ok": False, "error": "boom"}])[0]
    wide = gate.Launch("m", "k", {}, {}, {}, {}, min_classes=4096, max_classes=4096)
    assert gate.verdicts(wide, [dict(ok, regs=200)]) == []


def test_gate_fails_on_a_spilling_and_a_broken_configuration(monkeypatch, tmp_path):
    """Compiled for real (sm_90, in worker processes without TRITON_INTERPRET): a kernel that keeps
    256 values per thread live spills, a 48-column block (not a power of two) does not compile,
    and either fails the gate; the same kernel at 2048 values passes."""
    import torch

    from safeloss.backends import triton_backend as tb
    from tests._aot_gate_kernels import spill_kernel

    rec = gate.Recorder()
    x = torch.empty(8192, device="meta")
    with rec.active():
        spill_kernel[(1,)](x, x, N=8192, num_warps=1)
        spill_kernel[(1,)](x, x, N=2048, num_warps=1)
    spill, fits = sorted(rec.launches.values(), key=lambda launch: -launch.own_constexprs()["N"])
    assert spill.module == "tests._aot_gate_kernels" and spill.signature["x_ptr"] == "*fp32"
    monkeypatch.setattr(tb, "FORCE_BLOCK_C", 48)
    only = re.compile(r"^ce cls-N4096-C10 float32 index fused$")
    broken = [x for x in gate.enumerate_launches(only=lambda n: bool(only.search(n)))[0] if x.name == "ce_scale_kernel"]
    assert len(broken) == 1
    for launch in (spill, fits, *broken):
        launch.min_classes = launch.max_classes = 10  # narrow rows: the 128-register budget
    res = gate.compile_all([spill, fits, *broken], [90], jobs=2)
    (s,), (f,), (b,) = res
    assert s["ok"] and s["spill_stores"] > 0 and s["spill_loads"] > 0, s
    assert f["ok"] and f["spill_stores"] == 0 and f["regs"] <= gate.NARROW_REGS, f
    assert not b["ok"] and "power of 2" in b["error"], b
    assert any("spills" in v for v in gate.verdicts(spill, [s]))
    assert gate.verdicts(fits, [f]) == []
    assert "does not compile" in gate.verdicts(broken[0], [b])[0]
    rows = [gate.row(x, r) for x, r in zip([spill, fits, *broken], res)]
    meta = {"targets": [90], "triton": "t", "torch": "t", "commit": "c", "n_cases": 3, "compile_seconds": 0}
    gate.write(str(tmp_path), rows, meta)
    md = (tmp_path / "aot-gate.md").read_text()
    assert "**FAIL**" in md and "spills" in md and "does not compile" in md
    doc = json.loads((tmp_path / "aot-gate.json").read_text())
    assert [bool(r["failures"]) for r in doc["configurations"]] == [True, False, True]


def test_before_after_of_narrow_rows():
    """The markdown's comparison: per narrow workload and kernel, the most registers over the
    configurations its calls chose and the lowest occupancy; wide workloads are left out."""

    def r(kernel, regs, warps, workloads, c):
        return {"kernel": kernel, "classes": [c, c], "workloads": workloads, "h100_occupancy": gate.occupancy(regs, warps, 0),
                "results": {"90": {"ok": True, "regs": regs, "num_warps": warps, "shared": 0}}}

    before = {"meta": {"commit": "abc", "triton": "t"}, "configurations": [
        r("ce_fwd_kernel", 240, 4, ["cls-N4096-C10"], 10), r("ce_fwd_kernel", 90, 4, ["cls-N4096-C10"], 10),
        r("ce_fwd_kernel", 200, 4, ["llm-N8192-V128256"], 128256)]}
    rows = [r("ce_fwd_kernel", 96, 4, ["cls-N4096-C10", "seg-B8-C21-512x512"], 10),
            r("ce_bwd_kernel", 64, 4, ["cls-N4096-C10"], 10)]
    text = "\n".join(gate.before_after(rows, before))
    assert "| cls-N4096-C10 | 10 | ce_fwd_kernel | 240 | 12.5% | 2 | 96 | 31.2% | 1 |" in text
    assert "| cls-N4096-C10 | 10 | ce_bwd_kernel | - | - | - | 64 | 50.0% | 1 |" in text
    assert "| seg-B8-C21-512x512 | 21 | ce_fwd_kernel | - | - | - | 96 | 31.2% | 1 |" in text
    assert "llm-N8192" not in text
    assert "before at most 240 registers, 1 of 2 over 128" in text and "now at most 96 registers, 0 of 2" in text


def test_enumeration_reaches_every_extras_combination():
    """The LLM / RL extras run through their entries (ce.extras, linear.extras): every combination
    of the four options picks its kernel constexprs (XFORM 0/1/2, ZLOSS, STATS) from the dispatch
    code, forward and backward, on the cross-entropy op and the linear tile alike."""
    import itertools

    only = re.compile(r"^extras cls-N4096-C10 bfloat16 index train |^extras-linear lin-N4096-H256-C10 float32 "
                      r"eps=0.0 weight=False mean ")
    launches = gate.enumerate_launches(only=lambda n: bool(only.search(n)))[0]
    ce = [x for x in launches if any(c.startswith("extras ") for c in x.cases)]
    lin = [x for x in launches if any(c.startswith("extras-linear ") for c in x.cases)]

    def combos(ls, kernel, names):
        return {tuple(x.own_constexprs()[k] for k in names) for x in ls if x.name == kernel}

    every = set(itertools.product((0, 1, 2), (False, True), (False, True))) - {(0, False, False)}
    for ls in (ce, lin):
        assert combos(ls, "ce_fwd_kernel", ("XFORM", "ZLOSS", "STATS")) == every
        assert combos(ls, "ce_bwd_kernel", ("XFORM", "ZLOSS")) == set(itertools.product((0, 1, 2), (False, True)))
    assert {x.own_constexprs()["CHECK_SOFTMAX"] for x in ce if x.name == "ce_fwd_kernel"} == {True}
    assert {x.own_constexprs()["CHECK_SOFTMAX"] for x in lin if x.name == "ce_fwd_kernel"} == {False}
    names = [c for x in ce for c in x.cases]
    assert any(c.endswith("return_stats=True") for c in names)  # the case names say which options ran
