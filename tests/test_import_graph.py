"""The packages import each other without cycles (scripts/import_graph.py walks every import statement)."""
import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "import_graph.py"


def _load():
    spec = importlib.util.spec_from_file_location("import_graph", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_no_import_cycles():
    mod = _load()
    g = mod.graph()
    assert "cxr_edge.imaging" in g and "models.train" in g
    assert mod.cycles(g) == []


def test_cycle_detection_finds_a_planted_cycle():
    mod = _load()
    assert mod.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
