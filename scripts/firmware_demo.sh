#!/usr/bin/env bash
# Firmware-style use of `cxr-edge serve`: start it once, classify files over its Unix socket, stop it with SIGTERM.
#
#   bash scripts/firmware_demo.sh [IMAGE...]        (default: the bundled sample radiograph)
#   env: CXR="cxr-edge" (or ".venv/bin/python -m cxr_edge.cli"), MODEL=bundle.onnx, SOCK=/tmp/cxr-edge.sock
#
# One reply line per image (the same JSON object as `cxr-edge predict --json`, plus "id"). Uses socat when
# installed, else python3's socket module. Not a medical device.
set -euo pipefail
CXR=${CXR:-cxr-edge}
SOCK=${SOCK:-/tmp/cxr-edge-$$.sock}
[ $# -gt 0 ] || set -- cxr_edge/data/sample_chest_pa.png

$CXR serve --socket "$SOCK" ${MODEL:+--model "$MODEL"} --quiet &
PID=$!
trap 'kill -TERM "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true' EXIT
for _ in $(seq 600); do [ -S "$SOCK" ] && break; kill -0 "$PID" 2>/dev/null || exit 4; sleep 0.1; done

python3 -c 'import json, socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rw")
print(json.dumps({"id": "health", "op": "health"}), file=f, flush=True); print(f.readline(), end="")' "$SOCK"

n=0
for img in "$@"; do
  n=$((n + 1))
  req=$(python3 -c 'import json, os, sys; print(json.dumps({"id": int(sys.argv[1]), "path": os.path.abspath(sys.argv[2])}))' "$n" "$img")
  if command -v socat >/dev/null 2>&1; then
    printf '%s\n' "$req" | socat -t 60 - UNIX-CONNECT:"$SOCK"        # the one-liner a firmware script needs
  else
    python3 -c 'import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(sys.argv[2].encode() + b"\n"); print(s.makefile().readline(), end="")' "$SOCK" "$req"
  fi
done
