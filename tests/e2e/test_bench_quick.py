"""Every benchmark's quick mode runs once per suite, so a benchmark cannot rot unnoticed (no timing asserted)."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


def test_merge_bench_quick_mode_runs_every_row():
    result = subprocess.run([sys.executable, str(REPO / "bench" / "merge_bench.py"), "--quick", "--out", "-"],
                            cwd=REPO, capture_output=True, text=True, timeout=1800)  # a rot check, not a timing: CI machines run it under load
    assert result.returncode == 0, f"bench failed:\n{result.stderr[-4000:]}\n{result.stdout[-2000:]}"
    assert "Rows that failed" not in result.stdout
    # one line per kind of row in the table: math, node and save all produced numbers
    for kind in ("merge math", "merge node", "save", "merge methods vs direct", "sampling-time methods (k-lora, est-lora): overhead", "ziplora: one optimisation step"):
        assert kind in result.stdout.lower(), f"no {kind!r} row in:\n{result.stdout}"
    assert "| failed:" not in result.stdout, "a merge method failed in the methods row"
    sampling_rows = [line for line in result.stdout.splitlines() if line.startswith("| synthetic KOALA-700M-class")]
    for method in ("k-lora", "est-lora"):  # the sampling-overhead table has a row per sampling-time method
        assert any(f"| {method} |" in line for line in sampling_rows), f"no {method} sampling-overhead row"
