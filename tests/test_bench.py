"""cxr-edge-bench: graph cost counting with known answers, result schema, errors and rendering.

No timing thresholds: only structure, counts and exit codes are asserted.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from cxr_edge.bench import graphstats  # noqa: E402
from cxr_edge.bench.cli import main  # noqa: E402
from cxr_edge.bench.machine import fp32_flops_per_cycle, machine_slug, parse_cpuinfo  # noqa: E402
from cxr_edge.bench.report import table  # noqa: E402
from cxr_edge.bench.timing import measure  # noqa: E402
from cxr_edge.bench.variants import resolve_variants  # noqa: E402

RNG = np.random.default_rng(0)


def _init(name: str, shape, dtype=np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array((RNG.normal(size=shape)).astype(dtype), name)


def _model(nodes, inits, in_shape, out_name, out_shape=None) -> bytes:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, out_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def conv_dw_gemm() -> bytes:
    """Conv 1->8 3x3 pad 1 on 16x16, depthwise 3x3 on 8 channels, GAP, Gemm 8->3 (batch symbolic)."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c1", "w2", "b2"], ["c2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=8),
        helper.make_node("GlobalAveragePool", ["c2"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], transB=1),
    ]
    inits = [_init("w1", (8, 1, 3, 3)), _init("b1", (8,)), _init("w2", (8, 1, 3, 3)), _init("b2", (8,)),
             _init("fw", (3, 8)), _init("fb", (3,))]
    return _model(nodes, inits, ["N", 1, 16, 16], "y", ["N", 3])


def test_macs_and_params_of_conv_depthwise_gemm():
    s = graphstats.graph_stats(conv_dw_gemm())
    assert s.available and not s.uncounted
    assert s.macs_by_op == {"Conv": 8 * 1 * 3 * 3 * 16 * 16, "Conv (depthwise)": 8 * 1 * 3 * 3 * 16 * 16, "Gemm": 24}
    assert s.macs == 18432 + 18432 + 24 and s.flops == 2 * s.macs
    assert s.depthwise_macs == 18432
    assert s.params == (72 + 8) + (72 + 8) + (24 + 3)
    assert not s.quantized


def test_stride_matmul_and_convtranspose():
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("ConvTranspose", ["c", "wt"], ["t"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Reshape", ["t", "shape"], ["r"]),
        helper.make_node("MatMul", ["r", "m"], ["y"]),
    ]
    # (the ConvTranspose output is 1 x 2 x 8 x 8 = 128 elements: reshaped to 1 x 8 x 16, a graph that runs;
    # the counts are measured by running it, so the test graph must be executable)
    inits = [_init("w", (4, 2, 3, 3)), _init("wt", (4, 2, 2, 2)), _init("m", (16, 5)),
             numpy_helper.from_array(np.array([1, 8, 16], dtype=np.int64), "shape")]
    s = graphstats.graph_stats(_model(nodes, inits, [1, 2, 8, 8], "y", [1, 8, 5]))
    conv = 4 * 4 * 4 * (2 * 3 * 3)          # out 4x4x4, each 2*9 MACs
    convt = (4 * 4 * 4) * (2 * 2 * 2)       # every input element scatters to C_out/g * k
    matmul = 8 * 5 * 16
    assert s.macs_by_op == {"Conv": conv, "ConvTranspose": convt, "MatMul": matmul}
    assert s.params == 72 + 32 + 80           # the int64 shape constant is not a parameter


def test_params_rule_excludes_bn_stats_and_quantization_metadata():
    """QDQ int8 conv weights count once (as int8 elements); BN mean/var, scales, zero points and scalars never."""
    w_int8 = numpy_helper.from_array(RNG.integers(-127, 127, size=(8, 1, 3, 3)).astype(np.int8), "w_q")
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], axis=0),
        helper.make_node("Conv", ["xd", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "g", "b", "mean", "var"], ["bn"]),
        helper.make_node("Mul", ["bn", "half"], ["y"]),
    ]
    inits = [w_int8, numpy_helper.from_array(np.full(8, 0.01, np.float32), "w_scale"),
             numpy_helper.from_array(np.zeros(8, np.int8), "w_zp"),
             numpy_helper.from_array(np.array(0.02, np.float32), "x_scale"),
             numpy_helper.from_array(np.array(128, np.uint8), "x_zp"),
             _init("g", (8,)), _init("b", (8,)), _init("mean", (8,)),
             numpy_helper.from_array(np.ones(8, np.float32), "var"),
             numpy_helper.from_array(np.array([0.5], np.float32), "half")]
    s = graphstats.graph_stats(_model(nodes, inits, ["N", 1, 16, 16], "y", ["N", 8, 16, 16]))
    assert s.params == 72 + 8 + 8
    assert s.macs == 8 * 9 * 16 * 16 and s.quantized


def test_graph_stats_need_no_onnx_package(monkeypatch, tiny_bundle):
    """A plain runtime install (no onnx) counts the same params and MACs (protobuf walk + onnxruntime shapes)."""
    with_onnx = graphstats.graph_stats(conv_dw_gemm())
    monkeypatch.setitem(sys.modules, "onnx", None)
    without = graphstats.graph_stats(conv_dw_gemm())
    assert without.available and without.macs == with_onnx.macs == 18432 + 18432 + 24
    assert without.params == with_onnx.params and without.macs_by_op == with_onnx.macs_by_op
    tiny = graphstats.graph_stats(tiny_bundle)  # symbolic N: batch fixed to 1
    assert tiny.params == 8 * 9 + 8 + 3 * 8 + 3 and tiny.macs == 8 * 9 * 8 * 8 + 3 * 8
    bad = graphstats.graph_stats(b"whatever")
    assert not bad.available and bad.macs is None and bad.params is None and "not a readable ONNX graph" in bad.reason


def test_graph_stats_reports_a_graph_it_cannot_run(monkeypatch):
    """Params are still counted when the shapes cannot be measured (here: a non-float input)."""
    nodes = [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
             helper.make_node("Conv", ["xf", "w"], ["y"], kernel_shape=[3, 3])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [_init("w", (2, 1, 3, 3))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    s = graphstats.graph_stats(model.SerializeToString())
    assert s.available and s.params == 18 and s.macs is None and "not a float tensor" in s.reason


def test_timing_summary_is_ordered():
    t = measure(lambda: sum(range(100)), runs=7, warmup=2)
    s = t.summary()
    assert t.runs == 7 and t.warmup == 2
    assert s["min"] <= s["median"] <= s["p90"] <= s["p99"] <= s["max"]


def test_parse_cpuinfo_x86_and_arm():
    x86 = ("processor : 0\nvendor_id : GenuineIntel\nmodel name : Xeon X\nflags : fpu avx avx2 fma avx512f "
           "avx512_vnni\ncpu MHz : 2100.0\nphysical id : 0\ncore id : 0\nprocessor : 1\nphysical id : 0\n"
           "core id : 0\n")
    info = parse_cpuinfo(x86)
    assert info["model"] == "Xeon X" and info["physical_cores"] == 1 and info["processors"] == 2
    assert {"avx512_vnni", "avx2"} <= info["flags"] and info["mhz"] == 2100.0
    assert fp32_flops_per_cycle("x86_64", info["flags"])[0] == 64
    assert fp32_flops_per_cycle("x86_64", {"avx", "avx2", "fma"})[0] == 32
    arm = "processor : 0\nFeatures : fp asimd evtstrm fphp asimdhp asimddp\nCPU part : 0xd0c\n"
    info = parse_cpuinfo(arm)
    assert "asimddp" in info["flags"] and not info["x86_style"]
    assert fp32_flops_per_cycle("aarch64", info["flags"])[0] == 16
    assert machine_slug({"cpu_model": "Intel(R) Xeon(R) CPU @ 2.2GHz", "physical_cores": 4, "arch": "x86_64"}) \
        == "intel-xeon-4c-x86_64"


def test_resolve_variants_siblings_and_declared_format(tiny_bundle_factory, tmp_path):
    from tests.conftest import build_tiny_onnx, make_manifest
    from cxr_edge.bundle import write_bundle

    base = tiny_bundle_factory()
    variants, skipped = resolve_variants([str(base)], ["fp32", "int8"])
    assert [v.format for v in variants] == ["fp32"]
    assert skipped[0]["format"] == "int8" and "does not exist" in skipped[0]["reason"]
    # an .int8.onnx whose manifest declares fp32 is refused, not mislabelled
    b, w, bias = build_tiny_onnx(seed=1)
    write_bundle(b, make_manifest(w, bias, provenance={"format": "fp32"}), base.with_name(base.stem + ".int8.onnx"))
    variants, skipped = resolve_variants([str(base)], ["fp32", "int8"])
    assert [v.format for v in variants] == ["fp32"] and "manifest says" in skipped[0]["reason"]
    with pytest.raises(Exception, match="unknown format"):
        resolve_variants([str(base)], ["fp64"])


def _run(args, capsys) -> tuple[int, str, str]:
    rc = main(args)
    out, err = capsys.readouterr()
    return rc, out, err


def test_json_schema_of_a_tiny_run(tiny_bundle, tmp_path, capsys):
    out_json = tmp_path / "r.json"
    rc, out, _ = _run(["--model", str(tiny_bundle), "--threads", "1", "--batch", "1,2", "--runs", "3",
                       "--warmup", "1", "--cold-repeats", "1", "--split-repeats", "2", "--json", str(out_json),
                       "--quiet"], capsys)
    assert rc == 0 and "Latency" in out
    r = json.loads(out_json.read_text())
    assert r["schema"] == "cxr-edge-bench/1"
    for key in ("tool", "created_utc", "machine", "settings", "models", "skipped", "recommendations", "notes"):
        assert key in r
    m = r["machine"]
    assert isinstance(m["isa"], list) and isinstance(m["int8_dot_product"], bool) and m["onnxruntime"] and m["numpy"]
    assert r["settings"]["image"]["synthetic"] is True
    assert [s["format"] for s in r["skipped"]] == ["int8"]
    (model,) = r["models"]
    assert model["format"] == "fp32" and model["size_bytes"] == tiny_bundle.stat().st_size
    assert model["graph"]["available"] and model["graph"]["params"] == 8 * 9 + 8 + 3 * 8 + 3
    assert model["graph"]["macs"] > 0 and model["graph"]["flops"] == 2 * model["graph"]["macs"]
    assert [(c["threads"], c["batch"]) for c in model["configs"]] == [(1, 1), (1, 2)]
    for c in model["configs"]:
        assert c["runs"] == 3 and c["throughput_ips"] > 0 and c["latency_per_image_ms"] > 0
        lat = c["latency_ms"]
        assert set(lat) == {"median", "p90", "p99", "mean", "min", "max", "std"}
        assert all(isinstance(v, float) for v in lat.values()) and lat["std"] >= 0
        assert all(lat[k] > 0 for k in ("median", "p90", "p99", "mean", "min", "max"))
    split = model["split"]
    assert split["image_hw"] == [1024, 1024] and split["repeats"] == 2
    assert all(split["stages_ms"][k] > 0 for k in ("decode", "preprocess", "inference", "cam"))
    assert abs(sum(split["share"].values()) - 1.0) < 1e-6
    cold = model["cold_start"]
    phases = cold["phases_ms_from_process_start"]
    assert 0 < phases["interpreter_ms"] <= phases["import_ms"] <= phases["session_ms"] <= phases["first_prediction_ms"]
    assert cold["peak_rss_mib"] > 0 and cold["cold_start_ms"] == phases["first_prediction_ms"]


def test_cold_start_measures_an_installed_start_and_counts_what_as_is_compiled(tiny_bundle, tmp_path,
                                                                             monkeypatch):
    """Where the environment never writes bytecode (an editable install under PYTHONDONTWRITEBYTECODE, as
    on this project's machines) every start compiles the sources, which an installed wheel never pays:
    ``as-is`` counts every module compiled, ``installed`` (the default) measures starts that compile none."""
    from cxr_edge.bench.coldstart import cold_start
    from cxr_edge.bench.pipeline import synthetic_radiograph

    image = tmp_path / "x.png"
    cv2.imwrite(str(image), synthetic_radiograph(256))
    monkeypatch.setenv("PYTHONPYCACHEPREFIX", str(tmp_path / "empty"))  # no bytecode anywhere
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    as_is = cold_start(str(tiny_bundle), str(image), 1, None, repeats=1, bytecode="as-is")
    assert as_is["dont_write_bytecode"] and as_is["compiled_from_source"] == as_is["python_modules"] > 50
    installed = cold_start(str(tiny_bundle), str(image), 1, None, repeats=1)
    assert installed["bytecode"] == "installed" and installed["compiled_from_source"] == 0
    assert not installed["dont_write_bytecode"] and installed["python_modules"] == as_is["python_modules"]
    assert not (tmp_path / "empty").exists()  # the private cache went elsewhere, and is gone
    with pytest.raises(ValueError, match="bytecode"):
        cold_start(str(tiny_bundle), str(image), 1, None, repeats=1, bytecode="warm")


def test_scope_gate_cost_is_reported_for_a_bundle_with_a_gate(scoped_bundle, tmp_path, capsys):
    from cxr_edge.bundle import read_manifest

    rc, out, _ = _run(["--model", str(scoped_bundle), "--threads", "1", "--batch", "1", "--runs", "3", "--warmup",
                       "1", "--cold-repeats", "0", "--split-repeats", "2", "--json", "-", "--quiet"], capsys)
    assert rc == 0
    (model,) = json.loads(out)["models"]
    g = model["scope_gate"]
    assert g["available"] is True and g["image_hw"] == [1024, 1024]
    assert g["runs"] == {"pixel_rules": 3, "feature_score": 3}
    for part in ("pixel_rules_ms", "feature_score_ms"):
        lat = g[part]
        assert 0 < lat["min"] <= lat["median"] <= lat["max"] < 10_000
    assert g["total_ms"] == pytest.approx(g["pixel_rules_ms"]["median"] + g["feature_score_ms"]["median"])
    scope = read_manifest(scoped_bundle.read_bytes()).scope
    assert g["threshold"] == pytest.approx(scope.threshold) and g["k"] == scope.k
    assert g["features_shape"][0] == scope.channels
    assert isinstance(g["image_in_scope"], bool) and g["image_score"] > 0
    split = model["split"]
    assert split["stages_ms"]["scope"] > 0 and abs(sum(split["share"].values()) - 1.0) < 1e-6
    rc, text, _ = _run(["--model", str(scoped_bundle), "--threads", "1", "--batch", "1", "--runs", "2", "--warmup",
                        "0", "--cold-repeats", "0", "--split-repeats", "0", "--quiet"], capsys)
    assert rc == 0 and "Scope gate cost per image" in text


def test_scope_gate_cost_says_when_a_bundle_has_no_gate(tiny_bundle, capsys):
    rc, out, _ = _run(["--model", str(tiny_bundle), "--threads", "1", "--batch", "1", "--runs", "2", "--warmup", "0",
                       "--cold-repeats", "0", "--split-repeats", "1", "--json", "-", "--quiet"], capsys)
    assert rc == 0
    (model,) = json.loads(out)["models"]
    assert model["scope_gate"]["available"] is False and "no scope block" in model["scope_gate"]["reason"]
    assert model["split"]["stages_ms"]["scope"] is None and "scope" not in model["split"]["share"]


def test_int8_pair_gets_a_recommendation(tiny_bundle_factory, capsys):
    from tests.conftest import build_tiny_onnx, make_manifest
    from cxr_edge.bundle import write_bundle

    base = tiny_bundle_factory()
    b, w, bias = build_tiny_onnx(seed=2)
    write_bundle(b, make_manifest(w, bias, provenance={"format": "int8"}), base.with_name(base.stem + ".int8.onnx"))
    rc, out, _ = _run(["--model", str(base), "--threads", "1", "--batch", "1", "--runs", "2", "--warmup", "0",
                       "--cold-repeats", "0", "--split-repeats", "0", "--json", "-", "--quiet"], capsys)
    assert rc == 0
    r = json.loads(out)
    assert [m["format"] for m in r["models"]] == ["fp32", "int8"] and not r["skipped"]
    (rec,) = r["recommendations"]
    assert rec["recommended_format"] in ("fp32", "int8") and rec["int8_speedup"] > 0 and rec["reason"]
    assert rec["pairs"][0]["fp32_ms"] > 0 and "split" not in r["models"][0]


def test_markdown_tables_render(tiny_bundle, capsys):
    rc, out, _ = _run(["--model", str(tiny_bundle), "--threads", "1", "--batch", "1", "--runs", "2", "--warmup", "0",
                       "--cold-repeats", "0", "--split-repeats", "1", "--markdown", "--quiet"], capsys)
    assert rc == 0
    lines = out.splitlines()
    blocks, current = [], []
    for line in lines + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            blocks.append(current)
            current = []
    assert len(blocks) == 4  # latency, cost, split, scope gate (a row saying the bundle has none)
    for block in blocks:
        widths = {ln.count("|") for ln in block}
        assert len(widths) == 1 and len(block) >= 3
        assert set(block[1].replace("|", "")) == {"-"}
    assert any(ln.startswith("### ") for ln in lines)
    assert "tiny" in blocks[0][2]


def test_plain_table_aligns():
    text = table(["a", "bb"], [["x", "1"], ["yyy", "22"]], markdown=False)
    assert len({len(ln) for ln in text.splitlines()}) == 1


@pytest.mark.parametrize("flags", [["--device", "cuda"], ["--provider", "NoSuchExecutionProvider"]])
def test_unavailable_provider_is_a_usage_error(tiny_bundle, capsys, flags):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers() and flags[-1] == "cuda":
        pytest.skip("CUDA is available here")
    rc, _, err = _run(["--model", str(tiny_bundle), *flags, "--quiet"], capsys)
    assert rc == 2
    assert "not available" in err and "CPUExecutionProvider" in err
    assert "provider_unavailable" in err


def test_usage_and_model_errors(tiny_bundle, tmp_path, capsys):
    assert _run(["--model", str(tiny_bundle), "--batch", "0"], capsys)[0] == 2
    assert _run(["--model", str(tiny_bundle), "--format", "fp64", "--quiet"], capsys)[0] == 2
    assert _run(["--model", str(tiny_bundle), "--device", "toaster", "--quiet"], capsys)[0] == 2
    rc, _, err = _run(["--model", str(tmp_path / "missing.onnx"), "--format", "fp32", "--quiet"], capsys)
    assert rc == 4 and "could not be loaded" in err
    broken = tmp_path / "broken.onnx"
    data = bytearray(tiny_bundle.read_bytes())
    data[100] ^= 0xFF  # inside the weights: the checksum must refuse it
    broken.write_bytes(bytes(data))
    rc, _, err = _run(["--model", str(broken), "--format", "fp32", "--quiet"], capsys)
    assert rc == 4


def test_bench_package_never_imports_torch():
    import subprocess

    code = ("import sys; sys.modules['torch'] = None\n"
            "import cxr_edge.bench.cli, cxr_edge.bench.runner, cxr_edge.bench.coldstart, cxr_edge.bench.pipeline\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr


def _entry(fmt: str, medians: dict, size: int, dw: int = 0) -> dict:
    return {"format": fmt, "size_bytes": size, "graph": {"macs": 1000, "depthwise_macs": dw},
            "configs": [{"threads": t, "batch": b, "latency_ms": {"median": v}} for (t, b), v in medians.items()]}


def test_recommendation_logic():
    from cxr_edge.bench.runner import _recommend

    avx2 = {"isa": ["avx2", "fma"], "int8_dot_product": False}
    vnni = {"isa": ["avx2", "avx512_vnni"], "int8_dot_product": True}
    fp32 = _entry("fp32", {(2, 1): 10.0, (2, 8): 80.0}, 4000, dw=500)
    r = _recommend("m", fp32, _entry("int8", {(2, 1): 5.0, (2, 8): 40.0}, 1000), vnni)
    assert r["recommended_format"] == "int8" and abs(r["int8_speedup"] - 2.0) < 1e-9 and "avx512_vnni" in r["reason"]
    assert r["size_ratio_fp32_over_int8"] == 4.0
    r = _recommend("m", fp32, _entry("int8", {(2, 1): 11.0, (2, 8): 88.0}, 1000), avx2)
    assert r["recommended_format"] == "fp32" and "not faster" in r["reason"] and "VNNI" in r["reason"]
    assert "depthwise convolutions (50% of MACs)" in r["reason"]
    r = _recommend("m", fp32, _entry("int8", {(2, 1): 5.0, (2, 8): 90.0}, 1000), avx2)  # faster on average only
    assert r["recommended_format"] == "fp32" and "not consistently faster" in r["reason"]
    r = _recommend("m", fp32, _entry("int8", {(1, 1): 5.0}, 1000), avx2)
    assert r["recommended_format"] is None and not r["pairs"]


# --------------------------------------------------------------------------- the bench tells the truth

def _write(path, seed=0, **provenance):
    from tests.conftest import build_tiny_onnx, make_manifest
    from cxr_edge.bundle import write_bundle

    b, w, bias = build_tiny_onnx(seed=seed)
    prov = {"architecture": "tiny-conv"}
    prov.update(provenance)
    write_bundle(b, make_manifest(w, bias, provenance=prov), path)
    return path


def test_the_named_file_is_measured_never_a_sibling(tmp_path):
    named = _write(tmp_path / "m.fp32.onnx", seed=1, precision="fp32")
    _write(tmp_path / "m.onnx", seed=2, precision="fp32")
    variants, skipped = resolve_variants([str(named)], None)
    assert variants[0].path == str(named) and variants[0].named and variants[0].format == "fp32"
    assert all(v.path != str(tmp_path / "m.onnx") for v in variants)  # a second fp32 is not swapped in
    assert [s["format"] for s in skipped] == ["int8"]


def test_precision_comes_from_the_manifest_then_the_graph_not_the_name(tmp_path):
    from cxr_edge.bench.variants import bundle_precision

    odd = _write(tmp_path / "odd.onnx", precision="int8")  # named like fp32, declared int8
    assert bundle_precision(odd) == ("int8", "provenance.precision")
    (v,), _ = resolve_variants([str(odd)], None)
    assert v.format == "int8" and v.format_source == "provenance.precision"
    plain = tmp_path / "plain.int8.onnx"  # named int8, no provenance, a float graph
    _write(plain)
    (v,), _ = resolve_variants([str(plain)], None)
    assert v.format == "fp32" and v.format_source.startswith("graph") and "file name says int8" in v.note
    qdq = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
           helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    model = _model(qdq, [numpy_helper.from_array(np.array(0.1, np.float32), "s"),
                         numpy_helper.from_array(np.array(0, np.uint8), "z")], [1, 1, 4, 4], "y", [1, 1, 4, 4])
    (tmp_path / "q.onnx").write_bytes(model)
    assert bundle_precision(tmp_path / "q.onnx") == ("int8", "graph (quantization ops)")


def test_format_filters_only_what_exists_and_says_what_is_missing(tmp_path):
    base = _write(tmp_path / "m.onnx", precision="fp32")
    variants, skipped = resolve_variants([str(base)], ["int8"])
    assert variants == []
    reasons = " | ".join(s["reason"] for s in skipped)
    assert "m.onnx is fp32 (provenance.precision), not in --format int8" in reasons
    assert "no int8 bundle in this family (m.int8.onnx does not exist" in reasons
    _write(tmp_path / "m.int8.onnx", seed=3, precision="int8")
    variants, skipped = resolve_variants([str(base)], ["int8"])
    assert [(Path(v.path).name, v.format, v.named) for v in variants] == [("m.int8.onnx", "int8", False)]
    variants, skipped = resolve_variants([str(base)], ["fp32", "int8", "fp16"])
    assert [v.format for v in variants] == ["fp32", "int8"] and [s["format"] for s in skipped] == ["fp16"]


def test_each_bundle_shows_its_own_auc(tmp_path, capsys):
    from cxr_edge.bench.runner import own_mean_auc
    from cxr_edge.bundle import read_manifest

    metrics = {"mean_auc": 0.6525}
    fp32 = _write(tmp_path / "m.onnx", precision="fp32", metrics=metrics)
    int8 = _write(tmp_path / "m.int8.onnx", seed=4, precision="int8", metrics=metrics,
                  int8_verification={"mean_auc_new": 0.6588, "mean_auc_ref": 0.6525})
    lone = _write(tmp_path / "lone.int8.onnx", seed=5, precision="int8", metrics=metrics)
    m = lambda p: read_manifest(p.read_bytes())  # noqa: E731
    assert own_mean_auc(m(fp32), "fp32") == (0.6525, "provenance.metrics.mean_auc")
    assert own_mean_auc(m(int8), "int8") == (0.6588, "provenance.int8_verification.mean_auc_new")
    value, why = own_mean_auc(m(lone), "int8")
    assert value is None and "float model" in why  # never the float model's number borrowed
    rc, out, _ = _run(["--model", str(fp32), "--threads", "1", "--batch", "1", "--runs", "2", "--warmup", "0",
                       "--cold-repeats", "0", "--split-repeats", "0", "--json", "-", "--quiet"], capsys)
    assert rc == 0
    r = json.loads(out)
    got = {Path(x["path"]).name: (x["format"], x["mean_auc"], x["format_source"]) for x in r["models"]}
    assert got == {"m.onnx": ("fp32", 0.6525, "provenance.precision"),
                   "m.int8.onnx": ("int8", 0.6588, "provenance.precision")}
