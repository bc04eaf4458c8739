#!/usr/bin/env bash
# Main job: set up the ComfyUI host (idempotent), then run an example workflow headless.
#   --host VERSION   which ComfyUI of devkit/hosts.json (default: the current one, 0.33.0; 0.3.75 is the old one)
# Other flags go to scripts/run_example.py (--once, --serve-seconds N, --workflow, --checkpoint, --subject,
# --style, --port, --output-dir, --models-dir).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VERSION="$(python3 "$REPO/devkit/hosts.py" default)"
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --host) VERSION="${2:?--host needs a version, e.g. 0.3.75}"; shift 2 ;;
    --host=*) VERSION="${1#--host=}"; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
bash "$REPO/scripts/setup_host.sh" "$VERSION"
FOLDER="${LORARAR_HOST:-$(python3 "$REPO/devkit/hosts.py" get "$VERSION" folder)}"
export LORARAR_COMFY="$FOLDER/ComfyUI" LORARAR_PYTHON="$FOLDER/venv/bin/python"
exec "$FOLDER/venv/bin/python" "$REPO/scripts/run_example.py" ${args[@]+"${args[@]}"}
