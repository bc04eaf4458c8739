#!/usr/bin/env bash
# Set up the ComfyUI host and the browser (idempotent), then run the test suite.
# Extra arguments go to pytest, e.g.  bash scripts/test.sh -m "not e2e"   (math + in-process ComfyUI only)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$REPO/scripts/setup_host.sh"
bash "$REPO/scripts/install_browser.sh"
cd "$REPO"
exec "${LORARAR_HOST:-$REPO/.host}/venv/bin/python" -m pytest "$@"
