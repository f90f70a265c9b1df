"""Long-tail (issue 22, paper Table 7): per-class prompt quotas met and recorded, the long-tail
few-shot set, head / tail mIoU."""

import json
from pathlib import Path

import numpy as np
import pytest

from datasetdm.errors import DatasetdmError
from datasetdm.prompts.base import Prompt, PromptList
from datasetdm.prompts.quota import QuotaPrompts

CLASSES = ["dog", "cat", "bus"]
# an imbalanced prompt file: dogs everywhere, one prompt names a bus, one a cat and a bus
POOL = [Prompt(f"a dog number {i}", ("dog",)) for i in range(20)] + [
    Prompt("a bus on a road", ("bus",)), Prompt("a cat beside a bus", ("cat", "bus"))]


def _plan(n=40, quota=6, seed=0):
    return QuotaPrompts(PromptList(POOL, seed=seed), POOL, CLASSES, n, quota, seed=seed)


def test_quota_is_met_and_counted():
    q = _plan()
    plan = [q.prompt(i) for i in range(40)]
    counts = {c: sum(c in p.classes for p in plan) for c in CLASSES}
    assert all(counts[c] >= 6 for c in CLASSES), counts
    assert q.counts == counts  # what the run records is what the plan holds
    assert q.record()["prompted"] == counts and q.record()["quota"] == 6
    # without a quota the same source leaves the rare classes far below it
    base = PromptList(POOL, seed=0)
    plain = [base.prompt(i) for i in range(40)]
    assert sum("cat" in p.classes for p in plain) < 6


def test_quota_plan_is_deterministic_in_the_seed():
    a = [_plan(seed=1).prompt(i).text for i in range(40)]
    assert a == [_plan(seed=1).prompt(i).text for i in range(40)]
    assert a != [_plan(seed=2).prompt(i).text for i in range(40)]


def test_quota_errors_name_the_problem():
    with pytest.raises(DatasetdmError, match="no prompt names horse"):
        QuotaPrompts(PromptList(POOL), POOL, CLASSES + ["horse"], 40, 2, where="prompts.txt")
    with pytest.raises(DatasetdmError, match="more than --n 10"):
        _plan(n=10, quota=6)
    with pytest.raises(DatasetdmError, match="at least 1"):
        _plan(quota=0)


def test_generate_with_a_class_quota_records_the_counts(tmp_path, tiny_clip_path):
    """generate --class-quota on the tiny backbone (attention labels: no decoder to train): every
    class is prompted at least N times, and run.json and the manifest's metadata record it."""
    from datasetdm.formats.sample import Category
    from datasetdm.formats.shards import read_manifest, read_run_info
    from datasetdm.generation.setup import generate_labelled

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(p.text for p in POOL) + "\n")
    cats = [Category(i + 1, c) for i, c in enumerate(CLASSES)]
    generate_labelled(tmp_path / "run", labeler="attention", backbone=str(tiny_clip_path), n=8, seed=0, steps=1,
                      guidance=1.0, batch_size=4, prompts=prompts, categories=cats, class_quota=2,
                      show_progress=False)
    recorded = read_run_info(tmp_path / "run")["config"]["class_quota"]
    rows = read_manifest(tmp_path / "run").to_pylist()
    counts = {c: sum(c in r["classes"] for r in rows) for c in CLASSES}
    assert recorded["quota"] == 2 and recorded["prompted"] == counts
    assert all(v >= 2 for v in counts.values()), counts
    meta = json.loads(read_manifest(tmp_path / "run").schema.metadata[b"datasetdm"])
    assert meta["config"]["class_quota"] == recorded


def test_long_tail_set_has_exactly_its_caps():
    from datasetdm.world.folders import class_image_counts, long_tail_scenes

    scenes = long_tail_scenes("train", 0, ["star", "ball"], head_images=3, tail_images=1)
    counts = class_image_counts(scenes)
    assert counts["star"] == counts["ball"] == 1
    assert all(v == 3 for k, v in counts.items() if k not in ("star", "ball"))
    again = long_tail_scenes("train", 0, ["star", "ball"], head_images=3, tail_images=1)
    assert [s.id for s in again] == [s.id for s in scenes]
    with pytest.raises(DatasetdmError, match="--tail dragon"):
        long_tail_scenes("train", 0, ["dragon"])


def test_long_tail_folder_and_command(tmp_path):
    from typer.testing import CliRunner

    from datasetdm.cli import app
    from datasetdm.formats.labelled_folder import read_labelled_folder

    result = CliRunner().invoke(app, ["world", "long-tail", "--out", str(tmp_path / "lt"), "--tail", "car",
                                      "--head-images", "2", "--tail-images", "1"])
    assert result.exit_code == 0, result.output
    line = json.loads(result.output.strip().splitlines()[-1])
    assert line["class_images"]["car"] == 1 and line["class_images"]["tree"] == 2
    assert len(read_labelled_folder(tmp_path / "lt")) == line["images"]


def test_a_quota_that_cannot_fit_is_refused_before_anything_trains(tmp_path):
    """A long-tail run whose --class-quota needs more samples than --n-synthetic stops after rendering
    its real set (seconds), with generation's own message, before the decoder trains (session 24 lost
    the no-quota half's hours to this)."""
    from datasetdm.evaluation.downstream import build_and_run, plan_long_tail_quota
    from datasetdm.world.folders import render_long_tail_folder

    real = render_long_tail_folder(tmp_path / "lt", "train", 0, ["star"], head_images=3, tail_images=1)
    counts = plan_long_tail_quota(real, 2, 40)
    assert min(counts.values()) >= 2 and set(counts) >= {"star", "person"}
    with pytest.raises(DatasetdmError, match=r"--class-quota 30: meeting it for 9 classes takes \d+ samples, more "
                                             r"than --n 40"):
        plan_long_tail_quota(real, 30, 40)
    with pytest.raises(DatasetdmError, match="--class-quota 30"):
        build_and_run(tmp_path / "run", test_seed=1, n_synthetic=40, long_tail=["star"], head_images=3,
                      tail_images=1, class_quota=30)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["real-lt-star-3-1"]  # no decoders, no shards


def test_long_tail_bench_refuses_bad_settings_before_its_run(tmp_path):
    """bench/long_tail.py checks its --joint recipe and that the quota fits before the hours-long first
    half: exit 1 with the reason, nothing written."""
    import subprocess
    import sys

    bench = Path(__file__).resolve().parents[1] / "bench" / "long_tail.py"
    for extra, message in ((["--joint", "bogus"], "--joint 'bogus'"),
                           (["--quota", "500", "--n-synthetic", "100"], "--class-quota 500")):
        done = subprocess.run([sys.executable, str(bench), "--out", str(tmp_path / "run"), *extra],
                              capture_output=True, text=True)
        assert done.returncode == 1 and message in done.stderr, done.stderr
        assert not (tmp_path / "run").exists()


def test_head_and_tail_miou():
    from datasetdm.evaluation.downstream import head_tail_miou
    from datasetdm.world.render import CATEGORIES

    per_class = {"real": {0: 0.9, 1: 0.8, 2: 0.2, 6: 0.4, 7: 0.6}, "joint": {0: 0.9, 1: 0.8}}
    out = head_tail_miou(per_class, list(CATEGORIES), ["ball", "star"])  # ids 2 and 6
    assert out["real_head_miou"] == pytest.approx(0.7) and out["real_tail_miou"] == pytest.approx(0.3)
    assert out["joint_tail_miou"] is None and out["joint_head_miou"] == pytest.approx(0.8)
    assert np.isfinite(out["real_head_miou"])


def test_domain_scenes_split_by_setting_and_lighting():
    """Domain shift (supplementary Table 9): source scenes from one setting and lighting, target
    scenes from every other."""
    from datasetdm.world.folders import domain_scenes, parse_domain

    assert parse_domain("grass:sunny") == ("grass", "sunny") and parse_domain("night") == (None, "night")
    with pytest.raises(DatasetdmError, match="'moon' is not a setting"):
        parse_domain("grass:moon")
    inside = domain_scenes("train", 0, 5, "grass", "sunny")
    assert all(s.meta["setting"] == "grass" and s.meta["lighting"] == "sunny" for s in inside)
    outside = domain_scenes("test", 0, 12, "grass", "sunny", inside=False)
    assert all(not (s.meta["setting"] == "grass" and s.meta["lighting"] == "sunny") for s in outside)
    assert len({s.meta["setting"] for s in outside}) > 1


@pytest.mark.slow
def test_domain_run_fine_tunes_its_joint_model_and_tests_outside_its_domain(tmp_path):
    """A tiny `downstream --domain` run end to end: real scenes from grass at noon only, the joint
    model fine-tuned (the default since the test-seed-2 comparison), the result file named for the
    domain and not for the recipe."""
    from datasetdm.evaluation.downstream import DownstreamConfig, build_and_run
    from datasetdm.formats.labelled_folder import read_labelled_folder
    from datasetdm.testing import make_tiny_backbone

    backbone = make_tiny_backbone(tmp_path / "bb", text_encoder="clip", sample_size=64)
    result = build_and_run(tmp_path / "run", test_seed=1, n_test=4, n_synthetic=4, backbone=str(backbone),
                           config=DownstreamConfig(steps=3, batch_size=4), decoder_iterations=3,
                           domain="grass:sunny", generation_steps=3)
    assert result["joint"] == "finetune" and result["domain"] == "grass:sunny"
    assert Path(result["result_file"]).name == "downstream-semantic-domain-grass-sunny-n4-steps3.json"
    real = read_labelled_folder(tmp_path / "run" / "real-domain-grass-sunny")
    assert len(real) == 100 and {(s.meta["setting"], s.meta["lighting"]) for s in real} == {("grass", "sunny")}


def test_downstream_domain_option_is_checked_first(tmp_path):
    from datasetdm.evaluation.downstream import build_and_run

    with pytest.raises(DatasetdmError, match="--domain"):
        build_and_run(tmp_path / "a", test_seed=1, domain="lava")
    with pytest.raises(DatasetdmError, match="drop --real"):
        build_and_run(tmp_path / "b", test_seed=1, domain="grass", real=tmp_path)


def test_zero_shot_real_set_and_seen_unseen_miou(tmp_path):
    """Zero-shot (Table 7): the unseen classes' labels are gone from the real set; seen, unseen and
    harmonic mIoU from per-class IoU."""
    from datasetdm.evaluation.downstream import build_and_run, seen_unseen_miou
    from datasetdm.formats.labelled_folder import read_labelled_folder
    from datasetdm.world.folders import render_seen_only_folder
    from datasetdm.world.render import CATEGORIES, render_scene

    folder = read_labelled_folder(render_seen_only_folder(tmp_path / "seen", "train", 0, 12, ["person", "car"]))
    for i, sample in enumerate(folder):
        original = render_scene("train", 0, i)
        gone = np.isin(original.semantic, [1, 9])
        assert (sample.semantic[gone] == 255).all() and (sample.semantic[~gone] == original.semantic[~gone]).all()
        assert all(inst.category_id not in (1, 9) for inst in sample.instances)
    out = seen_unseen_miou({"real": {0: 0.9, 1: 0.0, 2: 0.6, 3: 0.8, 9: 0.2}}, list(CATEGORIES), ["person", "car"])
    assert out["real_seen_miou"] == pytest.approx(0.7) and out["real_unseen_miou"] == pytest.approx(0.1)
    assert out["real_harmonic_miou"] == pytest.approx(2 * 0.7 * 0.1 / 0.8)
    with pytest.raises(DatasetdmError, match="--zero-shot dragon"):
        build_and_run(tmp_path / "a", test_seed=1, zero_shot=["dragon"])
    with pytest.raises(DatasetdmError, match="--zero-shot: semantic"):
        build_and_run(tmp_path / "b", test_seed=1, zero_shot=["car"], task="depth")
