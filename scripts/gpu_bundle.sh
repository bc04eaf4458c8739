#!/usr/bin/env bash
# Pack what scripts/gpu_check.py needs on a lent GPU machine (no package registry there; Python 3.12 with its
# own CUDA torch) into .gpu/ (git-ignored), within the 64 MiB the working tree may carry:
#   .gpu/weights/        the published hypernets (from ../shared/weights; never committed: CC BY-NC-SA 4.0)
#   .gpu/comfyui.tar.gz  ComfyUI at the current host's pinned commit (devkit/hosts.json), unpacked there
#   .gpu/wheels/         cp312 wheels of ComfyUI's Python dependencies the lent machines lack, as many as fit
#   .gpu/site/           comfy_kitchen's Python code without its 176 MB CUDA/HIP binaries (it falls back to eager)
# Then, with carry [".gpu"]:   bash scripts/gpu_bundle.sh --install && python3 scripts/gpu_check.py
# Checks whose modules did not fit are reported as SKIP with the missing module named.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GPU="$REPO/.gpu"
BUDGET_MB="${LORARAR_GPU_BUDGET_MB:-56}"   # leaves room for the repository itself under the 64 MiB carry limit

if [ "${1:-}" = "--install" ]; then   # on the GPU machine
  mkdir -p "$GPU/site"
  [ -f "$GPU/ComfyUI/main.py" ] || tar xzf "$GPU/comfyui.tar.gz" -C "$GPU"
  # only what the machine lacks: its own numpy/pillow/transformers stay (they are built with its CUDA stack)
  missing=()
  for wheel in "$GPU"/wheels/*.whl; do
    dist="$(basename "$wheel" | cut -d- -f1)"
    python3 -m pip show -q "$dist" >/dev/null 2>&1 || missing+=("$wheel")
  done
  echo "[gpu_bundle] installing ${#missing[@]} missing: ${missing[*]##*/}"
  [ ${#missing[@]} -eq 0 ] || python3 -m pip install -q --no-index --no-deps --target "$GPU/site" "${missing[@]}" || true
  echo "[gpu_bundle] installed into $GPU/site; now: python3 scripts/gpu_check.py"
  exit 0
fi

rm -rf "$GPU" && mkdir -p "$GPU/weights" "$GPU/wheels" "$GPU/site"
cp "$REPO"/../shared/weights/*.pth "$GPU/weights/"
version="$(python3 "$REPO/devkit/hosts.py" default)"
cp "$REPO/../shared/hosts/$(python3 "$REPO/devkit/hosts.py" get "$version" tarball)" "$GPU/comfyui.tar.gz"
pin() { tar xzf "$GPU/comfyui.tar.gz" -O ComfyUI/requirements.txt | grep -E "^$1==" ; }  # ComfyUI's own pins
kitchen_tmp="$(mktemp -d)"   # comfy_kitchen: only its Python files (its CUDA/HIP binaries alone are 235 MB)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d "$kitchen_tmp" "$(pin comfy-kitchen)"
python3 - "$kitchen_tmp"/*.whl "$GPU/site" <<'PYEOF'
import pathlib, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    for name in wheel.namelist():
        if name.startswith("comfy_kitchen/") and name.endswith(".py"):
            target = pathlib.Path(sys.argv[2]) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(wheel.read(name))
PYEOF
rm -rf "$kitchen_tmp"
# ComfyUI's requirements the lent machines' image lacks (its package list, as published for those machines on
# 2026-11-17, has torch, numpy, pillow, scipy, transformers, tokenizers, sentencepiece, safetensors, einops, tqdm,
# psutil, pyyaml, aiohttp, yarl, filelock, requests, huggingface_hub). Resolved together so pins agree (pydantic and
# its core); what the image has is dropped here and again at --install. First GPU run (2026-11-26, H100): without
# av, 0.33.0's comfy_api fails to import and every ComfyUI check was SKIP.
needed=(torchsde trampoline "$(pin comfy-aimdo)" "av>=16.0.0" alembic mako "SQLAlchemy>=2.0.0" "simpleeval>=1.0.0"
        blake3 spandrel)
with_deps=("pydantic~=2.0" "pydantic-settings~=2.0")   # resolved with their dependencies, so pydantic-core matches
image_has=" torch numpy pillow scipy transformers tokenizers sentencepiece safetensors einops tqdm psutil pyyaml aiohttp yarl
 filelock requests huggingface_hub typing_extensions packaging regex urllib3 idna certifi charset_normalizer "
used() { du -sk "$GPU" | cut -f1; }
tmp="$(mktemp -d)"
fetch() {
  python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$tmp" "$@" 2>/dev/null || echo "[gpu_bundle] pip could not fetch all of: $*"
}
fetch --no-deps "${needed[@]}"
fetch "${with_deps[@]}"
for wheel in "$tmp"/*.whl; do
  [ -f "$wheel" ] || continue
  dist="$(basename "$wheel" | cut -d- -f1 | tr 'A-Z' 'a-z')"
  case "$image_has" in *" $dist "*) continue ;; esac
  size=$(du -sk "$wheel" | cut -f1)
  if [ $(( $(used) + size )) -gt $(( BUDGET_MB * 1024 )) ]; then
    echo "[gpu_bundle] left out $(basename "$wheel") ($(( size / 1024 )) MB): over the ${BUDGET_MB} MB budget"
  else
    mv "$wheel" "$GPU/wheels/"
  fi
done
rm -rf "$tmp"
echo "[gpu_bundle] $(( $(used) / 1024 )) MB in $GPU; carry it with the run: carry [\".gpu\"]"
