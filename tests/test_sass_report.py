"""bench/sass_report.py runs (not its numbers): one small configuration, compiled for sm_90 on
the CPU; skipped where triton or its ptxas/cuobjdump are missing."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _report():
    spec = importlib.util.spec_from_file_location("sass_report", ROOT / "bench" / "sass_report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("sass_report", module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_sass_parsing_finds_the_outermost_loop():
    report = _report()
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   MUFU.EX2 R2, R3 ;
        /*0020*/              @P0 HGMMA.64x32x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0030*/                   LDG.E R4, desc[UR6][R2.64] ;
        /*0040*/                   FFMA R5, R4, R4, R5 ;
        /*0050*/              @P1 BRA 0x40 ;
        /*0060*/              @P2 BRA 0x10 ;
        /*0070*/                   STL [R1], R5 ;
        /*0080*/                   EXIT ;
    """
    ins = report.parse_sass(sass)
    assert [op for _, op, _ in ins][:3] == ["MOV", "MUFU.EX2", "HGMMA.64x32x16.F32.BF16"]
    best, inner = report.sweep_loop(ins)
    assert best == (0x10, 0x60) and inner == [(0x40, 0x50)]
    work = report.loop_work(ins, inner_trip=3.0)  # the inner loop (FFMA, BRA) runs 3 times
    assert work["ex2"] == 1 and work["tc"] == 1 and work["ldg"] == 1 and work["spill"] == 0
    assert work["total"] == 1 + 1 + 1 + 3 * 2 + 1


def test_report_runs_on_one_small_configuration(tmp_path):
    pytest.importorskip("triton")
    report = _report()
    reason = report.tools_missing()
    if reason:
        pytest.skip(reason)
    # in a process of its own: the kernels must be compiled, never interpreted, whatever
    # TRITON_INTERPRET this process had when it first imported triton
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, str(ROOT / "bench" / "sass_report.py"), "--quick", "--M", "256", "--P", "2",
           "--out", str(tmp_path), "--name", "sass_test"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with open(tmp_path / "sass_test.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {"fwd", "rows", "cols", "fwd+bwd"} <= {r["pass"] for r in rows}
    for r in rows:
        if r["pass"] in ("fwd", "rows", "cols"):
            assert float(r["instr_per_pair"]) > 0 and int(r["regs"]) > 0 and int(r["programs"]) >= 1
    assert "not a measurement" in (tmp_path / "sass_test.md").read_text()


def test_results_log_table_is_made_from_the_committed_report():
    report = _report()
    text = (ROOT / "examples" / "results" / "README.md").read_text()
    start, end = "<!-- sass-table:start -->\n", "<!-- sass-table:end -->"
    assert text.count(start) == 1 and text.count(end) == 1
    results = ROOT / "bench" / "results"
    want = report.readme_table(report.read_csv(results / "sass_report_before.csv"),
                               report.read_csv(results / "sass_report.csv"))
    assert text[text.index(start) + len(start):text.index(end)] == want, \
        "paste the output of `python bench/sass_report.py --readme` between the results log's sass-table markers"
