"""Render a bench result as a plain-text or markdown report; the JSON layout is documented here.

JSON schema ``cxr-edge-bench/1`` (``--json out.json``); times in milliseconds, sizes in bytes:

- ``schema`` "cxr-edge-bench/1", ``tool``, ``created_utc`` (ISO 8601), ``duration_s``
- ``machine``: ``arch``, ``system``, ``platform``, ``cpu_model``, ``logical_cpus``, ``usable_cpus``,
  ``physical_cores``, ``isa`` (list: avx2, fma, avx512f, avx512_vnni, avx_vnni, amx_int8, asimd,
  asimddp, i8mm, sve, ...), ``int8_dot_product`` (bool), ``emulated`` (bool), ``python``,
  ``onnxruntime``, ``numpy``, ``opencv``, ``providers_available``, ``peak_fp32`` (null or ``ghz``,
  ``ghz_source``, ``flops_per_cycle_per_core``, ``cores``, ``gflops``, ``assumption``), ``notes``
- ``load_average``: ``start``, ``end`` (1-minute load average, null where the OS has none; a note
  flags a machine busy with other work)
- ``settings``: ``formats``, ``threads``, ``batches``, ``providers``, ``runs`` (null = auto policy),
  ``warmup``, ``cold_repeats``, ``split_repeats``, ``image`` (``path``, ``synthetic``)
- ``models``: one per bundle file measured:
  ``model`` (the family's plain X.onnx path, groups formats), ``path`` (the file measured, exactly the one
  named or found), ``format`` (fp32/fp16/int8/unknown), ``format_source`` (provenance.precision,
  provenance.format, or graph ...), ``named`` (bool: given with --model), ``format_note`` (when the file
  name disagrees), ``model_id``, ``model_sha256``, ``size_bytes``, ``labels``, ``input_size``,
  ``providers`` (active), ``mean_auc`` (this bundle's own: provenance.int8_verification.mean_auc_new for
  INT8, provenance.metrics.mean_auc otherwise; null when absent), ``mean_auc_source``, ``note``
  (manifest provenance.note or null),
  ``graph``: ``available``, ``params``, ``macs`` (per image), ``flops`` (= 2 x macs), ``macs_by_op``,
  ``depthwise_macs``, ``quantized``, ``uncounted``, ``reason``, ``rule`` (counted without the onnx package;
  null MACs with the reason when the graph cannot be run here),
  ``configs``: list of ``threads``, ``batch``, ``runs``, ``warmup``, ``latency_ms`` (``median``, ``p90``,
  ``p99``, ``mean``, ``min``, ``max``, ``std`` per batch call), ``latency_per_image_ms``,
  ``throughput_ips`` (images/s), ``achieved_gflops``, ``fraction_of_fp32_peak`` (null when unknown),
  ``scope_gate``: the input scope gate's cost per image: ``available`` (false, with ``reason``, for a bundle
  without a scope block), ``image_hw``, ``runs``, ``warmup``, ``pixel_rules_ms`` and ``feature_score_ms``
  (latency summaries as above), ``total_ms`` (sum of the two medians), ``features_shape``, ``k``,
  ``threshold``, ``image_in_scope``, ``image_score``, ``method``,
  ``split`` (optional): ``image_hw``, ``repeats``, ``threads``, ``stages_ms`` (``decode``, ``preprocess``,
  ``inference``, ``scope`` (null without a gate), ``cam``), ``total_ms``, ``share`` (fractions), ``method``,
  ``cam_available``,
  ``cold_start`` (optional): ``repeats``, ``threads``, ``cold_start_ms``, ``phases_ms_from_process_start``
  (``interpreter_ms``, ``import_ms``, ``session_ms``, ``first_prediction_ms``, cumulative), ``peak_rss_mib``,
  ``median`` (all medians), ``compiled_from_source`` / ``python_modules`` (imported modules that had no
  bytecode, so the start compiled them), ``dont_write_bytecode``, ``method``; or ``error`` when the fresh process could not run (e.g. under
  qemu-user, which cannot spawn a child interpreter)
- ``skipped``: list of ``model``, ``format``, ``path``, ``reason``
- ``recommendations``: per model with FP32 and INT8: ``model``, ``recommended_format``, ``int8_speedup``
  (geometric mean of fp32/int8 median latency), ``size_ratio_fp32_over_int8``, ``pairs``, ``reason``
- ``notes``: run policy, definitions, assumptions
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def _num(v: float | None, digits: int = 2) -> str:
    if v is None:
        return "n/a"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.1f}"
    if 0 < abs(v) < 1:
        return f"{v:.{max(digits, 3)}f}"
    return f"{v:.{digits}f}"


def _count(v: int | None, unit: str = "") -> str:
    if v is None:
        return "n/a"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if v >= scale:
            return f"{v / scale:.2f} {suffix}{unit}"
    return f"{v} {unit}".strip()


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool) -> str:
    """Aligned plain-text table, or a GitHub-flavoured markdown table."""
    cells = [list(map(str, headers))] + [[str(c) for c in r] for r in rows]
    if markdown:
        esc = [[c.replace("|", "\\|") for c in r] for r in cells]
        lines = ["| " + " | ".join(esc[0]) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    fmt = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(cells[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in cells[1:]])


def _name(m: dict[str, Any]) -> str:
    return Path(m.get("path") or m["model"]).name


def latency_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for m in result["models"]:
        for c in m["configs"]:
            lat = c["latency_ms"]
            frac = c["fraction_of_fp32_peak"]
            rows.append([_name(m), m["format"], c["threads"], c["batch"], c["runs"], _num(lat["median"]),
                         _num(lat["p90"]), _num(lat["p99"]), _num(c["latency_per_image_ms"]),
                         _num(c["throughput_ips"], 1), _num(c["achieved_gflops"], 1),
                         f"{100 * frac:.1f}%" if frac is not None else "n/a"])
    return rows


def cost_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for m in result["models"]:
        g, cold = m["graph"], m.get("cold_start") or {}
        failed = "error" in cold
        cold = {} if failed else cold
        phases = cold.get("phases_ms_from_process_start") or {}
        rows.append([_name(m), m["format"], f"{m['size_bytes'] / 1e6:.2f} MB",
                     _count(g.get("params")),
                     _count(g.get("macs")),
                     _count(g.get("flops")),
                     _num(cold.get("cold_start_ms"), 0) if cold else ("failed" if failed else "-"),
                     " / ".join(_num(phases.get(k), 0) for k in ("import_ms", "session_ms")) if cold else "-",
                     _num(cold.get("peak_rss_mib"), 0) if cold else "-",
                     _num(m["mean_auc"], 3) if m.get("mean_auc") is not None else "n/a"])
    return rows


def split_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for m in result["models"]:
        s = m.get("split")
        if not s:
            continue
        st, share = s["stages_ms"], s["share"]
        cell = lambda k: "n/a" if st.get(k) is None else f"{_num(st[k])} ({100 * share[k]:.0f}%)"  # noqa: E731
        rows.append([_name(m), m["format"], s["threads"], "x".join(map(str, s["image_hw"])), cell("decode"),
                     cell("preprocess"), cell("inference"), cell("scope"), cell("cam"), _num(s["total_ms"])])
    return rows


def scope_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for m in result["models"]:
        g = m.get("scope_gate")
        if not g:
            continue
        if not g.get("available"):
            rows.append([_name(m), m["format"], "-", "no scope block", "-", "-", "-"])
            continue
        rows.append([_name(m), m["format"], "x".join(map(str, g["image_hw"])), _num(g["pixel_rules_ms"]["median"], 3),
                     _num(g["feature_score_ms"]["median"], 3), _num(g["total_ms"], 3),
                     "yes" if g["image_in_scope"] else "no"])
    return rows


def render(result: dict[str, Any], markdown: bool = False) -> str:
    """The human report: latency, model cost, end-to-end split, scope gate cost, recommendations, machine, notes."""
    mach = result["machine"]
    h = (lambda t: f"### {t}") if markdown else (lambda t: f"== {t}")
    out = [h("Latency (per InferenceSession.run of one batch)"), table(
        ["model", "format", "threads", "batch", "runs", "median ms", "p90 ms", "p99 ms", "ms/image", "images/s",
         "GFLOP/s", "% FP32 peak"], latency_rows(result), markdown)]
    out += ["", h("Model cost (per image) and cold start (fresh process, median)"), table(
        ["model", "format", "file", "params", "MACs", "FLOPs", "cold start ms", "import / session ms",
         "peak RSS MiB", "mean AUC"], cost_rows(result), markdown)]
    srows = split_rows(result)
    if srows:
        out += ["", h("End-to-end split, batch 1 (median ms, share)"), table(
            ["model", "format", "threads", "image", "decode", "preprocess", "inference", "scope gate", "CAM",
             "total ms"], srows, markdown)]
    grows = scope_rows(result)
    if grows:
        out += ["", h("Scope gate cost per image (median ms; pixel rules before the model, feature score after)"),
                table(["model", "format", "image", "pixel rules", "feature score", "total", "image in scope"], grows,
                      markdown)]
    bullet = "- " if markdown else "  - "
    if result["recommendations"]:
        out += ["", h("Recommendation (FP32 vs INT8 on this machine)")]
        out += [f"{bullet}{Path(r['model']).name}: use **{r['recommended_format']}** — {r['reason']}" if markdown
                else f"{bullet}{Path(r['model']).name}: use {r['recommended_format']} — {r['reason']}"
                for r in result["recommendations"]]
    if result["skipped"]:
        out += ["", h("Skipped")] + [f"{bullet}{Path(s['model']).name} [{s['format']}]: {s['reason']}"
                                     for s in result["skipped"]]
    peak = mach.get("peak_fp32")
    out += ["", h("Machine"),
            f"{bullet}CPU: {mach['cpu_model']} ({mach['arch']}), {mach['physical_cores'] or '?'} cores, "
            f"{mach['usable_cpus']} usable logical CPUs{' [EMULATED]' if mach.get('emulated') else ''}",
            f"{bullet}ISA: {', '.join(mach['isa']) or 'unknown'}; INT8 dot-product: "
            f"{'yes' if mach['int8_dot_product'] else 'no'}",
            f"{bullet}onnxruntime {mach['onnxruntime']}, numpy {mach['numpy']}, opencv {mach['opencv']}, "
            f"python {mach['python']}; providers: {', '.join(result['settings']['providers'])}"]
    if peak:
        out.append(f"{bullet}FP32 peak: {peak['gflops']} GFLOP/s = {peak['cores']} cores x {peak['ghz']} GHz x "
                   f"{peak['flops_per_cycle_per_core']} FLOPs/cycle ({peak['assumption']}; clock from "
                   f"{peak['ghz_source']})")
    out += ["", h("Notes")] + [f"{bullet}{n}" for n in result["notes"]]
    return "\n".join(out) + "\n"
