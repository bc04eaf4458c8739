"""scripts/gpu_check.py runs in the suite: without a GPU it says so and exits 0, and its checks run end to end
with the CPU standing in for the GPU (the real run happens on a lent GPU machine; docs/BENCHMARKS.md)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


def gpu_check(*args, timeout=900):
    return subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the real check applies")
def test_without_a_gpu_it_says_so_and_exits_0():
    result = gpu_check()
    assert result.returncode == 0, result.stderr
    assert "no CUDA GPU on this machine" in result.stdout and "nothing to check" in result.stdout


def test_every_check_runs_with_the_cpu_standing_in(tmp_path):
    result = gpu_check("--simulate-on-cpu", "--work", str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = result.stdout[result.stdout.index("| check |"):]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 6 and all("| PASS |" in row for row in rows), table
    assert "golden merge" in table and "LoraLoaders" in table and "sampling step" in table and "float16" in table
    assert "ZipLoRA" in table and "training steps" in table
