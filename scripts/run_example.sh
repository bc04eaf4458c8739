#!/usr/bin/env bash
# Main job: set up the ComfyUI host (idempotent), then run an example workflow headless.
# Flags go to scripts/run_example.py (--once, --serve-seconds N, --workflow, --checkpoint, --subject,
# --style, --port, --output-dir, --models-dir).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$REPO/scripts/setup_host.sh"
exec "${LORARAR_HOST:-$REPO/.host}/venv/bin/python" "$REPO/scripts/run_example.py" "$@"
