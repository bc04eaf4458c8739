"""The README's main command, scripts/run_example.py, run for real as a subprocess.

With no models configured it builds the synthetic models and LoRAs, starts ComfyUI headless on the
given port, runs the example workflow, prints the merge report, then serves (here for a few seconds,
``--serve-seconds``) and stops by itself. While it serves, this test asks the server /system_stats.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from devkit.comfy_server import free_port
from devkit.synthetic_models import host_python

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "run_example.py"
SERVE_SECONDS = 4


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "LORARAR_MODELS_DIR"}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


def test_run_example_runs_the_workflow_serves_and_stops(tmp_path, shared_weights):
    port = free_port()
    out_dir = tmp_path / "output"
    cmd = [str(host_python()), str(SCRIPT), "--port", str(port),
           "--serve-seconds", str(SERVE_SECONDS), "--output-dir", str(out_dir)]
    proc = subprocess.Popen(cmd, cwd=str(REPO), env=_env(LORARAR_WEIGHTS_DIR=str(shared_weights)),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines: list[str] = []
    serving = threading.Event()

    def reader():
        for line in proc.stdout:
            lines.append(line)
            if "[lorarar] serving http://127.0.0.1:" in line:
                serving.set()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    stats = None
    try:
        deadline = time.monotonic() + 240
        while not serving.is_set() and proc.poll() is None and time.monotonic() < deadline:
            serving.wait(0.2)
        if serving.is_set():  # the serve window: the server must answer
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/system_stats", timeout=5) as r:
                assert r.status == 200
                stats = json.loads(r.read())
        rc = proc.wait(timeout=max(deadline - time.monotonic(), 0) + 60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
        thread.join(timeout=10)
    log = "".join(lines)

    assert rc == 0, log
    assert serving.is_set(), f"the script never said it was serving\n{log}"
    assert stats is not None and "system" in stats, stats
    assert "SYNTHETIC" in log
    assert "LoRA.rar merge: method=lorarar" in log and "hypernet 28" in log, log
    images = sorted(out_dir.glob("lorarar_SYNTHETIC_demo_*.png"))
    assert images and images[0].stat().st_size > 0, f"no image in {out_dir}: {list(out_dir.iterdir())}\n{log}"
    assert f"image: {images[0]}" in log or images[0].name in log, log
    assert "serve time is over: stopping the server" in log, log
    assert "Traceback" not in log, log
    # the server is gone once the script returned
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/system_stats", timeout=2)


def test_run_example_missing_models_dir_is_a_one_line_error(tmp_path):
    missing = tmp_path / "no-such-models"
    proc = subprocess.run([str(host_python()), str(SCRIPT), "--models-dir", str(missing), "--once"],
                          cwd=str(REPO), env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and str(missing) in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
