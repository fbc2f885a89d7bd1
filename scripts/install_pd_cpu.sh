#!/usr/bin/env bash
# Add what SGLang PD disaggregation (Mooncake over TCP) needs on a CPU-only machine to a venv that
# scripts/install_engine.sh already populated. On a GPU host it installs Mooncake's CUDA build only.
#
#   scripts/install_pd_cpu.sh VENV_DIR
#
# Installs (pinned; idempotent; works offline once everything is present):
#   * Debian packages libibverbs1 ibverbs-providers (plus libnuma1 and libcurl4 if missing): Mooncake's
#     engine.so links libibverbs.so.1, libnuma.so.1 and libcurl.so.4 even when it only uses TCP.
#     apt-get is skipped when they are installed.
#   * Mooncake's transfer engine. Default (ELDR_MOONCAKE_VARIANT=non-cuda):
#     mooncake-transfer-engine-non-cuda, the same Mooncake release built without CUDA; it needs no
#     libcuda/libcudart, so nothing has to be on LD_LIBRARY_PATH.
#     ELDR_MOONCAKE_VARIANT=cuda: mooncake-transfer-engine (CUDA 12 build) + nvidia-cuda-runtime-cu12
#     (libcudart.so.12) + a stub libcuda.so.1 built from shims/cuda_stub/ into VENV_DIR/lib/eldr-cuda-stub/;
#     the script prints the LD_LIBRARY_PATH the servers then need. The two variants install the same
#     `mooncake` package directory, so switching uninstalls the other one first.
#   * VENV_DIR/lib/eldr-loopback/libeldr_loopback_bind.so from shims/loopback_bind/: an LD_PRELOAD
#     library that turns wildcard binds (Mooncake's handshake and data listeners, torch's TCPStore)
#     into binds to the server's own address (ELDR_BIND_ADDR, default 127.0.0.1). Set LD_PRELOAD to it in the servers' environment (printed at the end).
# Then runs scripts/pd_transfer_smoke.py: two transfer engines move 1 MiB over TCP on 127.0.0.1.
set -euo pipefail

VENV="${1:?usage: scripts/install_pd_cpu.sh VENV_DIR}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$VENV/bin/python"
[[ -x "$PY" ]] || { echo "install_pd_cpu: $PY not found; run scripts/install_engine.sh $VENV first" >&2; exit 2; }

MOONCAKE_VERSION="0.3.13.post1"
export PIP_DISABLE_PIP_VERSION_CHECK=1

# A GPU host gets Mooncake's CUDA build and none of the CPU-only pieces (same target rule as
# scripts/install_engine.sh: ELDR_ENGINE_TARGET=auto|cpu|gpu, auto = gpu when nvidia-smi lists one).
TARGET="${ELDR_ENGINE_TARGET:-auto}"
if [[ "$TARGET" == auto ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then TARGET=gpu; else TARGET=cpu; fi
fi
if [[ "$TARGET" == gpu ]]; then
  if "$PY" -c "import importlib.metadata as m; m.version('mooncake-transfer-engine-non-cuda')" 2>/dev/null; then
    echo "install_pd_cpu: GPU host: removing the CPU-only mooncake-transfer-engine-non-cuda"
    "$PY" -m pip uninstall -y -q mooncake-transfer-engine-non-cuda
  fi
  echo "install_pd_cpu: GPU host: pip install mooncake-transfer-engine==$MOONCAKE_VERSION (CUDA build); no CPU pieces"
  "$PY" -m pip install -q "mooncake-transfer-engine==$MOONCAKE_VERSION"
  exit 0
fi
CUDART_VERSION="12.8.90"
VARIANT="${ELDR_MOONCAKE_VARIANT:-non-cuda}"
case "$VARIANT" in
  non-cuda) MC_DIST="mooncake-transfer-engine-non-cuda"; MC_OTHER="mooncake-transfer-engine";;
  cuda)     MC_DIST="mooncake-transfer-engine";          MC_OTHER="mooncake-transfer-engine-non-cuda";;
  *) echo "ELDR_MOONCAKE_VARIANT must be non-cuda or cuda" >&2; exit 2;;
esac
APT_PKGS=(libibverbs1 ibverbs-providers libnuma1 libcurl4)
STUB_DIR="$VENV/lib/eldr-cuda-stub"
LOOPBACK_DIR="$VENV/lib/eldr-loopback"
LOOPBACK_SO="$LOOPBACK_DIR/libeldr_loopback_bind.so"
export PIP_DISABLE_PIP_VERSION_CHECK=1

log() { echo "install_pd_cpu: $*"; }

# ---------------------------------------------------------------- Debian packages
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
need_cc=0
command -v cc >/dev/null 2>&1 || need_cc=1
[[ $need_cc == 1 ]] && missing+=(gcc libc6-dev)
if ((${#missing[@]})); then
  log "apt-get install ${missing[*]}"
  SUDO=""; [[ $(id -u) == 0 ]] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  if ! $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; then
    $SUDO apt-get update -q >/dev/null
    $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
  fi
else
  log "Debian packages present (${APT_PKGS[*]})"
fi

# ---------------------------------------------------------------- pip packages
dist_version() {  # prints the installed version of a distribution, or nothing
  "$PY" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$1"
}
if [[ -n "$(dist_version "$MC_OTHER")" ]]; then
  log "removing $MC_OTHER (it shares the mooncake package directory with $MC_DIST)"
  "$PY" -m pip uninstall -y -q "$MC_OTHER"
  [[ -z "$(dist_version "$MC_DIST")" ]] || "$PY" -m pip uninstall -y -q "$MC_DIST"
fi
if [[ "$(dist_version "$MC_DIST")" != "$MOONCAKE_VERSION" ]]; then
  log "pip install $MC_DIST==$MOONCAKE_VERSION"
  "$PY" -m pip install -q "$MC_DIST==$MOONCAKE_VERSION"
else
  log "$MC_DIST $MOONCAKE_VERSION present"
fi

LD_DIRS=()
if [[ "$VARIANT" == cuda ]]; then
  if [[ "$(dist_version nvidia-cuda-runtime-cu12)" != "$CUDART_VERSION" ]]; then
    log "pip install nvidia-cuda-runtime-cu12==$CUDART_VERSION"
    "$PY" -m pip install -q --no-deps "nvidia-cuda-runtime-cu12==$CUDART_VERSION"
  fi
  CUDART_DIR="$("$PY" - <<'EOF'
import importlib.metadata as m, pathlib
d = m.distribution("nvidia-cuda-runtime-cu12")
libs = [d.locate_file(f) for f in d.files or [] if pathlib.PurePath(str(f)).name.startswith("libcudart.so.12")]
print(pathlib.Path(str(libs[0])).resolve().parent if libs else "")
EOF
)"
  [[ -n "$CUDART_DIR" ]] || { echo "install_pd_cpu: libcudart.so.12 not found in nvidia-cuda-runtime-cu12" >&2; exit 1; }
  if [[ ! "$STUB_DIR/libcuda.so.1" -nt "$ROOT/shims/cuda_stub/cuda_stub.c" ]]; then
    mkdir -p "$STUB_DIR"
    cc -shared -fPIC -O2 -Wall -Wl,-soname,libcuda.so.1 -o "$STUB_DIR/libcuda.so.1.tmp" "$ROOT/shims/cuda_stub/cuda_stub.c"
    mv -f "$STUB_DIR/libcuda.so.1.tmp" "$STUB_DIR/libcuda.so.1"
  fi
  # Every cu* driver symbol the Mooncake libraries import must be exported by the stub.
  MC_DIR="$("$PY" -c 'import importlib.util, os; print(os.path.dirname(importlib.util.find_spec("mooncake").origin))')"
  want="$(for so in "$MC_DIR"/*.so; do nm -D --undefined-only "$so" 2>/dev/null; done | awk '{print $NF}' \
          | sed 's/@.*//' | grep -E '^cu[A-Z]' | sort -u)"
  have="$(nm -D --defined-only "$STUB_DIR/libcuda.so.1" | awk '{print $NF}' | sort -u)"
  lacking="$(comm -23 <(echo "$want") <(echo "$have"))"
  if [[ -n "$lacking" ]]; then
    echo "install_pd_cpu: shims/cuda_stub/cuda_stub.c lacks driver symbols Mooncake imports:" $lacking >&2
    exit 1
  fi
  LD_DIRS=("$STUB_DIR" "$CUDART_DIR")
  log "libcuda stub: $STUB_DIR/libcuda.so.1 ($(echo "$want" | wc -l) driver symbols); cudart: $CUDART_DIR"
elif [[ -n "$(dist_version nvidia-cuda-runtime-cu12)" || -d "$STUB_DIR" ]]; then
  log "note: nvidia-cuda-runtime-cu12 / $STUB_DIR are left from a cuda-variant install and unused now"
fi

# ---------------------------------------------------------------- loopback-only binds
if [[ ! "$LOOPBACK_SO" -nt "$ROOT/shims/loopback_bind/loopback_bind.c" ]]; then
  mkdir -p "$LOOPBACK_DIR"
  cc -shared -fPIC -O2 -Wall -o "$LOOPBACK_SO.tmp" "$ROOT/shims/loopback_bind/loopback_bind.c" -ldl
  mv -f "$LOOPBACK_SO.tmp" "$LOOPBACK_SO"
  log "built $LOOPBACK_SO"
fi

# ---------------------------------------------------------------- smoke test
LDP=""
((${#LD_DIRS[@]})) && LDP="$(IFS=:; echo "${LD_DIRS[*]}")"
SMOKE_ENV=(MC_FORCE_TCP=1 "LD_PRELOAD=$LOOPBACK_SO")
[[ -n "$LDP" ]] && SMOKE_ENV+=("LD_LIBRARY_PATH=$LDP${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}")
if ! out="$(cd / && env "${SMOKE_ENV[@]}" timeout 120 "$PY" "$ROOT/scripts/pd_transfer_smoke.py" 2>&1)"; then
  echo "$out" | tail -20 >&2
  echo "install_pd_cpu: transfer smoke test failed" >&2
  exit 1
fi
log "$(echo "$out" | grep '^pd_transfer_smoke:')"
log "done ($MC_DIST $MOONCAKE_VERSION)."
echo "Environment for PD servers on this machine:"
echo "  MOONCAKE_PROTOCOL=tcp MC_FORCE_TCP=1 SGLANG_HOST_IP=127.0.0.1 LD_PRELOAD=$LOOPBACK_SO"
[[ -n "$LDP" ]] && echo "  LD_LIBRARY_PATH=$LDP"
exit 0
