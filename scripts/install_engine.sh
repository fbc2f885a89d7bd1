#!/usr/bin/env bash
# Install SGLang 0.5.23 and what it needs to serve, into a virtual environment (created if missing).
#
#   scripts/install_engine.sh VENV_DIR
#
# Target (ELDR_ENGINE_TARGET=auto|cpu|gpu, default auto: gpu when `nvidia-smi -L` lists a GPU):
#   cpu: pinned torch/torchvision/triton from PyPI (requirements/engine-cpu.txt + constraints),
#        `pip install --no-deps sglang==0.5.23`, and the project's import-only `sgl_kernel` shim
#        (shims/sgl_kernel_cpu): SGLang's CPU kernels exist only as a source build, and a few SGLang
#        modules import sgl_kernel on CPU. No CUDA-only kernel packages are installed.
#   gpu: stock `pip install sglang==0.5.23` with its own dependencies (real sglang-kernel, flashinfer...)
#        plus datasets; never the CPU shim.
# Idempotent: a stamp in the venv records the inputs of the last successful install; a re-run with
# unchanged inputs and a working import returns at once.
set -euo pipefail

VENV="${1:?usage: scripts/install_engine.sh VENV_DIR}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SGLANG_VERSION="0.5.23"
PIP_VERSION="25.3"
TARGET="${ELDR_ENGINE_TARGET:-auto}"
if [[ "$TARGET" == auto ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    TARGET=gpu
  else
    TARGET=cpu
  fi
fi
case "$TARGET" in cpu|gpu) ;; *) echo "ELDR_ENGINE_TARGET must be auto, cpu or gpu" >&2; exit 2;; esac

PYTHON="${PYTHON:-python3}"
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1

stamp_inputs() {
  echo "target=$TARGET sglang=$SGLANG_VERSION pip=$PIP_VERSION"
  cat "$ROOT/requirements/engine-cpu.txt" "$ROOT/requirements/engine-cpu-constraints.txt"
  find "$ROOT/shims/sgl_kernel_cpu" -type f \( -name '*.py' -o -name '*.toml' \) -print0 | sort -z | xargs -0 cat
}
STAMP="$VENV/.eldr-engine-stamp"
WANT="$(stamp_inputs | sha256sum | cut -d' ' -f1)"
check_import() {
  HF_HUB_OFFLINE=1 SGLANG_USE_CPU_ENGINE=$([[ $TARGET == cpu ]] && echo 1 || echo 0) \
    "$PY" -c "import sglang, sglang.srt.server_args, sglang.srt.managers.scheduler, sglang.srt.entrypoints.http_server; assert sglang.__version__ == '$SGLANG_VERSION', sglang.__version__" \
    >/dev/null 2>&1
}
quick_check() {
  "$PY" -c "import importlib.metadata as m; assert m.version('sglang') == '$SGLANG_VERSION'" >/dev/null 2>&1
}
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]] && quick_check; then
  echo "install_engine: $VENV is up to date (target $TARGET, sglang $SGLANG_VERSION)"
  exit 0
fi

echo "install_engine: installing SGLang $SGLANG_VERSION into $VENV (target $TARGET)"
"$PY" -m pip install -q "pip==$PIP_VERSION"
if [[ "$TARGET" == gpu ]]; then
  if "$PY" -m pip show -q sglang-eldr-sgl-kernel-cpu-shim >/dev/null 2>&1; then
    "$PY" -m pip uninstall -y -q sglang-eldr-sgl-kernel-cpu-shim
  fi
  "$PY" -m pip install -q "sglang==$SGLANG_VERSION" "datasets"
else
  "$PY" -m pip install -q -r "$ROOT/requirements/engine-cpu.txt" -c "$ROOT/requirements/engine-cpu-constraints.txt"
  "$PY" -m pip install -q --no-deps "sglang==$SGLANG_VERSION"
  # Build the shim from a copy so that no build/ or *.egg-info lands in the source tree.
  TMP="$(mktemp -d)"; trap 'rm -rf "$TMP"' EXIT
  cp -r "$ROOT/shims/sgl_kernel_cpu" "$TMP/"
  "$PY" -m pip install -q --force-reinstall --no-deps "$TMP/sgl_kernel_cpu"
fi
if ! check_import; then
  echo "install_engine: SGLang does not import in $VENV; details:" >&2
  SGLANG_USE_CPU_ENGINE=$([[ $TARGET == cpu ]] && echo 1 || echo 0) "$PY" -c "import sglang.srt.entrypoints.http_server" >&2 || true
  exit 1
fi
echo "$WANT" > "$STAMP"
echo "install_engine: done ($("$PY" -c 'import torch, sglang; print("sglang", sglang.__version__, "torch", torch.__version__)'))"
