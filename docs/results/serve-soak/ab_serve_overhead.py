"""A/B of serve's per-request overhead (``benchmarks/firmware_loop.py`` (d)) between two commits' server code.

    .venv/bin/python docs/results/serve-soak/ab_serve_overhead.py --old d620ebf --new 1826842 --requests 1000

Alternates old, new, old, new, old, new: each step puts that commit's ``cxr_edge/serve.py`` and
``cxr_edge/cli.py`` in the working tree (the server is a fresh process each time; the in-process
baseline does not use them) and runs (d) at ``--prefetch 0`` and ``1``. The files are put back at
the end. A one-off check of session 27 (the send deadline makes every socket call wait at most a tick).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
FILES = ("cxr_edge/serve.py", "cxr_edge/cli.py")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", required=True)
    p.add_argument("--new", required=True)
    p.add_argument("--requests", type=int, default=1000)
    args = p.parse_args()

    import firmware_loop as fl
    from cxr_edge.engine import Engine

    tmp = Path(tempfile.mkdtemp(prefix="ab-", dir="/tmp"))
    versions = {rev: {f: subprocess.run(["git", "show", f"{rev}:{f}"], cwd=REPO, check=True, capture_output=True).stdout
                      for f in FILES} for rev in (args.old, args.new)}
    kept = {f: (REPO / f).read_bytes() for f in FILES}
    try:
        engine = Engine(None)
        png = fl.make_images(tmp, 1, 1024)[0]
        for rev in [args.old, args.new] * 3:
            for f, data in versions[rev].items():
                (REPO / f).write_bytes(data)
            d = fl.serve_overhead(engine, png, engine.classifier.bundle.path, None, tmp, args.requests)
            print(json.dumps({"code": rev, **{depth: (d[depth]["paired_overhead_ms"]["median"],
                                                      d[depth]["paired_overhead_ms"]["ci95"])
                                              for depth in ("prefetch0", "prefetch1")}}), flush=True)
    finally:
        for f, data in kept.items():
            (REPO / f).write_bytes(data)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
