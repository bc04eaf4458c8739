#!/usr/bin/env bash
# Install what tests/e2e/test_browser.py needs: Debian's headless-capable Chromium, and the
# Python side of the driver in the host venv. Idempotent: a second run installs nothing.
#
# The test drives Chromium itself over the DevTools protocol (a small client in the test, on
# aiohttp, which ComfyUI already requires), so there is no Playwright/Selenium and no browser
# download: only the system package /usr/bin/chromium.
#
#   LORARAR_HOST      host install (default: the default host of devkit/hosts.json), see scripts/setup_host.sh
#   LORARAR_CHROMIUM  browser binary (default: /usr/bin/chromium)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HOST="${LORARAR_HOST:-$(python3 "$REPO/devkit/hosts.py" get "$(python3 "$REPO/devkit/hosts.py" default)" folder)}"
PY="$HOST/venv/bin/python"
CHROMIUM="${LORARAR_CHROMIUM:-/usr/bin/chromium}"
log() { echo "[install_browser] $*"; }

if [ ! -x "$CHROMIUM" ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    log "no $CHROMIUM and no apt-get: install Chromium by hand (or set LORARAR_CHROMIUM)"
    exit 1
  fi
  SUDO=""
  if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
  log "installing Debian's chromium package"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-liberation
fi
"$CHROMIUM" --version

if [ -x "$PY" ]; then
  # The DevTools client uses aiohttp (a ComfyUI requirement): install it only if it is absent.
  if ! "$PY" -c "import aiohttp" 2>/dev/null; then
    log "installing aiohttp into $HOST/venv"
    "$PY" -m pip install -q --disable-pip-version-check aiohttp
  fi
else
  log "no host venv at $HOST/venv yet (run scripts/setup_host.sh): skipped the Python part"
fi
log "ready: $CHROMIUM"
