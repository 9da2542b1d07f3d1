#!/usr/bin/env bash
# Installs everything mae-transfer needs into a virtual environment, idempotently.
#
#   tools/setup_env.sh            # venv in ./.venv (override with MAE_VENV=/path)
#
# Steps, each skipped when already satisfied:
#   1. the venv and the pip requirements (requirements.txt, torch included; lvis apart);
#   2. mmcv 2.1.0 with compiled ops: built from source once (~19 min on 2 cores), the wheel is kept in
#      $MAE_CACHE/wheels so later installs take seconds;
#   3. detectron2: the official source when $DETECTRON2_SOURCE names it (a path or a pip URL) or when
#      the official repository answers; otherwise the pure-Python 0.6 release from the package registry
#      (mae_transfer/compat/detectron2_compat.py supplies the few pieces it lacks);
#   4. this project, editable.
# A stamp in the venv records the hash of the inputs, so a second run with nothing changed returns at once.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MAE_VENV:-$ROOT/.venv}"
CACHE="${MAE_CACHE:-$HOME/.cache/mae-transfer}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
MMCV_VERSION=2.1.0
LVIS_PIN=lvis==0.5.3
D2_FALLBACK=pb1-detectron2==0.6
D2_OFFICIAL_REPO=https://github.com/facebookresearch/detectron2.git

log() { printf '[setup %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

stamp_value() {
  cat "$ROOT/requirements.txt" "$ROOT/pyproject.toml" "${BASH_SOURCE[0]}" | sha256sum | cut -c1-16
}

if [ ! -x "$VENV/bin/python" ]; then
  log "creating venv $VENV with $("$PYTHON" --version)"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)
STAMP="$VENV/.mae-transfer-setup"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(stamp_value)" ]; then
  exit 0
fi

have() { "$PY" -c "$1" >/dev/null 2>&1; }

# 1. pip requirements (torch first: mmcv's build and detectron2's download need it importable).
if ! have "import torch, torchvision"; then
  log "installing torch + torchvision (~2 min)"
  "${PIP[@]}" install $(grep -E '^torch(vision)?==' "$ROOT/requirements.txt")
fi
log "installing requirements.txt"
"${PIP[@]}" install -q -r "$ROOT/requirements.txt"
# lvis (LVIS's evaluation API, read by detectron2's LVISEvaluator) without its declared
# dependencies (Cython, opencv-python and others it does not import, for pip to resolve against
# our pins); what it imports (numpy, matplotlib, pycocotools, cv2) is in requirements.txt
if ! have "import lvis"; then
  log "installing $LVIS_PIN (no dependencies)"
  "${PIP[@]}" install -q --no-deps "$LVIS_PIN"
fi

# 2. mmcv with compiled ops.
install_mmcv_wheel() {
  log "installing $(basename "$1")"
  "${PIP[@]}" install -q --no-deps --force-reinstall "$1"
  "${PIP[@]}" install -q addict yapf  # mmcv's own dependencies (the wheel went in with --no-deps)
}
install_mmcv() {
  # mmcv's ops link against torch's C++ ABI: the cache is keyed by torch version and Python tag.
  local key dir whl
  key=$("$PY" -c "import sys, torch; print(f'torch{torch.__version__.split(\"+\")[0]}-cp{sys.version_info[0]}{sys.version_info[1]}')")
  dir="$CACHE/wheels/$key"
  mkdir -p "$dir"
  whl=$(ls "$dir"/mmcv-"$MMCV_VERSION"-*.whl "$CACHE"/wheels/mmcv-"$MMCV_VERSION"-*.whl 2>/dev/null | head -n1 || true)
  if [ -n "$whl" ]; then
    install_mmcv_wheel "$whl"
    if have "import mmcv.ops"; then
      [ "$(dirname "$whl")" = "$dir" ] || mv "$whl" "$dir/"  # an unkeyed wheel from older scripts
      return
    fi
    log "cached $(basename "$whl") does not load with this torch: rebuilding"
    rm -f "$whl"
  fi
  log "building mmcv $MMCV_VERSION with ops from source: ~19 min on 2 cores, once (cached in $dir)"
  local tmp
  tmp=$(mktemp -d)
  # torch >= 2.14 headers need C++20, mmcv's setup.py appends -std=c++17: swap it on the way to g++.
  cat >"$tmp/cxx" <<'EOS'
#!/usr/bin/env bash
args=()
for a in "$@"; do [ "$a" = "-std=c++17" ] && a="-std=c++20"; args+=("$a"); done
exec "${MAE_REAL_CXX:-g++}" "${args[@]}"
EOS
  chmod +x "$tmp/cxx"
  CXX="$tmp/cxx" MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    "${PIP[@]}" wheel --no-build-isolation --no-deps -w "$tmp/wheels" "mmcv==$MMCV_VERSION"
  cp "$tmp"/wheels/mmcv-*.whl "$dir/"
  rm -rf "$tmp"
  install_mmcv_wheel "$(ls "$dir"/mmcv-"$MMCV_VERSION"-*.whl | head -n1)"
}
if ! have "import mmcv, mmcv.ops; assert mmcv.__version__ == '$MMCV_VERSION'"; then
  install_mmcv
fi

# 3. detectron2.
install_detectron2_fallback() {
  log "installing the pure-Python $D2_FALLBACK (no C++ ops; see README)"
  local tmp site
  tmp=$(mktemp -d)
  "${PIP[@]}" download -q --no-deps --no-binary :all: --no-build-isolation -d "$tmp" "$D2_FALLBACK"
  tar -xzf "$tmp"/*.tar.gz -C "$tmp"
  site=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  rm -rf "$site/detectron2"
  cp -r "$tmp"/*/detectron2 "$site/detectron2"
  rm -rf "$tmp"
}
write_detectron2_hook() {
  # The compatibility fixes must run before detectron2's submodules import: a .pth line loads
  # an import hook (standard library only) that applies them at the first `import detectron2`.
  local site hook
  site=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  hook="$ROOT/mae_transfer/compat/detectron2_hook.py"
  printf "import os, importlib.util as u; p = '%s'; s = os.path.isfile(p) and u.spec_from_file_location('mae_transfer_detectron2_hook', p); s and s.loader.exec_module(u.module_from_spec(s))\n" \
    "$hook" >"$site/mae_transfer_detectron2_compat.pth"
}
if ! have "import detectron2"; then
  if [ -n "${DETECTRON2_SOURCE:-}" ]; then
    log "installing detectron2 from $DETECTRON2_SOURCE"
    "${PIP[@]}" install --no-build-isolation "$DETECTRON2_SOURCE"
  elif timeout 10 git ls-remote "$D2_OFFICIAL_REPO" HEAD >/dev/null 2>&1; then
    log "installing the official detectron2 from source (compiles its ops)"
    "${PIP[@]}" install --no-build-isolation "git+$D2_OFFICIAL_REPO"
  else
    install_detectron2_fallback
  fi
fi
if ! "$PY" -c "import detectron2, glob, os, sys; sys.exit(not glob.glob(os.path.join(os.path.dirname(detectron2.__file__), '_C*.so')))" 2>/dev/null; then
  write_detectron2_hook  # no compiled ops: the pure-Python build needs the fixes
fi

# 4. this project.
log "installing mae-transfer (editable)"
"${PIP[@]}" install -q --no-deps --no-build-isolation -e "$ROOT"

"$PY" - <<'EOS'
import torch, timm, mmcv, mmcv.ops, mmseg, mmengine
from mae_transfer.compat import detectron2_compat  # noqa: F401  (patches before detectron2)
import detectron2
print(f"[setup] ok: torch {torch.__version__}, timm {timm.__version__}, mmcv {mmcv.__version__}, "
      f"mmseg {mmseg.__version__}, mmengine {mmengine.__version__}, detectron2 {detectron2.__version__}")
EOS
stamp_value >"$STAMP"
