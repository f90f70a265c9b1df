"""Downstream for depth, instances and pose (issue 22, paper Table 2): the ordinary models, their
targets and decoding, the scorer, and the real / synthetic / joint harness with its cache."""

import json
import re

import numpy as np
import pytest
import torch

from datasetdm.errors import DatasetdmError
from datasetdm.evaluation.downstream import format_task_table, run_task_downstream, world_test_samples
from datasetdm.evaluation.task_models import (
    TaskModelConfig,
    group_instances,
    instance_targets,
    keypoint_targets,
    perfect_predictions,
    predict_task,
    score_task,
    task_data,
    train_task_model,
    _joint_positions,
)
from datasetdm.formats.labelled_folder import LabelledFolderWriter
from datasetdm.formats.sample import Instance, LabelledSample
from datasetdm.world.render import CATEGORIES, render_scene

TINY = dict(steps=3, batch_size=4, base=8, depth=3)


def _scenes(split, seed, n):
    return [render_scene(split, seed, i) for i in range(n)]


def _folder(path, split, seed, n, strip=None):
    with LabelledFolderWriter(path, list(CATEGORIES)) as w:
        for s in _scenes(split, seed, n):
            if strip == "depth":
                s = LabelledSample(id=s.id, image=s.image, semantic=s.semantic, instances=s.instances, caption=s.caption)
            if strip == "keypoints":
                s.instances = [Instance(i.category_id, i.mask) for i in s.instances]
            w.add(s)
    return path


@pytest.mark.parametrize("task", ["depth", "instance", "pose"])
def test_the_scorer_rates_ground_truth_perfect(task):
    test = world_test_samples(seed=4, n=12)
    metrics = score_task(task, perfect_predictions(task, test, CATEGORIES), test, CATEGORIES)
    if task == "depth":
        assert metrics["abs_rel"] == 0.0 and metrics["rmse"] == 0.0 and metrics["delta1"] == 1.0
    elif task == "instance":
        assert metrics["mask_ap"] == 1.0 and metrics["mask_ap50"] == 1.0
    else:
        assert metrics["keypoint_ap"] == 1.0 and metrics["mask_ap"] == 1.0
    # and a prediction that misses everything scores what it should: nothing
    empty = [{"depth": np.asarray(s.depth) * 2} if task == "depth" else {"instances": []} for s in test]
    worse = score_task(task, empty, test, CATEGORIES)
    if task == "depth":
        assert worse["abs_rel"] == pytest.approx(1.0) and worse["delta1"] == 0.0
    else:
        assert worse["mask_ap"] == 0.0


def _heads_from_targets(data, b, task):
    """The heads a perfect model would output for image ``b``: one-hot classes, the centre
    heatmap and offsets the training targets hold."""
    inst = torch.from_numpy(data.inst[b: b + 1])
    classes = torch.from_numpy(data.classes[b: b + 1])
    if task == "pose":
        classes = (classes > 0).long()
    semantic, heat, offsets, _ = instance_targets(inst, classes, sigma=2.0)
    n = 10 if task == "instance" else 2
    prob = torch.nn.functional.one_hot(semantic[0].clamp(max=n - 1), n).permute(2, 0, 1).float()
    return prob, heat[0, 0], offsets[0]


def test_instance_targets_decode_back_to_the_ground_truth():
    """Panoptic-DeepLab's encoding round trip: the centre heatmap and offsets built from the labels,
    grouped again, give back every instance (mask AP 1 on scenes whose centres lie apart)."""
    scenes = world_test_samples(seed=2, n=16)
    data = task_data(scenes, "instance", CATEGORIES)
    cfg = TaskModelConfig()
    preds = []
    for b in range(len(scenes)):
        prob, heat, offsets = _heads_from_targets(data, b, "instance")
        found = group_instances(prob, heat, offsets, cfg)
        preds.append({"instances": [Instance(int(cls), mask, score=score) for mask, cls, score in found]})
    counts = [len(p["instances"]) for p in preds], [len(s.instances) for s in scenes]
    assert counts[0] == counts[1]
    metrics = score_task("instance", preds, scenes, CATEGORIES)
    assert metrics["mask_ap50"] == 1.0 and metrics["mask_ap"] == 1.0


def test_keypoint_heatmaps_decode_back_to_the_joints():
    scenes = [s for s in (render_scene("test", 3, i) for i in range(80))
              if any(i.keypoints is not None and (i.keypoints[:, 2] > 0).sum() >= 5 for i in s.instances)][:6]
    assert scenes
    data = task_data(scenes, "pose", CATEGORIES)
    heat = keypoint_targets(torch.from_numpy(data.keypoints), (64, 64), sigma=2.0)
    preds = []
    for b, s in enumerate(scenes):
        people = [i for i in s.instances if i.keypoints is not None]
        insts = []
        for person in people:
            kp = _joint_positions(heat[b], np.asarray(person.mask))
            visible = person.keypoints[:, 2] > 0
            # each labelled joint found within the quarter-pixel refinement (unless two people's
            # same joints overlap)
            if len(people) == 1:
                assert np.abs(kp[visible, :2] - person.keypoints[visible, :2]).max() <= 0.25 + 1e-6
            insts.append(Instance(person.category_id, person.mask, keypoints=kp, score=1.0))
        preds.append({"instances": insts})
    metrics = score_task("pose", preds, scenes, CATEGORIES)
    assert metrics["keypoint_ap"] >= 0.95 and metrics["mask_ap"] == 1.0


def test_flipped_batches_mirror_offsets_and_swap_left_and_right():
    from datasetdm.evaluation.task_models import _flip_batch

    kp = torch.zeros(1, 1, 17, 3)
    kp[0, 0, 5] = torch.tensor([10.0, 20.0, 2.0])  # left shoulder at x = 10
    inst = torch.zeros(1, 8, 16, dtype=torch.uint8)
    inst[0, 2:4, 1:3] = 1
    batch = {"images": torch.zeros(1, 3, 8, 16), "inst": inst, "keypoints": kp}
    out = _flip_batch(batch, torch.tensor([True]), width=16)
    assert out["keypoints"][0, 0, 6].tolist() == [5.0, 20.0, 2.0]  # now the right shoulder, at 15 - 10
    assert out["keypoints"][0, 0, 5, 2] == 0
    assert out["inst"][0, 2:4, 13:15].all() and out["inst"].sum() == 4


@pytest.mark.parametrize("task", ["depth", "instance", "pose"])
def test_each_task_model_learns(task):
    """A few dozen steps on a handful of scenes: the training loss falls (by 25-70%; the heads start
    at zero output, so the first loss is already small), and the predictions come out in the
    scorer's form. Whether the model finds anything: the pose test below and the downstream runs."""
    scenes = _scenes("train", 0, 12)
    data = task_data(scenes, task, CATEGORIES)
    losses = []
    cfg = TaskModelConfig(steps=60, batch_size=8, base=8, depth=3, lr=1e-2)
    model = train_task_model(data, 10, cfg, progress=lambda step, loss: losses.append(loss))
    assert np.mean(losses[-5:]) < 0.85 * np.mean(losses[:5])
    preds = predict_task(model, task, data.images[:4], [c.id for c in CATEGORIES] if task == "instance" else [1], cfg)
    assert len(preds) == 4
    if task == "depth":
        assert all(p["depth"].shape == (64, 64) and (p["depth"] > 0).all() for p in preds)
    else:
        for p in preds:
            for inst in p["instances"]:
                assert inst.mask.shape == (64, 64) and 0 <= inst.score <= 1
                assert (inst.keypoints is not None) == (task == "pose")


def _scenes_with_people(split, n):
    out, index = [], 0
    while len(out) < n:
        scene = render_scene(split, 0, index)
        index += 1
        if any(i.keypoints is not None for i in scene.instances):
            out.append(scene)
    return out


def test_pose_model_finds_the_people_of_world_scenes():
    """The default recipe, briefly, on world scenes that show a person (~2% of the pixels of the
    whole set): the model outlines the people of unseen scenes. With randomly initialised centre
    and keypoint heads (their MSE weighted 200) it found no one, yet its loss fell by half."""
    train, test = _scenes_with_people("train", 24), _scenes_with_people("test", 16)
    cfg = TaskModelConfig(steps=100, batch_size=16, base=12, depth=3)
    model = train_task_model(task_data(train, "pose", CATEGORIES), 10, cfg)
    preds = predict_task(model, "pose", np.stack([s.image for s in test]), [1], cfg)
    assert sum(len(p["instances"]) for p in preds) >= 8
    assert score_task("pose", preds, test, CATEGORIES)["mask_ap50"] >= 0.3


@pytest.mark.parametrize("task", ["depth", "instance", "pose"])
def test_harness_trains_three_models_and_resumes_from_its_cache(task, tmp_path, monkeypatch):
    from datasetdm.evaluation import task_models

    real = _folder(tmp_path / "real", "train", 0, 6)
    syn_a = _folder(tmp_path / "a", "val", 0, 6)
    syn_b = _folder(tmp_path / "b", "val", 1, 6)
    test = world_test_samples(seed=5, n=4)
    cfg = TaskModelConfig(**TINY)
    first = run_task_downstream(task, real, syn_a, test, list(CATEGORIES), cfg, cache_dir=tmp_path / "cache")
    metric = {"depth": "abs_rel", "instance": "mask_ap", "pose": "keypoint_ap"}[task]
    assert first["task"] == task and first["metric"] == metric
    for name in ("real", "synthetic", "joint"):
        value = first[f"{name}_{metric}"]
        assert value is None or value >= 0.0  # AP may be null where nothing is scored, never made up
    assert (first["n_real"], first["n_synthetic"], first["n_test"]) == (6, 6, 4)
    assert len(list((tmp_path / "cache").glob(f"{task}-*.json"))) == 3
    assert "real + synthetic" in format_task_table(first)
    trained = []
    original = task_models.train_task_model
    monkeypatch.setattr(task_models, "train_task_model",
                        lambda data, *a, **k: trained.append(len(data)) or original(data, *a, **k))
    again = run_task_downstream(task, real, syn_a, test, list(CATEGORIES), cfg, cache_dir=tmp_path / "cache")
    assert trained == [] and json.dumps(again, sort_keys=True) == json.dumps(first, sort_keys=True)
    run_task_downstream(task, real, syn_b, test, list(CATEGORIES), cfg, cache_dir=tmp_path / "cache")
    # the real-only model came from the cache; synthetic, then the joint: synthetic first, real after
    assert trained == [6, 6, 6]
    trained.clear()
    mixed = run_task_downstream(task, real, syn_b, test, list(CATEGORIES), cfg, cache_dir=tmp_path / "cache",
                                joint="mixed")
    assert trained == [12] and mixed["joint"] == "mixed"  # only the other joint model: one run on both sets


def test_task_runs_that_split_the_models_meet_in_the_shared_cache(tmp_path, monkeypatch):
    from datasetdm.evaluation import task_models

    real = _folder(tmp_path / "real", "train", 0, 6)
    syn = _folder(tmp_path / "syn", "val", 0, 6)
    test = world_test_samples(seed=5, n=4)
    cfg = TaskModelConfig(**TINY)
    trained = []
    original = task_models.train_task_model
    monkeypatch.setattr(task_models, "train_task_model",
                        lambda data, *a, **k: trained.append(len(data)) or original(data, *a, **k))
    first = run_task_downstream("depth", real, syn, test, list(CATEGORIES), cfg, cache_dir=tmp_path / "cache",
                                models=["synthetic"])
    assert trained == [6] and set(first["models"]) == {"synthetic"} and first["synthetic_abs_rel"] > 0
    assert first["real_abs_rel"] is None and first["joint_delta1"] is None
    rows = format_task_table(first).splitlines()
    assert rows[2].split()[1:] == ["6", "-", "-"] and rows[3].split()[3] == f"{first['synthetic_abs_rel']:.4f}"
    trained.clear()
    rest = run_task_downstream("depth", real, syn, test, list(CATEGORIES), cfg, cache_dir=tmp_path / "cache")
    assert trained == [6, 6, 6]  # real, then the joint (synthetic, then real): the synthetic-only one was cached
    assert rest["synthetic_abs_rel"] == first["synthetic_abs_rel"] and rest["joint_abs_rel"] is not None


def test_finetune_joint_trains_on_synthetic_then_fine_tunes_that_model_on_real(tmp_path, monkeypatch):
    from datasetdm.evaluation import task_models

    real = _folder(tmp_path / "real", "train", 0, 6)
    syn = _folder(tmp_path / "syn", "val", 0, 5)
    cfg = TaskModelConfig(**{**TINY, "steps": 5})
    calls, original = [], task_models.train_task_model

    def spy(data, num_classes, config, **kw):
        model = original(data, num_classes, config, **kw)
        calls.append((len(data), config.steps, kw.get("init"), {k: v.clone() for k, v in model.state_dict().items()}))
        return model

    monkeypatch.setattr(task_models, "train_task_model", spy)
    result = run_task_downstream("instance", real, syn, world_test_samples(seed=5, n=2), list(CATEGORIES), cfg)
    assert result["joint"] == "finetune" and result["models"]["joint"]["images"] == 11
    (_, _, init_real, _), (_, _, init_syn, _), (n_pre, pre_steps, init_pre, pre), (n_ft, ft_steps, init_ft, _) = calls
    assert init_real is None and init_syn is None and init_pre is None
    assert (n_pre, pre_steps, n_ft, ft_steps) == (5, 2, 6, 3)  # synthetic for half the steps, real for the rest
    assert init_ft.keys() == pre.keys() and all(torch.equal(init_ft[k], pre[k]) for k in pre)  # from that model
    with pytest.raises(DatasetdmError, match="--joint 'both'"):
        run_task_downstream("instance", real, syn, [], list(CATEGORIES), cfg, joint="both")


def test_finetune_share_gives_the_real_set_its_part_of_the_steps(tmp_path, monkeypatch):
    from datasetdm.evaluation import task_models
    from datasetdm.evaluation.downstream import folder_task_data, joint_recipe, train_joint_task_model

    assert joint_recipe("finetune") == ("finetune", 0.5, True) and joint_recipe("mixed") == ("mixed", 0.5, True)
    assert joint_recipe("finetune:0.75") == ("finetune", 0.75, True)
    assert joint_recipe("mixed+real-joints", "pose") == ("mixed", 0.5, False)
    for bad in ("finetune:1", "finetune:0", "finetune:x", "mixed:0.5", "finetune:", "finetune+joints", "both+real-joints"):
        with pytest.raises(DatasetdmError, match=re.escape(f"--joint '{bad}'")):
            joint_recipe(bad)
    with pytest.raises(DatasetdmError, match=r"\+real-joints is for --task pose"):
        joint_recipe("finetune+real-joints", "instance")
    real = folder_task_data(_folder(tmp_path / "real", "train", 0, 3), "instance", list(CATEGORIES), "real")
    syn = folder_task_data(_folder(tmp_path / "syn", "val", 0, 2), "instance", list(CATEGORIES), "synthetic")
    steps, original = [], task_models.train_task_model
    monkeypatch.setattr(task_models, "train_task_model",
                        lambda data, n, config, **kw: steps.append((len(data), config.steps)) or original(data, n, config, **kw))
    num_classes = max(c.id for c in CATEGORIES) + 1
    train_joint_task_model(real, syn, num_classes, TaskModelConfig(**{**TINY, "steps": 8}), "finetune:0.75")
    assert steps == [(2, 2), (3, 6)]  # synthetic first, the real set three quarters of the steps


def test_keypoint_loss_skips_the_joints_of_images_not_labelled_for_them():
    from datasetdm.evaluation.task_models import task_loss

    data = task_data(_scenes("train", 0, 8), "pose", list(CATEGORIES))
    with_joints = np.flatnonzero((data.keypoints[..., 2] > 0).any(axis=(1, 2)))
    assert len(with_joints) >= 2
    batch = {"inst": torch.from_numpy(data.inst), "classes": torch.from_numpy(data.classes),
             "keypoints": torch.from_numpy(data.keypoints)}
    h, w = data.images.shape[1:3]
    torch.manual_seed(0)
    out = {"semantic": torch.randn(8, 2, h, w), "center": torch.randn(8, 1, h, w) * 0.1,
           "offset": torch.randn(8, 2, h, w), "keypoints": torch.rand(8, 17, h, w, requires_grad=True)}
    config = TaskModelConfig(**TINY)
    plain = task_loss("pose", out, batch, config)
    every = task_loss("pose", out, {**batch, "keypoints_labelled": torch.ones(8, dtype=torch.bool)}, config)
    assert every.item() == pytest.approx(plain.item(), rel=1e-5)  # all labelled: the plain MSE
    labelled = torch.zeros(8, dtype=torch.bool)
    labelled[with_joints[0]] = True
    loss = task_loss("pose", out, {**batch, "keypoints_labelled": labelled}, config)
    loss.backward()
    grad = out["keypoints"].grad.abs().sum((1, 2, 3))
    assert grad[with_joints[0]] > 0 and float(grad.sum() - grad[with_joints[0]]) == 0.0  # one image's joints only
    target = keypoint_targets(batch["keypoints"], (h, w), config.keypoint_sigma)
    alone = torch.nn.functional.mse_loss(out["keypoints"][with_joints[0]].detach(), target[with_joints[0]])
    rest = task_loss("pose", out, {**batch, "keypoints_labelled": torch.zeros(8, dtype=torch.bool)}, config)
    assert (loss - rest).item() == pytest.approx(config.keypoint_weight * alone.item(), rel=1e-4)


def test_real_joints_recipe_trains_no_keypoint_on_the_synthetic_set(tmp_path, monkeypatch):
    from datasetdm.evaluation import task_models
    from datasetdm.evaluation.downstream import folder_task_data, train_joint_task_model

    real = folder_task_data(_folder(tmp_path / "real", "train", 0, 4), "pose", list(CATEGORIES), "real")
    syn = folder_task_data(_folder(tmp_path / "syn", "val", 0, 4), "pose", list(CATEGORIES), "synthetic")
    models, original = [], task_models.train_task_model

    def spy(data, n, config, **kw):
        models.append((data.keypoints_labelled, original(data, n, config, **kw)))
        return models[-1][1]

    monkeypatch.setattr(task_models, "train_task_model", spy)
    num_classes = max(c.id for c in CATEGORIES) + 1
    train_joint_task_model(real, syn, num_classes, TaskModelConfig(**{**TINY, "steps": 6}), "finetune+real-joints")
    (pre_flags, pre), (real_flags, _) = models
    assert pre_flags is not None and not pre_flags.any() and real_flags is None
    head = pre.heads["keypoints"]  # zero at the start and never trained on the synthetic phase
    assert float(head.weight.detach().abs().sum() + head.bias.detach().abs().sum()) == 0.0
    assert float(pre.heads["center"].weight.detach().abs().sum()) > 0  # while the people's centres were learnt
    models.clear()
    train_joint_task_model(real, syn, num_classes, TaskModelConfig(**{**TINY, "steps": 6}), "mixed+real-joints")
    (flags, _), = models
    assert flags.tolist() == [True] * len(real) + [False] * len(syn)


def test_min_joint_score_keeps_the_joints_of_sure_people_only(tmp_path):
    from datasetdm.evaluation.downstream import folder_task_data

    scenes = _scenes_with_people("train", 3) + [s for s in _scenes("val", 0, 12)
                                                if all(i.keypoints is None for i in s.instances)][:1]
    scores = [0.9, 0.6, None]  # a person the decoder was sure of, one it was not, one with no score
    with LabelledFolderWriter(tmp_path / "syn", list(CATEGORIES)) as w:
        for scene, score in zip(scenes, scores + [None]):
            scene.instances = [Instance(i.category_id, i.mask, score=score if i.keypoints is not None else 0.1,
                                        keypoints=i.keypoints) for i in scene.instances]
            w.add(scene)
    every = folder_task_data(tmp_path / "syn", "pose", list(CATEGORIES), "synthetic")
    assert every.keypoints_labelled is None
    sure = folder_task_data(tmp_path / "syn", "pose", list(CATEGORIES), "synthetic", min_joint_score=0.7)
    # an image with an unsure person teaches no joints; no person at all: its empty heatmaps still count
    assert sure.keypoints_labelled.tolist() == [True, False, True, True]
    assert np.array_equal(sure.keypoints, every.keypoints) and np.array_equal(sure.inst, every.inst)
    inst = folder_task_data(tmp_path / "syn", "instance", list(CATEGORIES), "synthetic", min_joint_score=0.7)
    assert inst.keypoints_labelled is None  # pose only


def test_joint_default_mixes_where_only_the_synthetic_set_has_it():
    from datasetdm.evaluation.downstream import default_joint

    assert default_joint() == "finetune"  # domain shift and long-tail too: their real sets show every class
    assert default_joint(zero_shot=["car"]) == "mixed"


def test_task_data_names_what_is_missing(tmp_path):
    real = _folder(tmp_path / "real", "train", 0, 6)  # people among them
    test = world_test_samples(seed=5, n=2)
    cfg = TaskModelConfig(**TINY)
    no_depth = _folder(tmp_path / "no-depth", "val", 0, 2, strip="depth")
    with pytest.raises(DatasetdmError, match="no-depth.*no depth maps"):
        run_task_downstream("depth", real, no_depth, test, list(CATEGORIES), cfg)
    no_kp = _folder(tmp_path / "no-kp", "val", 0, 6, strip="keypoints")
    with pytest.raises(DatasetdmError, match="no-kp.*real data: has no person keypoints"):
        run_task_downstream("pose", no_kp, real, test, list(CATEGORIES), cfg)
    # generated data without a person is trained on as it is (its model scores what it learnt)
    result = run_task_downstream("pose", real, no_kp, test, list(CATEGORIES), cfg)
    assert result["n_synthetic"] == 6
    with pytest.raises(DatasetdmError, match="--task 'panoptic'"):
        run_task_downstream("panoptic", real, real, test, list(CATEGORIES), cfg)


def test_build_and_run_checks_its_options_first(tmp_path):
    from datasetdm.evaluation.downstream import build_and_run

    with pytest.raises(DatasetdmError, match="--task 'edges'"):
        build_and_run(tmp_path / "a", test_seed=1, task="edges")
    with pytest.raises(DatasetdmError, match="--task depth needs --labeler decoder"):
        build_and_run(tmp_path / "b", test_seed=1, task="depth", labeler="attention")
    with pytest.raises(DatasetdmError, match="--long-tail.*semantic"):
        build_and_run(tmp_path / "c", test_seed=1, task="pose", long_tail=["star"])
    with pytest.raises(DatasetdmError, match="--semantic-head 'queries'"):
        build_and_run(tmp_path / "d", test_seed=1, semantic_head="queries")
    with pytest.raises(DatasetdmError, match="--semantic-head: .*drop --task"):
        build_and_run(tmp_path / "e", test_seed=1, task="depth", semantic_head="pixels")
    assert not any(tmp_path.iterdir())  # refused before anything was built


@pytest.mark.slow
def test_build_and_run_with_the_per_pixel_semantic_head(tmp_path):
    """`downstream --semantic-head pixels`: its own decoder and synthetic set beside the default's,
    on the same real set; the result file and headline say which head labelled the data."""
    from datasetdm.evaluation.downstream import DownstreamConfig, build_and_run

    real = _folder(tmp_path / "real", "train", 0, 12)
    result = build_and_run(tmp_path / "ds", test_seed=1, n_test=6, real=real, n_synthetic=4, decoder_iterations=5,
                           config=DownstreamConfig(steps=3, batch_size=4), semantic_head="pixels")
    assert result["semantic_head"] == "pixels" and result["n_synthetic"] <= 4
    assert result["result_file"].endswith("downstream-semantic-pixels-n4.json")
    config = json.loads((tmp_path / "ds" / "decoders-pixels" / "semantic" / "config.json").read_text())
    assert config["decoder"]["semantic_head"] == "pixels"
    # another decoder seed: its own decoder and synthetic set, the same real set and real-only model
    again = build_and_run(tmp_path / "ds", test_seed=1, n_test=6, real=real, n_synthetic=4, decoder_iterations=5,
                          config=DownstreamConfig(steps=3, batch_size=4), semantic_head="pixels", decoder_seed=1)
    assert again["result_file"].endswith("downstream-semantic-pixels-dseed1-n4.json")
    assert again["real_miou"] == result["real_miou"] and again["decoder_seed"] == 1
    seeded = json.loads((tmp_path / "ds" / "decoders-pixels-dseed1" / "semantic" / "config.json").read_text())
    assert seeded["info"]["train_options"]["seed"] == 1 and config["info"]["train_options"]["seed"] == 0
    assert (tmp_path / "ds" / "synthetic-decoder-pixels-dseed1-n4").is_dir()


@pytest.mark.slow
def test_build_and_run_every_task_small(tmp_path):
    """`downstream --task instance|depth|pose` end to end on the shipped backbone, tiny sizes:
    the task's decoder trained on the real set, samples generated and labelled by it, exported,
    the three models trained and scored; the last line's keys."""
    from datasetdm.evaluation.downstream import DownstreamConfig, build_and_run

    real = _folder(tmp_path / "real", "train", 0, 12)
    for task, metric in (("depth", "abs_rel"), ("instance", "mask_ap"), ("pose", "keypoint_ap")):
        result = build_and_run(tmp_path / "ds", test_seed=1, n_test=6, real=real, n_synthetic=4,
                               decoder_iterations=5, config=DownstreamConfig(steps=3, batch_size=4), task=task)
        assert result["task"] == task and result["n_real"] == 12 and result["n_synthetic"] <= 4
        assert {f"{k}_{metric}" for k in ("real", "synthetic", "joint")} <= set(result)
        saved = json.loads((tmp_path / "ds" / f"downstream-{task}-n4.json").read_text())
        if result[f"real_{metric}"] is not None:
            assert saved[f"real_{metric}"] == pytest.approx(result[f"real_{metric}"], abs=1e-4)
        assert (tmp_path / "ds" / "decoders" / task / "config.json").exists()
    # pose's samples are prompted for people: every prompt names a person (the quota plan over world captions)
    run = json.loads((tmp_path / "ds" / "shards-decoder-pose-n4" / "run.json").read_text())
    assert run["config"]["class_quota"]["prompted"] == {"person": 4}
    coco = json.loads((tmp_path / "ds" / "synthetic-decoder-pose-n4" / "annotations.json").read_text())
    assert coco["images"] and all("person" in image["meta"]["classes"] for image in coco["images"])


@pytest.mark.slow
def test_build_and_run_zero_shot_small(tmp_path):
    """`downstream --zero-shot car` end to end, tiny sizes: the open-vocab decoder is trained with car
    held out (the shared `train_decoders`, so a rerun reuses it and another held-out set is refused),
    and the result reports seen / unseen mIoU."""
    from datasetdm.errors import DatasetdmError
    from datasetdm.evaluation.downstream import DownstreamConfig, build_and_run
    from datasetdm.training import train_decoders

    kwargs = dict(test_seed=1, n_test=6, n_synthetic=4, decoder_iterations=5,
                  config=DownstreamConfig(steps=3, batch_size=4))
    result = build_and_run(tmp_path / "ds", zero_shot=["car"], **kwargs)
    assert result["unseen_classes"] == ["car"] and {"real_unseen_miou", "joint_seen_miou"} <= set(result)
    # a joint model fine-tuned on the real set alone would unlearn the unseen classes
    assert result["joint"] == "mixed" and "joint-" not in result["result_file"]
    decoders = tmp_path / "ds" / "decoders-zs-car"
    trained = json.loads((decoders / "open-vocab" / "config.json").read_text())["info"]["train_options"]
    assert trained["held_out"] == ["car"] and trained["iterations"] == 5
    with pytest.raises(DatasetdmError, match="trained with \\['car'\\] held out, not \\['ball'\\]"):
        train_decoders(tmp_path / "ds" / "real-zs-car", decoders, ["open-vocab"], None, 5, held_out=["ball"])
