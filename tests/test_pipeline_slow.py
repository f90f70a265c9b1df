"""The demo and the downstream experiment end to end on the shipped backbone, in a small setting
(`make test-slow`)."""

import json

import pytest

pytestmark = pytest.mark.slow


def test_demo_small(tmp_path):
    from datasetdm.demo import run_demo
    from datasetdm.formats.labelled_folder import read_labelled_folder

    result = run_demo(tmp_path / "demo", n_samples=6, n_test=6, iterations=20, tasks=["semantic", "depth"],
                      show_progress=False)
    assert result["samples"] == 6
    assert 0.0 <= result["semantic_miou"] <= 1.0 and result["depth_abs_rel"] > 0
    exported = read_labelled_folder(tmp_path / "demo" / "dataset")
    assert len(exported) == 6 and all(s.semantic is not None and s.depth is not None for s in exported)
    assert (tmp_path / "demo" / "gallery" / "index.html").is_file()
    # a second run continues: every stage's output is there, nothing is redone or lost
    again = run_demo(tmp_path / "demo", n_samples=6, n_test=6, iterations=20, tasks=["semantic", "depth"],
                     show_progress=False)
    assert again["semantic_miou"] == result["semantic_miou"]


def test_downstream_small(tmp_path):
    from datasetdm.evaluation.downstream import DownstreamConfig, build_and_run

    result = build_and_run(tmp_path / "ds", test_seed=1, n_test=8, n_synthetic=6, decoder_iterations=20,
                           config=DownstreamConfig(steps=5))
    for key in ("real_miou", "synthetic_miou", "joint_miou"):
        assert 0.0 <= result[key] <= 1.0
    assert result["n_synthetic"] == 6 and result["n_real"] == 100
    saved = json.loads((tmp_path / "ds" / "downstream.json").read_text())
    assert saved["real_miou"] == pytest.approx(result["real_miou"], abs=1e-4)
