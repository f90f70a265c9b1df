"""The downstream harness: real / synthetic / joint segmenters scored on world test scenes."""

import json

import numpy as np
import pytest

from datasetdm.errors import DatasetdmError
from datasetdm.evaluation.downstream import (
    DownstreamConfig,
    format_table,
    load_semantic,
    run_downstream,
    world_test_set,
)
from datasetdm.formats.labelled_folder import LabelledFolderWriter, read_labelled_folder
from datasetdm.formats.sample import Category, LabelledSample
from datasetdm.world.render import CATEGORIES, render_scene


def _world_folder(path, split, seed, n, categories=CATEGORIES, remap=None):
    with LabelledFolderWriter(path, list(categories)) as w:
        for i in range(n):
            s = render_scene(split, seed, i)
            if remap is not None:
                s = LabelledSample(id=s.id, image=s.image, semantic=remap[s.semantic], caption=s.caption)
            w.add(s)
    return path


def test_synthetic_ids_are_matched_to_real_ones_by_name(tmp_path):
    # a synthetic folder that numbers the classes in reverse order, and knows a class the real data lacks
    n = len(CATEGORIES)
    reversed_cats = [Category(n + 1 - c.id, c.name) for c in CATEGORIES] + [Category(n + 1, "dragon")]
    remap = np.zeros(256, np.uint8)
    for c in CATEGORIES:
        remap[c.id] = n + 1 - c.id
    folder = _world_folder(tmp_path / "syn", "val", 3, 4, sorted(reversed_cats, key=lambda c: c.id), remap)
    images, masks = load_semantic(read_labelled_folder(folder), list(CATEGORIES), "synthetic")
    truth = np.stack([render_scene("val", 3, i).semantic for i in range(4)])
    assert np.array_equal(masks, truth) and images.shape == (4, 64, 64, 3)


def test_three_segmenters_are_trained_and_scored(tmp_path):
    real = _world_folder(tmp_path / "real", "train", 0, 8)
    syn = _world_folder(tmp_path / "syn", "val", 0, 16)
    x, y, cats = world_test_set(seed=5, n=6)
    assert x.shape == (6, 64, 64, 3) and y.shape == (6, 64, 64)
    result = run_downstream(real, syn, x, y, cats, DownstreamConfig(steps=30, batch_size=8))
    for key in ("real_miou", "synthetic_miou", "joint_miou"):
        assert 0.0 <= result[key] <= 1.0
    assert (result["n_real"], result["n_synthetic"], result["n_test"]) == (8, 16, 6)
    # background dominates every image: even 30 steps learn it
    assert all(result["per_class"][k][0] > 0.5 for k in ("real", "synthetic", "joint"))
    table = format_table(result, cats)
    assert "real + synthetic" in table and "24" in table.splitlines()[-1]


def test_cached_models_are_reused_across_synthetic_sets(tmp_path, monkeypatch):
    from datasetdm.evaluation import downstream

    real = _world_folder(tmp_path / "real", "train", 0, 4)
    syn_a = _world_folder(tmp_path / "a", "val", 0, 4)
    syn_b = _world_folder(tmp_path / "b", "val", 1, 4)
    x, y, cats = world_test_set(seed=5, n=3)
    config = DownstreamConfig(steps=3, batch_size=4)
    first = run_downstream(real, syn_a, x, y, cats, config, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("segmenter-*.json"))) == 3
    trained = []
    original = downstream._train
    monkeypatch.setattr(downstream, "_train", lambda *a, **k: trained.append(len(a[0])) or original(*a, **k))
    again = run_downstream(real, syn_a, x, y, cats, config, cache_dir=tmp_path / "cache")
    assert trained == [] and again == first  # resumed entirely from the cache, same figures and types
    other = run_downstream(real, syn_b, x, y, cats, config, cache_dir=tmp_path / "cache")
    # the real-only model came from the cache; synthetic, then the joint (synthetic, then real)
    assert trained == [4, 4, 4]
    trained.clear()
    mixed = run_downstream(real, syn_b, x, y, cats, config, cache_dir=tmp_path / "cache", joint="mixed")
    assert trained == [4 + 4] and mixed["joint"] == "mixed"  # one run on both sets; the others cached
    assert other["real_miou"] == first["real_miou"] and other["per_class"]["real"] == first["per_class"]["real"]


def test_runs_that_split_the_models_meet_in_the_shared_cache(tmp_path, monkeypatch):
    from datasetdm.evaluation import downstream

    real = _world_folder(tmp_path / "real", "train", 0, 4)
    syn = _world_folder(tmp_path / "syn", "val", 0, 4)
    x, y, cats = world_test_set(seed=5, n=3)
    config = DownstreamConfig(steps=3, batch_size=4)
    whole = run_downstream(real, syn, x, y, cats, config)  # no cache: all three trained here
    trained = []
    original = downstream._train
    monkeypatch.setattr(downstream, "_train", lambda *a, **k: trained.append(len(a[0])) or original(*a, **k))
    # one worker trains only the joint model (synthetic steps, then real); the others are left out
    joint_only = run_downstream(real, syn, x, y, cats, config, cache_dir=tmp_path / "cache", models=["joint"])
    assert trained == [4, 4] and joint_only["real_miou"] is None and joint_only["synthetic_miou"] is None
    assert joint_only["joint_miou"] == whole["joint_miou"] and set(joint_only["per_class"]) == {"joint"}
    table = format_table(joint_only, cats).splitlines()
    assert table[2].split()[1:3] == ["4", "-"] and table[4].split()[3:5] == ["8", f"{whole['joint_miou']:.3f}"]
    # the other worker trains the rest and finds the joint model in the cache: the whole run's figures
    trained.clear()
    rest = run_downstream(real, syn, x, y, cats, config, cache_dir=tmp_path / "cache", models=["real", "synthetic"])
    assert trained == [4, 4] and rest["per_class"] == whole["per_class"]
    assert [rest[f"{m}_miou"] for m in ("real", "synthetic", "joint")] == [
        whole[f"{m}_miou"] for m in ("real", "synthetic", "joint")]
    with pytest.raises(DatasetdmError, match="--models joint,teacher: choose among real, synthetic, joint"):
        run_downstream(real, syn, x, y, cats, config, models=["joint", "teacher"])


def test_figures_repeat_at_the_recorded_thread_count(tmp_path):
    import torch

    real = _world_folder(tmp_path / "real", "train", 0, 4)
    syn = _world_folder(tmp_path / "syn", "val", 0, 4)
    x, y, cats = world_test_set(seed=5, n=3)
    config = DownstreamConfig(steps=4, batch_size=4)
    first = run_downstream(real, syn, x, y, cats, config, cache_dir=tmp_path / "cache")
    threads = torch.get_num_threads()
    assert first["torch_threads"] == {"real": threads, "synthetic": threads, "joint": threads}
    # trained afresh at the same count: the same figures to the last digit
    again = run_downstream(real, syn, x, y, cats, config)
    assert again["per_class"] == first["per_class"] and again["joint_miou"] == first["joint_miou"]
    # a figure cached before the count was recorded says so (None), rather than claiming one
    for entry in (tmp_path / "cache").glob("segmenter-*.json"):
        stored = json.loads(entry.read_text())
        del stored["torch_threads"]
        entry.write_text(json.dumps(stored))
    old = run_downstream(real, syn, x, y, cats, config, cache_dir=tmp_path / "cache")
    assert old["torch_threads"] == {"real": None, "synthetic": None, "joint": None}
    assert old["joint_miou"] == first["joint_miou"]


def test_bad_inputs_name_the_folder(tmp_path):
    real = _world_folder(tmp_path / "real", "train", 0, 2)
    with LabelledFolderWriter(tmp_path / "small", list(CATEGORIES)) as w:
        s = render_scene("val", 0, 0)
        w.add(LabelledSample(id="a", image=s.image[:32, :32], semantic=s.semantic[:32, :32]))
    x, y, cats = world_test_set(seed=0, n=2)
    with pytest.raises(DatasetdmError, match="small"):
        run_downstream(real, tmp_path / "small", x, y, cats, DownstreamConfig(steps=1))
    with LabelledFolderWriter(tmp_path / "depth-only", list(CATEGORIES)) as w:
        w.add(LabelledSample(id="a", image=s.image, depth=s.depth))
    with pytest.raises(DatasetdmError, match="no semantic masks"):
        load_semantic(read_labelled_folder(tmp_path / "depth-only"), list(CATEGORIES), "synthetic")


def test_segmenter_trains_under_bf16_autocast():
    import torch

    from datasetdm.evaluation.segmenter import SegmenterTrainConfig, predict_segmenter, train_segmenter

    scenes = [render_scene("train", 0, i) for i in range(8)]
    x = np.stack([np.asarray(s.image) for s in scenes])
    y = np.stack([np.asarray(s.semantic) for s in scenes])
    models, losses = {}, {}
    for bf16 in (False, True):
        losses[bf16] = []
        cfg = SegmenterTrainConfig(steps=80, batch_size=8, lr=1e-2, bf16=bf16)
        models[bf16] = train_segmenter(x, {"semantic": y}, {"semantic": 10}, cfg, base=8, depth=3,
                                       progress=lambda step, loss, out=losses[bf16]: out.append(loss))
    for bf16, model in models.items():
        # both learn: the loss falls and most training pixels come out right (weights stay fp32)
        assert np.mean(losses[bf16][-5:]) < 0.5 * np.mean(losses[bf16][:5])
        assert (predict_segmenter(model, x)["semantic"] == y).mean() > 0.8
        assert all(p.dtype == torch.float32 for p in model.parameters())
    # the same seed and batches, but the bf16 forward rounds differently: the runs part ways
    a, b = (dict(models[k].named_parameters()) for k in (False, True))
    assert any(not torch.equal(a[n], b[n]) for n in a)


def test_recipes_are_one_definition_and_keep_their_cache_keys():
    """DownstreamConfig and TaskModelConfig are SegmenterTrainConfig with the check's steps; the
    fields they gained enter the cache key only when changed, so figures cached before are found."""
    from dataclasses import asdict

    from datasetdm.evaluation.downstream import _recipe_key
    from datasetdm.evaluation.segmenter import SegmenterTrainConfig
    from datasetdm.evaluation.task_models import TaskModelConfig

    semantic, task = DownstreamConfig(), TaskModelConfig()
    assert isinstance(semantic, SegmenterTrainConfig) and isinstance(task, SegmenterTrainConfig)
    assert semantic.steps == task.steps == 2000 and SegmenterTrainConfig().steps == 1500
    # the key dicts of version 1, before the recipes shared one definition
    assert _recipe_key(semantic, "segmenter") == {"steps": 2000, "batch_size": 32, "lr": 3e-3, "seed": 0, "bf16": False}
    old_task = {k: v for k, v in asdict(task).items() if k not in ("bf16", "zero_init_heads")}
    assert _recipe_key(TaskModelConfig(zero_init_heads=False), "task") == old_task
    assert _recipe_key(task, "task") == {**old_task, "zero_init_heads": True}  # today's recipe: a new key
    assert _recipe_key(DownstreamConfig(flip=False), "segmenter")["flip"] is False  # a change is a new key
    assert _recipe_key(TaskModelConfig(bf16=True), "task")["bf16"] is True
