import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from devkit.synthetic_models import comfy_root  # noqa: E402  (needs the repo on sys.path)
from devkit.weights import shared_hypernet, shared_weights_dir  # noqa: E402


def host_version() -> str:
    """The version of the ComfyUI host under test (scripts/test.sh runs the suite once per host)."""
    try:
        text = (comfy_root() / "comfyui_version.py").read_text()
    except OSError:
        return "missing"
    match = re.search(r'__version__\s*=\s*"([^"]+)"', text)
    return match.group(1) if match else "unknown"


def pytest_report_header(config):
    return f"ComfyUI host under test: {host_version()} ({comfy_root()})"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Every failure names the host it happened on (in its report and in the short summary)."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        report.sections.append(("ComfyUI host", f"this failed on ComfyUI {host_version()} ({comfy_root()})"))


def pytest_terminal_summary(terminalreporter):
    failed = terminalreporter.stats.get("failed", []) + terminalreporter.stats.get("error", [])
    if failed:
        terminalreporter.write_line(f"on ComfyUI host {host_version()}: {len(failed)} failed: "
                                    + ", ".join(r.nodeid for r in failed), red=True)


@pytest.fixture(scope="session")
def shared_weights() -> Path:
    """The folder of the published hypernets (devkit.weights); the tests name the files through hypernet_file()."""
    if not shared_hypernet("sdxl").is_file():
        pytest.fail(f"published hypernets not found in {shared_weights_dir()} (set LORARAR_SHARED_WEIGHTS)")
    return shared_weights_dir()
