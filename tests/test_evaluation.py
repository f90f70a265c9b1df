"""Metrics on world scenes: perfect labels score perfectly, damaged ones measurably less."""

import copy

import numpy as np
import pytest

from datasetdm.evaluation.evaluate import KEYS, Scores, headline, resize_prediction
from datasetdm.evaluation.metrics import DepthErrors, SemanticIoU, instance_errors, keypoint_ap, mask_ap
from datasetdm.formats.sample import Instance
from datasetdm.formats.sample import IGNORE_INDEX
from datasetdm.training import augment
from datasetdm.world.render import CATEGORIES, render_scene

CATS = [{"id": c.id, "name": c.name, **({"keypoints": list(c.keypoints)} if c.keypoints else {})} for c in CATEGORIES]
PEOPLE = [c for c in CATS if c.get("keypoints")]


@pytest.fixture(scope="module")
def scenes():
    return [render_scene("test", 0, i) for i in range(12)]


def test_miou_perfect_ignores_255_and_drops_with_errors(scenes):
    iou = SemanticIoU([c["id"] for c in CATS])
    for s in scenes:
        gt = s.semantic.copy()
        pred = gt.copy()
        gt[:4] = IGNORE_INDEX  # ignored rows: whatever is predicted there does not count
        pred[:4] = 0
        iou.update(pred, gt)
    assert iou.compute()["miou"] == pytest.approx(1.0)

    damaged = SemanticIoU([c["id"] for c in CATS])
    for s in scenes:
        pred = s.semantic.copy()
        pred[:, :16] = 0  # a quarter of each image called background
        damaged.update(pred, s.semantic)
    r = damaged.compute()
    assert 0.3 < r["miou"] < 0.95 and r["iou"][0] < 1
    with pytest.raises(ValueError, match="unknown class values \\[77\\]"):
        damaged.update(np.full((64, 64), 77, np.uint8), scenes[0].semantic)


def _instances_with_scores(scenes, shift=0):
    preds = []
    for s in scenes:
        insts = []
        for inst in copy.deepcopy(s.instances):
            inst.mask = np.roll(inst.mask, shift, axis=1)
            inst.score = 0.9
            insts.append(inst)
        preds.append(insts)
    return preds


def test_mask_ap_perfect_shifted_and_missing(scenes):
    gts, sizes = [s.instances for s in scenes], [s.size for s in scenes]
    perfect = mask_ap(gts, _instances_with_scores(scenes), sizes, CATS)
    assert perfect == {"mask_ap": pytest.approx(1.0), "mask_ap50": pytest.approx(1.0)}
    shifted = mask_ap(gts, _instances_with_scores(scenes, shift=2), sizes, CATS)
    assert shifted["mask_ap"] < 0.8 and shifted["mask_ap"] < shifted["mask_ap50"]
    assert mask_ap(gts, [[] for _ in scenes], sizes, CATS) == {"mask_ap": 0.0, "mask_ap50": 0.0}


def _box(y0, y1, x0, x1, size=64):
    m = np.zeros((size, size), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_instance_errors_name_each_kind_of_label_error(scenes):
    """One object per kind of outcome, each made on purpose; then world scenes labelled perfectly."""
    a, b, c, d, e, f = (_box(0, 16, 0, 16), _box(0, 16, 24, 40), _box(30, 46, 0, 16), _box(30, 46, 24, 40),
                        _box(48, 64, 0, 16), _box(48, 64, 48, 64))
    g = _box(20, 28, 50, 58)
    truth = [Instance(1, a), Instance(1, b), Instance(2, c), Instance(2, d), Instance(3, e), Instance(3, f),
             Instance(4, g)]
    pred = [
        Instance(1, a, score=0.9),                 # a found
        Instance(1, a, score=0.8),                 # a again: a duplicate
        Instance(5, _box(0, 16, 20, 40), score=0.9),  # b: IoU 0.8, another class
        Instance(2, c | d | _box(30, 46, 16, 24), score=0.9),  # c and d under one mask: both merged
        Instance(3, _box(48, 53, 0, 16), score=0.9),  # e in three parts (IoU 0.31, 0.31, 0.38): split
        Instance(3, _box(53, 58, 0, 16), score=0.9),
        Instance(3, _box(58, 64, 0, 16), score=0.9),
        Instance(3, _box(48, 64, 58, 64), score=0.9),  # 6/16 of f (IoU 0.375): poorly outlined
        Instance(1, _box(20, 28, 40, 44), score=0.9),  # nothing there: spurious
        Instance(4, g, score=0.2),                 # g found only below the score threshold
    ]
    r = instance_errors([truth], [pred], min_score=0.5)
    n = len(truth)
    assert r["objects"] == {"found": 1 / n, "wrong_class": 1 / n, "merged": 2 / n, "split": 1 / n,
                            "poorly_outlined": 1 / n, "missed": 1 / n}
    assert r["predictions"] == {"spurious": pytest.approx(1 / 9), "duplicate": pytest.approx(1 / 9)}
    assert r["objects_per_image"] == n and r["predictions_per_image"] == 9
    assert instance_errors([truth], [pred])["objects"]["found"] == 2 / n  # g counts without the threshold

    gts = [s.instances for s in scenes]
    perfect = instance_errors(gts, _instances_with_scores(scenes))
    assert perfect["objects"]["found"] == 1.0 and perfect["predictions"] == {"spurious": 0.0, "duplicate": 0.0}
    nothing = instance_errors(gts, [[] for _ in scenes])
    assert nothing["objects"]["missed"] == 1.0 and nothing["predictions_per_image"] == 0


def test_keypoint_ap_perfect_and_perturbed(scenes):
    gts, sizes = [s.instances for s in scenes], [s.size for s in scenes]
    assert sum(i.keypoints is not None for g in gts for i in g) >= 3  # enough people to mean something
    perfect = keypoint_ap(gts, _instances_with_scores(scenes), sizes, CATS)
    assert perfect["keypoint_ap"] == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    noisy = _instances_with_scores(scenes)
    for insts in noisy:
        for inst in insts:
            if inst.keypoints is not None:
                inst.keypoints[:, :2] += rng.normal(0, 2.0, (17, 2)).astype(np.float32)
    assert keypoint_ap(gts, noisy, sizes, CATS)["keypoint_ap"] < 0.9


def test_depth_errors(scenes):
    for factor, abs_rel, delta1 in ((1.0, 0.0, 1.0), (1.1, 0.1, 1.0), (1.3, 0.3, 0.0)):
        d = DepthErrors()
        for s in scenes:
            d.update(s.depth * factor, s.depth)
        r = d.compute()
        assert r["abs_rel"] == pytest.approx(abs_rel, abs=1e-5) and r["delta1"] == pytest.approx(delta1)
        assert r["rmse"] >= 0


def test_scores_and_resize_follow_the_training_convention(scenes):
    """A prediction made at the decoder's size, brought back to the image's size, lands where the
    labels are: keypoints as ``augment`` maps them (pixel centres), masks and maps by nearest."""
    s = next(x for x in scenes if any(i.keypoints is not None for i in x.instances))
    big = augment(s, None, (128, 128))  # what the decoder would see at 128 px
    pred = {"semantic": big.semantic, "depth": big.depth, "instances": _instances_with_scores([big])[0]}
    back = resize_prediction(pred, (128, 128), s.size)
    assert np.array_equal(back["semantic"], s.semantic) and np.allclose(back["depth"], s.depth)
    for a, b in zip(back["instances"], s.instances):
        assert np.array_equal(a.mask, b.mask)
        if b.keypoints is not None:
            vis = b.keypoints[:, 2] > 0
            assert np.allclose(a.keypoints[vis, :2], b.keypoints[vis, :2], atol=1e-4)
    for task, keys in (("semantic", {"miou"}), ("depth", {"abs_rel", "rmse", "delta1"}),
                       ("pose", {"keypoint_ap", "mask_ap", "mask_ap50"}), ("instance", {"mask_ap", "mask_ap50"})):
        sc = Scores(task, CATS)
        sc.add(s, back)
        m = sc.compute()
        assert set(headline(m)) == keys and set(headline(m)) <= set(KEYS) and m["n_images"] == 1
        assert all(v == pytest.approx(0.0 if k in ("abs_rel", "rmse") else 1.0) for k, v in headline(m).items()), m
        if task == "instance":  # the labeler's view: every object found, nothing spurious
            assert m["label_errors"]["objects"]["found"] == 1.0 and m["label_errors"]["min_score"] == 0.5
            assert "label_errors_at" not in m
            sc = Scores(task, CATS, label_scores=(0.3, 0.95))  # the predictions score 0.9
            sc.add(s, back)
            at = sc.compute()["label_errors_at"]
            assert at["0.3"]["objects"]["found"] == 1.0 and at["0.95"]["objects"]["missed"] == 1.0
