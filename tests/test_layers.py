"""The package layout keeps the pipeline's layers (scripts/check_layers.py, issue 17)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _checker():
    spec = importlib.util.spec_from_file_location("check_layers", ROOT / "scripts" / "check_layers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_layer_rule_holds():
    assert _checker().violations() == []


def test_checker_finds_an_upward_import(tmp_path, monkeypatch):
    checker = _checker()
    pkg = tmp_path / "datasetdm"
    (pkg / "world").mkdir(parents=True)
    (pkg / "world" / "bad.py").write_text("def f():\n    from datasetdm.evaluation.metrics import SemanticIoU\n")
    (pkg / "decoder").mkdir()
    (pkg / "decoder" / "x.py").write_text("from datasetdm.testing import make_tiny_backbone\nfrom datasetdm.decoder import y\n")
    (pkg / "demo.py").write_text("from datasetdm.embedded import gates\n")  # apps may import anything
    monkeypatch.setattr(checker, "PACKAGE", pkg)
    problems = checker.violations()
    assert len(problems) == 2
    assert "world (layer 2) imports datasetdm.evaluation.metrics (layer 6)" in problems[0] or \
        "world (layer 2) imports datasetdm.evaluation.metrics (layer 6)" in problems[1]
    assert any("test helpers" in p for p in problems)
