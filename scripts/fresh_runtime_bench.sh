#!/usr/bin/env bash
# `cxr-edge-bench --device cpu` on a fresh, runtime-only install: what a device integrator gets.
#
#   bash scripts/fresh_runtime_bench.sh                     # full bench (minutes on 2 cores)
#   BENCH_ARGS="--runs 5 --batch 1 --cold-repeats 1 --split-repeats 1" bash scripts/fresh_runtime_bench.sh
#   env: PYTHON=python3 (the interpreter for the venv), KEEP=1 (keep the venv and bench.json),
#        REF_PYTHON=.venv/bin/python (an install WITH onnx for the independent params/MACs count)
#
# 1. a throwaway venv under /tmp, `pip install <repo>` WITHOUT extras (no torch, no onnx: checked);
# 2. `cxr-edge-bench --device cpu --json bench.json` on the default bundle, run outside the repository
#    so the installed package is what runs;
# 3. checks: the precision is the manifest's provenance.precision (and says so), the mean AUC is the
#    manifest's, params and MACs are counted (the protobuf walk, no onnx) and equal an independent
#    count made with the onnx package and its shape inference in REF_PYTHON (skipped when that
#    interpreter has no onnx). Exit 0 when all checks pass, 1 otherwise.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
REF_PYTHON=${REF_PYTHON:-$REPO/.venv/bin/python}
WORK=$(mktemp -d /tmp/cxr-edge-fresh-XXXXXX)
if [ "${KEEP:-0}" = 1 ]; then echo "keeping $WORK"; else trap 'rm -rf "$WORK"' EXIT; fi

echo "== venv: $WORK/venv ($("$PYTHON" --version 2>&1))"
"$PYTHON" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
start=$(date +%s)
"$VPY" -m pip install --quiet "$REPO"
echo "== pip install $REPO (no extras): $(( $(date +%s) - start )) s"
"$VPY" -m pip list --format=freeze 2>/dev/null | grep -i -E "^(cxr-edge|onnxruntime|numpy|opencv|pillow|pydicom|pylibjpeg)" || true
"$VPY" - <<'EOF'
import importlib.util, sys
present = [m for m in ("torch", "onnx", "onnxscript") if importlib.util.find_spec(m) is not None]
if present:
    sys.exit(f"not a runtime-only install: {', '.join(present)} importable")
print("runtime only: torch and onnx are not installed")
EOF

cd "$WORK"  # not the repository: the installed cxr_edge is imported, not the source tree
echo "== $WORK/venv/bin/cxr-edge-bench --device cpu ${BENCH_ARGS:-}"
# shellcheck disable=SC2086
"$WORK/venv/bin/cxr-edge-bench" --device cpu --json "$WORK/bench.json" ${BENCH_ARGS:-}

REF='{}'
if "$REF_PYTHON" -c "import onnx" 2>/dev/null; then
  BUNDLE=$("$VPY" -c "from cxr_edge.bundle import load_bundle; print(load_bundle(None, threads=1).path)")
  REF=$("$REF_PYTHON" - "$BUNDLE" <<'EOF'
"""Independent params/MACs with the onnx package: Conv/Gemm/MatMul weights, shapes from onnx shape inference."""
import json, sys
import numpy as np
import onnx
from onnx import shape_inference
m = onnx.load(sys.argv[1])
first = m.graph.input[0].type.tensor_type.shape.dim[0]
if not first.dim_value:
    first.dim_value = 1  # batch 1
m = shape_inference.infer_shapes(m)
shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
          for vi in [*m.graph.value_info, *m.graph.output, *m.graph.input]}
inits = {t.name: list(t.dims) for t in m.graph.initializer}
params = macs = 0
for n in m.graph.node:
    if n.op_type in ("Conv", "Gemm", "MatMul"):
        params += sum(int(np.prod(inits[i])) for i in n.input[1:] if i in inits)
    if n.op_type == "Conv":
        macs += int(np.prod(shapes[n.output[0]])) * int(np.prod(inits[n.input[1]][1:]))
    elif n.op_type == "Gemm":
        macs += int(np.prod(inits[n.input[1]]))
    elif n.op_type == "MatMul" and n.input[1] in inits:
        macs += int(np.prod(shapes[n.output[0]])) * inits[n.input[1]][0]
print(json.dumps({"params": params, "macs": macs, "by": "onnx " + onnx.__version__ + " shape inference"}))
EOF
)
fi

echo "== checks"
"$VPY" - "$WORK/bench.json" "$REF" <<'EOF'
import json, sys
from cxr_edge.bundle import load_bundle

bench, ref = json.load(open(sys.argv[1])), json.loads(sys.argv[2])
manifest = load_bundle(None, threads=1).manifest
prov = manifest.provenance
(row,) = [m for m in bench["models"] if m.get("named")]
graph = row.get("graph") or {}
checks = [
    ("precision = manifest provenance.precision", row["format"] == prov.get("precision"),
     f"{row['format']} ({row.get('format_source')}) vs manifest {prov.get('precision')}"),
    ("precision read from the manifest", row.get("format_source") == "provenance.precision", row.get("format_source")),
    ("mean AUC = manifest provenance.metrics.mean_auc",
     row.get("mean_auc") == (prov.get("metrics") or {}).get("mean_auc"),
     f"{row.get('mean_auc')} ({row.get('mean_auc_source')})"),
    ("params/MACs counted without onnx", bool(graph.get("available")) and isinstance(graph.get("params"), int)
     and isinstance(graph.get("macs"), int), f"params {graph.get('params')}, MACs {graph.get('macs')}"),
]
if ref:
    checks.append((f"params = independent count ({ref['by']})", graph.get("params") == ref["params"],
                   f"{graph.get('params'):,} vs {ref['params']:,}"))
    checks.append((f"MACs = independent count ({ref['by']})", graph.get("macs") == ref["macs"],
                   f"{graph.get('macs'):,} vs {ref['macs']:,}"))
else:
    print("  (no interpreter with onnx for the independent count: set REF_PYTHON)")
for name, ok, detail in checks:
    print(f"  [{'ok' if ok else 'FAIL'}] {name}: {detail}")
print(f"  model {row['model_id']}, load average {bench['load_average']}")
sys.exit(0 if all(ok for _, ok, _ in checks) else 1)
EOF
