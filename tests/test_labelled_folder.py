"""The labelled folder: exact round trips, pycocotools/Pillow compatibility, and rejection of bad folders."""

import json
import os

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image
from pycocotools.coco import COCO

from datasetdm.errors import DatasetdmError
from datasetdm.formats import (
    COCO_KEYPOINT_NAMES,
    COCO_SKELETON,
    IGNORE_INDEX,
    Category,
    Instance,
    LabelledFolderWriter,
    LabelledSample,
    read_labelled_folder,
)

H, W = 24, 32  # not square, so a transposed mask or size would be caught

CATEGORIES = [
    Category(1, "cube"),
    Category(2, "ball"),
    Category(9, "cone"),
    Category(5, "person", keypoints=COCO_KEYPOINT_NAMES, skeleton=COCO_SKELETON),
]


def _box(y0, y1, x0, x1):
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


def _person_keypoints():
    rng = np.random.default_rng(0)
    kp = np.zeros((17, 3), np.float32)
    kp[:, 0] = rng.uniform(10, 20, 17).round(2)
    kp[:, 1] = rng.uniform(4, 20, 17).round(2)
    kp[:, 2] = 2
    kp[[1, 3, 8], 2] = 1  # labelled but occluded
    kp[[4, 16], :] = 0  # unlabelled: COCO stores 0, 0, 0
    return kp


def make_samples():
    samples = []
    for k in range(3):
        rng = np.random.default_rng(k)
        image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        # Overlapping instances: the later one occludes the earlier, so masks overlap in the
        # object's extent but the semantic map shows the front one.
        cube = _box(2, 14, 2, 16)
        ball = _box(8, 20, 10, 26) & ~_box(20, 24, 0, 32)
        cone = _box(0, 6, 24, 32)
        person = _box(4, 22, 9, 21)
        instances = [
            Instance(1, cube),
            Instance(2, ball, score=0.75),
            Instance(9, cone),
            Instance(5, person, keypoints=_person_keypoints()),
        ]
        semantic = np.zeros((H, W), np.uint8)
        for inst in instances:
            semantic[inst.mask] = inst.category_id
        semantic[0, :] = IGNORE_INDEX  # an uncertain row
        depth = np.linspace(0.5, 12.3456, H * W, dtype=np.float32).reshape(H, W)
        depth[:5, :5] = 0  # no depth (sky)
        samples.append(
            LabelledSample(
                id=f"s{k}",
                image=image,
                caption=f"a cube, a ball, a cone and a person, scene {k}",
                semantic=semantic,
                instances=instances,
                depth=depth,
                meta={"seed": k},
            )
        )
    return samples


@pytest.fixture
def written(tmp_path):
    samples = make_samples()
    out = tmp_path / "folder"
    with LabelledFolderWriter(out, CATEGORIES) as writer:
        for s in samples:
            writer.add(s)
    return out, samples


def test_round_trip_exact(written):
    out, samples = written
    folder = read_labelled_folder(out)
    assert folder.ids == ["s0", "s1", "s2"] and len(folder) == 3
    assert folder.tasks == ("semantic", "instances", "keypoints", "depth", "captions")
    assert folder.categories == CATEGORIES
    for orig in samples:
        got = folder[folder.ids.index(orig.id)]
        assert got.id == orig.id and got.caption == orig.caption and got.meta == orig.meta
        np.testing.assert_array_equal(got.image, orig.image)
        np.testing.assert_array_equal(got.semantic, orig.semantic)
        assert np.abs(got.depth - orig.depth).max() <= 0.001
        assert (got.depth == 0).sum() == 25
        assert len(got.instances) == len(orig.instances)
        for a, b in zip(got.instances, orig.instances):
            assert a.category_id == b.category_id and a.score == b.score
            np.testing.assert_array_equal(a.mask, b.mask)
            if b.keypoints is None:
                assert a.keypoints is None
            else:
                np.testing.assert_array_equal(a.keypoints, b.keypoints)
    folder.validate()


def test_annotations_load_in_pycocotools(written):
    out, samples = written
    api = COCO(str(out / "annotations.json"))
    assert sorted(api.getCatIds()) == [1, 2, 5, 9]
    person = api.loadCats(5)[0]
    assert person["keypoints"] == list(COCO_KEYPOINT_NAMES) and len(person["skeleton"]) == 19
    img_id = next(i for i, img in api.imgs.items() if img["sample_id"] == "s1")
    assert api.imgs[img_id]["caption"] == samples[1].caption
    anns = api.loadAnns(api.getAnnIds(imgIds=img_id))
    assert len(anns) == 4
    for ann, inst in zip(anns, samples[1].instances):
        np.testing.assert_array_equal(mask_utils.decode(ann["segmentation"]).astype(bool), inst.mask)
        np.testing.assert_array_equal(api.annToMask(ann).astype(bool), inst.mask)
        assert ann["area"] == inst.mask.sum() and ann["iscrowd"] == 0
        assert isinstance(ann["segmentation"]["counts"], str)
    person_ann = anns[3]
    kp = np.array(person_ann["keypoints"]).reshape(17, 3)
    assert person_ann["num_keypoints"] == 15
    assert sorted(set(kp[:, 2].tolist())) == [0, 1, 2]
    assert anns[0]["bbox"] == [2.0, 2.0, 14.0, 12.0]


def test_semantic_png_is_palettized_with_ids_intact(written):
    out, samples = written
    with Image.open(out / "semantic" / "s0.png") as im:
        assert im.mode == "P"
        values = np.array(im)
    np.testing.assert_array_equal(values, samples[0].semantic)
    assert {9, 255} <= set(np.unique(values).tolist())


def test_depth_png_is_uint16_millimetres(written):
    out, samples = written
    with Image.open(out / "depth" / "s2.png") as im:
        assert im.mode in ("I;16", "I")
        mm = np.array(im)
    np.testing.assert_array_equal(mm, np.rint(samples[2].depth.astype(np.float64) * 1000))
    assert mm[0, 0] == 0 and mm[-1, -1] == 12346
    info = json.loads((out / "annotations.json").read_text())["info"]
    assert info["depth_scale"] == 0.001 and "depth" in info["tasks"]


def test_depth_clips_far_and_keeps_tiny_positive(tmp_path):
    depth = np.array([[0.0, 0.0002, 70.0, 1.0]], np.float32)
    sample = LabelledSample("d", np.zeros((1, 4, 3), np.uint8), depth=depth)
    with LabelledFolderWriter(tmp_path / "f", []) as w:
        w.add(sample)
    got = read_labelled_folder(tmp_path / "f")[0].depth
    np.testing.assert_allclose(got, [[0.0, 0.001, 65.535, 1.0]], atol=1e-6)


def test_writer_only_writes_present_kinds(tmp_path):
    s = make_samples()[0]
    s.semantic = s.depth = None
    s.caption = None
    with LabelledFolderWriter(tmp_path / "f", CATEGORIES) as w:
        w.add(s)
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == ["annotations.json", "images"]
    folder = read_labelled_folder(tmp_path / "f")
    assert folder.tasks == ("instances", "keypoints")
    got = folder[0]
    assert got.semantic is None and got.depth is None and got.caption is None
    np.testing.assert_array_equal(got.instances[1].mask, s.instances[1].mask)


def _save(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_user_voc_folder_semantic_only(tmp_path):
    """A hand-made VOC-style folder: images, 'L' semantic PNGs and categories.json, no COCO file."""
    sem = np.zeros((H, W), np.uint8)
    sem[3:9, 4:12] = 7
    sem[10, :] = 255
    for name in ("b", "a"):
        _save(tmp_path / "images" / f"{name}.jpg", np.full((H, W, 3), 100, np.uint8))
        _save(tmp_path / "semantic" / f"{name}.png", sem)
    (tmp_path / "categories.json").write_text(json.dumps([{"id": 7, "name": "boat"}]))
    folder = read_labelled_folder(tmp_path)
    assert folder.ids == ["a", "b"] and folder.tasks == ("semantic",)
    assert folder.categories == [Category(7, "boat")]
    got = folder[1]
    np.testing.assert_array_equal(got.semantic, sem)
    assert got.instances is None and got.depth is None and got.image.shape == (H, W, 3)


def test_user_nyu_folder_depth_only(tmp_path):
    mm = np.arange(H * W, dtype=np.uint16).reshape(H, W) * 50
    _save(tmp_path / "images" / "x.png", np.zeros((H, W, 3), np.uint8))
    _save(tmp_path / "depth" / "x.png", mm)
    folder = read_labelled_folder(tmp_path)
    assert folder.tasks == ("depth",) and folder.categories == []
    np.testing.assert_allclose(folder[0].depth, mm * 0.001, atol=1e-6)


# ---- bad folders: each is a DatasetdmError naming the offending file ----------------------------


def _corrupt_truncated(out):
    p = out / "images" / "s1.png"
    p.write_bytes(p.read_bytes()[:200])
    return os.path.join("images", "s1.png")


def _corrupt_garbage(out):
    (out / "images" / "s1.png").write_bytes(b"definitely not a png" * 10)
    return os.path.join("images", "s1.png")


def _semantic_size_mismatch(out):
    _save(out / "semantic" / "s2.png", np.zeros((H, W + 1), np.uint8))
    return os.path.join("semantic", "s2.png")


def _depth_size_mismatch(out):
    _save(out / "depth" / "s0.png", np.zeros((H - 1, W), np.uint16))
    return os.path.join("depth", "s0.png")


def _image_size_mismatch(out):
    _save(out / "images" / "s0.png", np.zeros((H, W + 2, 3), np.uint8))
    return os.path.join("images", "s0.png")


def _unknown_id_in_semantic(out):
    sem = np.zeros((H, W), np.uint8)
    sem[5, 5] = 42
    _save(out / "semantic" / "s1.png", sem)
    return os.path.join("semantic", "s1.png")


def _unknown_id_in_annotations(out):
    coco = json.loads((out / "annotations.json").read_text())
    coco["annotations"][2]["category_id"] = 42
    (out / "annotations.json").write_text(json.dumps(coco))
    return "annotations.json"


def _missing_semantic(out):
    (out / "semantic" / "s1.png").unlink()
    return os.path.join("semantic", "s1.png")


def _missing_depth(out):
    (out / "depth" / "s2.png").unlink()
    return os.path.join("depth", "s2.png")


def _missing_image(out):
    (out / "images" / "s1.png").unlink()
    return os.path.join("images", "s1.png")


def _unlisted_image(out):
    _save(out / "images" / "extra.png", np.zeros((H, W, 3), np.uint8))
    return os.path.join("images", "extra.png")


def _rgb_semantic(out):
    _save(out / "semantic" / "s0.png", np.zeros((H, W, 3), np.uint8))
    return os.path.join("semantic", "s0.png")


def _bad_json(out):
    (out / "annotations.json").write_text("{not json")
    return "annotations.json"


def _rle_size_mismatch(out):
    coco = json.loads((out / "annotations.json").read_text())
    coco["annotations"][0]["segmentation"]["size"] = [W, H]
    (out / "annotations.json").write_text(json.dumps(coco))
    return "annotations.json"


BAD_FOLDERS = [
    _corrupt_truncated,
    _corrupt_garbage,
    _semantic_size_mismatch,
    _depth_size_mismatch,
    _image_size_mismatch,
    _unknown_id_in_semantic,
    _unknown_id_in_annotations,
    _missing_semantic,
    _missing_depth,
    _missing_image,
    _unlisted_image,
    _rgb_semantic,
    _bad_json,
    _rle_size_mismatch,
]


@pytest.mark.parametrize("break_folder", BAD_FOLDERS, ids=lambda f: f.__name__.strip("_"))
def test_bad_folder_is_rejected_naming_the_file(written, break_folder):
    out, _ = written
    read_labelled_folder(out).validate()  # intact before we break it
    offending = break_folder(out)
    with pytest.raises(DatasetdmError) as err:
        # cheap checks run on open; pixel-level ones (truncation, mask values) on load
        read_labelled_folder(out).validate()
    assert offending in str(err.value)


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(DatasetdmError, match="no images"):
        read_labelled_folder(tmp_path)
    with pytest.raises(DatasetdmError, match="not a folder"):
        read_labelled_folder(tmp_path / "nope")


def test_semantic_without_class_names_is_rejected(tmp_path):
    _save(tmp_path / "images" / "a.png", np.zeros((H, W, 3), np.uint8))
    _save(tmp_path / "semantic" / "a.png", np.zeros((H, W), np.uint8))
    with pytest.raises(DatasetdmError, match="categories.json"):
        read_labelled_folder(tmp_path)


def test_truncated_image_passes_cheap_check_but_fails_on_load(written):
    out, _ = written
    _corrupt_truncated(out)
    folder = read_labelled_folder(out)  # headers are intact
    folder[0]
    with pytest.raises(DatasetdmError, match="s1.png"):
        folder[1]


def test_writer_rejects_inconsistent_samples(tmp_path):
    a, b = make_samples()[:2]
    b.depth = None
    with pytest.raises(DatasetdmError, match="'s1'"):
        with LabelledFolderWriter(tmp_path / "f", CATEGORIES) as w:
            w.add(a)
            w.add(b)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # a failed run leaves nothing, not even images

    with LabelledFolderWriter(tmp_path / "f", CATEGORIES) as w:
        w.add(a)
    with pytest.raises(DatasetdmError, match="already exists; pass --overwrite"):
        LabelledFolderWriter(tmp_path / "f", CATEGORIES)
    w = LabelledFolderWriter(tmp_path / "f", [Category(5, "person")], overwrite=True)
    assert (tmp_path / "f" / "images").exists()  # the old folder stays whole until the new one is complete
    person_only = make_samples()[0]
    person_only.semantic = None
    person_only.instances = person_only.instances[3:]
    with pytest.raises(DatasetdmError, match="no keypoint names"):
        w.add(person_only)
    w.abort()
    assert read_labelled_folder(tmp_path / "f").ids == [a.id]
    with pytest.raises(DatasetdmError, match="unknown category ids"):
        LabelledFolderWriter(tmp_path / "g", CATEGORIES[:2]).add(make_samples()[0])


def test_user_coco_folder_with_polygons(tmp_path):
    """Plain COCO from elsewhere: polygons, no sample_id, no info; ids come from file names."""
    _save(tmp_path / "images" / "a.png", np.zeros((H, W, 3), np.uint8))
    coco = {
        "images": [{"id": 7, "file_name": "a.png", "height": H, "width": W}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 3, "segmentation": [[4, 2, 12, 2, 12, 8, 4, 8]],
             "area": 48, "bbox": [4, 2, 8, 6], "iscrowd": 0},
        ],
        "categories": [{"id": 3, "name": "kite", "supercategory": "thing"}],
    }
    (tmp_path / "annotations.json").write_text(json.dumps(coco))
    folder = read_labelled_folder(tmp_path)
    assert folder.tasks == ("instances",) and folder.ids == ["a"]
    (inst,) = folder[0].instances
    assert inst.category_id == 3 and inst.keypoints is None
    ys, xs = np.nonzero(inst.mask)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (2, 7, 4, 11)
