"""The standard data set layouts in (``data import``) and out (``export --format``), issue 20.

Every fixture is built here in the layout as the data set ships it (file names, palettes, id
conventions), with a few tiny images of different sizes and aspect ratios, JPEG and PNG.
"""

import json

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image

from datasetdm.errors import DatasetdmError
from datasetdm.formats.labelled_folder import read_labelled_folder
from datasetdm.formats.layouts import ImportOptions, export_dataset, import_dataset, merge_folders
from datasetdm.formats.layouts.hf import read_hf_rows
from datasetdm.formats.png import voc_palette
from datasetdm.formats.sample import COCO_KEYPOINT_NAMES, COCO_SKELETON

# ---------------------------------------------------------------------------------- helpers


def rgb(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save_image(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, quality=95) if path.suffix == ".jpg" else Image.fromarray(array).save(path)


def save_palette_png(path, labels):
    """A palette PNG as VOC ships it: the pixel is the palette index, colours are VOC's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = np.ascontiguousarray(labels, dtype=np.uint8)
    image = Image.frombytes("P", (labels.shape[1], labels.shape[0]), labels.tobytes())
    image.putpalette(voc_palette())
    image.save(path)


def save_grey_png(path, labels):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(labels)).save(path)


def load(out):
    folder = read_labelled_folder(out)
    return folder, {s.id: s for s in folder}


def leftovers(parent, name):
    """Hidden staging folders an import or export left beside its output."""
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def assert_nothing_written(out):
    assert not out.exists()
    assert leftovers(out.parent, out.name) == []


def instance_table(sample):
    return [(i.category_id, np.flatnonzero(i.mask).tolist(),
             None if i.keypoints is None else np.asarray(i.keypoints).tolist()) for i in sample.instances]


def assert_same_labels(a, b):
    """Same masks, instances and keypoints (what a round trip must keep), sample by sample."""
    assert sorted(a) == sorted(b)
    for sid in a:
        np.testing.assert_array_equal(a[sid].semantic, b[sid].semantic, err_msg=sid)
        if a[sid].instances is not None or b[sid].instances is not None:
            assert instance_table(a[sid]) == instance_table(b[sid]), sid


# ---------------------------------------------------------------------------------- VOC

# (id, height, width, [(class id, (y0, y1, x0, x1)), ...]): objects painted in order, each with a
# 1-pixel 255 border as VOC draws it
VOC_IMAGES = [
    ("2007_000032", 30, 40, [(1, (4, 20, 3, 30)), (15, (15, 28, 25, 38))]),
    ("2007_000039", 48, 24, [(20, (5, 40, 4, 20))]),
    ("2008_000002", 32, 32, [(15, (2, 14, 2, 14)), (15, (16, 30, 16, 30)), (12, (18, 30, 2, 12))]),
    ("2009_000012", 20, 36, [(12, (3, 17, 5, 30))]),
    ("2010_000001", 24, 24, [(1, (2, 22, 2, 22))]),
]


def make_voc(root, split_ids=None):
    """VOCdevkit/VOC2012 with JPEGImages, SegmentationClass, SegmentationObject, ImageSets."""
    voc = root / "VOCdevkit" / "VOC2012"
    expected = {}
    for n, (sid, h, w, objects) in enumerate(VOC_IMAGES):
        save_image(voc / "JPEGImages" / f"{sid}.jpg", rgb(h, w, n))
        classes = np.zeros((h, w), np.uint8)
        objs = np.zeros((h, w), np.uint8)
        for k, (class_id, (y0, y1, x0, x1)) in enumerate(objects, start=1):
            classes[y0 - 1:y1 + 1, x0 - 1:x1 + 1] = 255  # the border
            objs[y0 - 1:y1 + 1, x0 - 1:x1 + 1] = 255
            classes[y0:y1, x0:x1] = class_id
            objs[y0:y1, x0:x1] = k
        save_palette_png(voc / "SegmentationClass" / f"{sid}.png", classes)
        save_palette_png(voc / "SegmentationObject" / f"{sid}.png", objs)
        expected[sid] = (classes, objs, [c for c, _ in objects])
    lists = voc / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    ids = split_ids or [sid for sid, *_ in VOC_IMAGES]
    (lists / "train.txt").write_text("\n".join(ids) + "\n")
    (lists / "val.txt").write_text(VOC_IMAGES[0][0] + "\n")
    return voc, expected


def test_voc_import_keeps_class_ids_border_and_objects(tmp_path):
    voc, expected = make_voc(tmp_path)
    summary = import_dataset("voc", voc.parent, tmp_path / "out")  # the VOCdevkit folder works too
    assert summary.samples == 5
    folder, samples = load(tmp_path / "out")
    assert folder.tasks == ("semantic", "instances")
    assert [c.name for c in folder.categories][:3] == ["aeroplane", "bicycle", "bird"]
    assert len(folder.categories) == 20
    for sid, (classes, objs, object_classes) in expected.items():
        sample = samples[sid]
        assert sample.image.shape[:2] == classes.shape  # kept at its own size
        # not made binary (DatasetDM issue #38): dog stays 12, tvmonitor 20; the border stays 255
        np.testing.assert_array_equal(sample.semantic, classes)
        assert [i.category_id for i in sample.instances] == object_classes
        for k, inst in enumerate(sample.instances, start=1):
            np.testing.assert_array_equal(inst.mask, objs == k)
    assert samples["2007_000039"].semantic.max() == 255 and 20 in samples["2007_000039"].semantic
    record = json.loads((tmp_path / "out" / "import.json").read_text())
    assert record["format"] == "voc" and record["samples"] == 5


def test_voc_val_split_and_round_trip(tmp_path):
    voc, _ = make_voc(tmp_path)
    assert import_dataset("voc", voc, tmp_path / "val", ImportOptions(split="val")).samples == 1
    import_dataset("voc", voc, tmp_path / "a")
    summary = export_dataset(tmp_path / "a", tmp_path / "voc-out", "voc")
    assert summary.samples == 5
    out = tmp_path / "voc-out"
    assert (out / "ImageSets" / "Segmentation" / "train.txt").read_text().split() == sorted(s for s, *_ in VOC_IMAGES)
    assert not (out / "categories.json").exists()  # the 20 VOC classes need no names file
    mask = Image.open(out / "SegmentationClass" / "2007_000039.png")
    assert mask.mode == "P" and mask.getpalette()[:6] == voc_palette()[:6]
    assert Image.open(out / "JPEGImages" / "2007_000039.jpg").format == "JPEG"
    import_dataset("voc", out, tmp_path / "b")
    assert_same_labels(load(tmp_path / "a")[1], load(tmp_path / "b")[1])


def test_per_class_selection_is_seeded_and_covers_every_class(tmp_path):
    voc, expected = make_voc(tmp_path)
    present = {c for _, _, classes in expected.values() for c in classes}  # {1, 12, 15, 20}
    picks = []
    for seed in range(6):
        out = tmp_path / f"k1-{seed}"
        summary = import_dataset("voc", voc, out, ImportOptions(per_class=1, seed=seed))
        folder, samples = load(out)
        shown = set().union(*(set(np.unique(s.semantic).tolist()) for s in samples.values()))
        assert present <= shown
        # one distinct image per class, fewer where one class's image also shows another
        assert 3 <= summary.samples <= len(present)
        absent = {c.name for c in folder.categories if c.id not in present}
        assert set(summary.shortfall) == absent and not any(summary.shortfall.values())
        picks.append(tuple(folder.ids))
    again = import_dataset("voc", voc, tmp_path / "again", ImportOptions(per_class=1, seed=3))
    assert tuple(read_labelled_folder(again.out).ids) == picks[3]  # same seed, same images
    assert len(set(picks)) > 1  # the seed matters
    # more than a class has: all its images, and the shortfall says so
    summary = import_dataset("voc", voc, tmp_path / "k5", ImportOptions(per_class=5))
    assert summary.samples == 5 and summary.shortfall["tvmonitor"] == 1 and summary.shortfall["dog"] == 2


def test_n_images_and_classes_filter(tmp_path):
    voc, _ = make_voc(tmp_path)
    a = import_dataset("voc", voc, tmp_path / "a", ImportOptions(n_images=3, seed=1))
    b = import_dataset("voc", voc, tmp_path / "b", ImportOptions(n_images=3, seed=1))
    assert a.samples == 3 and read_labelled_folder(a.out).ids == read_labelled_folder(b.out).ids
    import_dataset("voc", voc, tmp_path / "dogs", ImportOptions(classes=("dog",)))
    folder, samples = load(tmp_path / "dogs")
    assert [c.name for c in folder.categories] == ["dog"]
    assert sorted(samples) == ["2008_000002", "2009_000012"]
    for sample in samples.values():  # other classes become background, their instances go
        assert set(np.unique(sample.semantic).tolist()) <= {0, 12, 255}
        assert {i.category_id for i in sample.instances} == {12}
    with pytest.raises(DatasetdmError, match="--classes.*'unicorn'"):
        import_dataset("voc", voc, tmp_path / "x", ImportOptions(classes=("unicorn",)))


@pytest.mark.parametrize("damage, message", [
    ("list", r"ImageSets/Segmentation/train.txt: missing"),
    ("image", r"SegmentationClass/2008_000002.png: mask without an image"),
    ("label", r"SegmentationClass/2010_000001.png: unknown label id\(s\) \[21\]"),
    ("truncated", r"SegmentationObject/2010_000001.png: corrupt or truncated image"),
])
def test_voc_malformed_input_names_the_file_and_writes_nothing(tmp_path, damage, message):
    voc, _ = make_voc(tmp_path)
    if damage == "list":
        (voc / "ImageSets" / "Segmentation" / "train.txt").unlink()
    elif damage == "image":
        (voc / "JPEGImages" / "2008_000002.jpg").unlink()
    elif damage == "label":  # the last image: four samples are written before it fails
        labels = np.zeros((24, 24), np.uint8)
        labels[3:6, 3:6] = 21
        save_palette_png(voc / "SegmentationClass" / "2010_000001.png", labels)
    else:
        path = voc / "SegmentationObject" / "2010_000001.png"
        path.write_bytes(path.read_bytes()[:-30])
    out = tmp_path / "out"
    with pytest.raises(DatasetdmError, match=message):
        import_dataset("voc", voc, out)
    assert_nothing_written(out)


def test_import_refuses_a_folder_with_files_unless_overwrite(tmp_path):
    voc, _ = make_voc(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DatasetdmError, match="not empty"):
        import_dataset("voc", voc, out)
    import_dataset("voc", voc, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and len(read_labelled_folder(out)) == 5
    import_dataset("voc", voc, out, ImportOptions(n_images=2), overwrite=True)  # replaces the images too
    assert len(read_labelled_folder(out)) == 2 and len(list((out / "images").iterdir())) == 2
    with pytest.raises(DatasetdmError, match="inside the source"):
        import_dataset("voc", voc, voc / "converted")


# ---------------------------------------------------------------------------------- COCO


def polygon(x0, y0, x1, y1):
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def uncompressed_rle(mask):
    """COCO's uncompressed RLE: run lengths in column-major order, starting with a 0-run."""
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, value, run = [], 0, 0
    for v in flat:
        if v != value:
            counts.append(run)
            value, run = v, 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def make_coco(root, split="train"):
    """annotations/{instances,person_keypoints,captions}_{split}2017.json + {split}2017/ images."""
    images = [(1, "000000000139.jpg", 30, 40), (2, "000000000285.png", 40, 20), (3, "000000000632.jpg", 24, 24)]
    for image_id, name, h, w in images:
        save_image(root / f"{split}2017" / name, rgb(h, w, image_id))
    big = np.zeros((30, 40), bool)
    big[2:20, 2:30] = True
    small = np.zeros((30, 40), bool)
    small[10:16, 10:18] = True  # lies on the big one: must stay visible
    dog = np.zeros((40, 20), bool)
    dog[5:30, 3:15] = True
    crowd = np.zeros((40, 20), bool)
    crowd[20:38, 0:20] = True  # half under the dog
    kp = np.zeros((17, 3), np.float32)
    kp[0], kp[5], kp[6] = (12, 5, 2), (8, 9, 1), (20, 9, 2)
    anns = [
        {"id": 10, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": [polygon(2, 2, 30, 20)]},
        {"id": 11, "image_id": 1, "category_id": 18, "iscrowd": 0, "segmentation": _rle(small)},
        {"id": 12, "image_id": 2, "category_id": 18, "iscrowd": 0, "segmentation": uncompressed_rle(dog)},
        {"id": 13, "image_id": 2, "category_id": 1, "iscrowd": 1, "segmentation": uncompressed_rle(crowd)},
        {"id": 14, "image_id": 3, "category_id": 1, "iscrowd": 0, "segmentation": [polygon(4, 4, 20, 20)]},
    ]
    categories = [{"id": 1, "name": "person", "supercategory": "person"},
                  {"id": 18, "name": "dog", "supercategory": "animal"}]
    image_entries = [{"id": i, "file_name": n, "height": h, "width": w} for i, n, h, w in images]
    ann_dir = root / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    (ann_dir / f"instances_{split}2017.json").write_text(json.dumps(
        {"images": image_entries, "annotations": anns, "categories": categories}))
    person = {**categories[0], "keypoints": list(COCO_KEYPOINT_NAMES), "skeleton": [list(e) for e in COCO_SKELETON]}
    kp_anns = [{**a, "keypoints": (kp.reshape(-1).tolist() if a["id"] == 10 else [0] * 51),
                "num_keypoints": 3 if a["id"] == 10 else 0} for a in anns if a["category_id"] == 1]
    (ann_dir / f"person_keypoints_{split}2017.json").write_text(json.dumps(
        {"images": image_entries, "annotations": kp_anns, "categories": [person]}))
    captions = [{"id": 7, "image_id": 1, "caption": "A man with a small dog."},
                {"id": 3, "image_id": 1, "caption": "A person   and a dog in a park."},
                {"id": 9, "image_id": 2, "caption": "A dog near a crowd."}]
    (ann_dir / f"captions_{split}2017.json").write_text(json.dumps({"images": image_entries, "annotations": captions}))
    return {"big": big, "small": small, "dog": dog, "crowd": crowd, "kp": kp}


def _rle(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    return rle


def decoded_polygon(poly, h, w):
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([poly], h, w))).astype(bool)


def test_coco_import_polygons_rle_crowd_keypoints_captions(tmp_path):
    parts = make_coco(tmp_path / "coco")
    import_dataset("coco", tmp_path / "coco", tmp_path / "out")
    folder, samples = load(tmp_path / "out")
    assert folder.tasks == ("semantic", "instances", "keypoints", "captions")
    assert [(c.id, c.name) for c in folder.categories] == [(1, "person"), (18, "dog")]
    assert folder.categories[0].keypoints == COCO_KEYPOINT_NAMES

    first = samples["000000000139"]
    big = decoded_polygon(polygon(2, 2, 30, 20), 30, 40)
    assert [i.category_id for i in first.instances] == [1, 18]
    np.testing.assert_array_equal(first.instances[0].mask, big)
    np.testing.assert_array_equal(first.instances[1].mask, parts["small"])
    np.testing.assert_array_equal(first.instances[0].keypoints, parts["kp"])
    expected = np.zeros((30, 40), np.uint8)
    expected[big] = 1
    expected[parts["small"]] = 18  # the smaller instance stays visible on the larger
    np.testing.assert_array_equal(first.semantic, expected)
    assert first.caption == "A person and a dog in a park."  # lowest annotation id, spaces normalised
    assert first.meta["captions"] == ["A person and a dog in a park.", "A man with a small dog."]

    second = samples["000000000285"]  # a PNG, portrait
    assert second.image.shape == (40, 20, 3)
    assert [i.category_id for i in second.instances] == [18]  # the crowd is no instance
    np.testing.assert_array_equal(second.instances[0].mask, parts["dog"])
    expected = np.zeros((40, 20), np.uint8)
    expected[parts["crowd"]] = 255  # crowd: ignore where no instance covers it
    expected[parts["dog"]] = 18
    np.testing.assert_array_equal(second.semantic, expected)
    third = samples["000000000632"]
    assert third.caption is None
    assert third.instances[0].keypoints is not None and not third.instances[0].keypoints.any()


def test_coco_round_trip_and_person_subset(tmp_path):
    make_coco(tmp_path / "coco", split="val")
    import_dataset("coco", tmp_path / "coco", tmp_path / "a", ImportOptions(split="val"))
    summary = export_dataset(tmp_path / "a", tmp_path / "coco-out", "coco", split="val")
    assert summary.samples == 3 and summary.notes == []
    ann_dir = tmp_path / "coco-out" / "annotations"
    assert sorted(p.name for p in ann_dir.iterdir()) == [
        "captions_val2017.json", "instances_val2017.json", "person_keypoints_val2017.json"]
    instances = json.loads((ann_dir / "instances_val2017.json").read_text())
    assert sum(a["iscrowd"] for a in instances["annotations"]) == 1  # the crowd comes back as a crowd
    import_dataset("coco", tmp_path / "coco-out", tmp_path / "b", ImportOptions(split="val"))
    a, b = load(tmp_path / "a")[1], load(tmp_path / "b")[1]
    assert_same_labels(a, b)
    assert [s.caption for s in a.values()] == [s.caption for s in b.values()]
    # COCO persons, task-agnostic: only images with a person, only the person class
    persons = import_dataset("coco", tmp_path / "coco", tmp_path / "p",
                             ImportOptions(split="val", classes=("person",), n_images=800))
    assert persons.samples == 2 and [c.name for c in persons.categories] == ["person"]


@pytest.mark.parametrize("damage, message", [
    ("polygon", r"instances_train2017.json: annotation 14 \(image 000000000632.jpg\): polygon point \(20, 99\) "
                r"lies outside the 24x24 image"),
    ("category", r"instances_train2017.json: annotation 12: unknown category_id 99"),
    ("image", r"train2017/000000000285.png: missing"),
    ("rle", r"annotation 11 .*RLE size \[5, 5\]"),
])
def test_coco_malformed_input(tmp_path, damage, message):
    make_coco(tmp_path / "coco")
    path = tmp_path / "coco" / "annotations" / "instances_train2017.json"
    data = json.loads(path.read_text())
    if damage == "polygon":
        data["annotations"][4]["segmentation"] = [[4, 4, 20, 4, 20, 99, 4, 20]]
    elif damage == "category":
        data["annotations"][2]["category_id"] = 99
    elif damage == "image":
        (tmp_path / "coco" / "train2017" / "000000000285.png").unlink()
    else:
        data["annotations"][1]["segmentation"]["size"] = [5, 5]
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetdmError, match=message):
        import_dataset("coco", tmp_path / "coco", tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


# ---------------------------------------------------------------------------------- Cityscapes


def make_cityscapes(root, split="train"):
    """leftImg8bit/{split}/{city}/ + gtFine/{split}/{city}/ labelIds and instanceIds."""
    frames = [("aachen", "aachen_000000_000019", 16, 32), ("bremen", "bremen_000003_000019", 24, 24)]
    expected = {}
    for n, (city, sid, h, w) in enumerate(frames):
        save_image(root / "leftImg8bit" / split / city / f"{sid}_leftImg8bit.png", rgb(h, w, n))
        labels = np.full((h, w), 7, np.uint8)  # road
        labels[:4] = 23  # sky
        labels[-2:] = 1  # ego vehicle: not a training class
        labels[4:6, :4] = 4  # static
        instances = labels.astype(np.int32)
        labels[6:12, 2:8] = 26
        instances[6:12, 2:8] = 26000  # car 0
        labels[6:12, 10:14] = 26
        instances[6:12, 10:14] = 26001  # car 1
        labels[4:8, 15:18] = 24
        instances[4:8, 15:18] = 24000  # person 0
        labels[12:14, 16:20] = 26  # a car group: class, no instance
        instances[12:14, 16:20] = 26
        labels[13:14, 0:2] = 29  # caravan instance: no training class, not an instance
        instances[13:14, 0:2] = 29000
        save_grey_png(root / "gtFine" / split / city / f"{sid}_gtFine_labelIds.png", labels)
        save_grey_png(root / "gtFine" / split / city / f"{sid}_gtFine_instanceIds.png", instances.astype(np.uint16))
        expected[sid] = (labels, instances)
    return expected


def test_cityscapes_import_train_ids_and_instances(tmp_path):
    expected = make_cityscapes(tmp_path / "cs")
    import_dataset("cityscapes", tmp_path / "cs", tmp_path / "out")
    folder, samples = load(tmp_path / "out")
    names = [c.name for c in folder.categories]
    assert len(names) == 19 and names[0] == "road" and names[18] == "bicycle"
    by_name = {c.name: c.id for c in folder.categories}
    assert by_name["road"] == 1 and by_name["car"] == 14  # trainId + 1
    for sid, (labels, instances) in expected.items():
        sample = samples[sid]
        truth = np.full(labels.shape, 255, np.uint8)
        for label_id, name in ((7, "road"), (23, "sky"), (26, "car"), (24, "person")):
            truth[labels == label_id] = by_name[name]
        np.testing.assert_array_equal(sample.semantic, truth)
        assert [i.category_id for i in sample.instances] == [by_name["person"], by_name["car"], by_name["car"]]
        for inst, value in zip(sample.instances, (24000, 26000, 26001)):
            np.testing.assert_array_equal(inst.mask, instances == value)


def test_cityscapes_round_trip_and_errors(tmp_path):
    make_cityscapes(tmp_path / "cs", split="val")
    import_dataset("cityscapes", tmp_path / "cs", tmp_path / "a", ImportOptions(split="val"))
    export_dataset(tmp_path / "a", tmp_path / "cs-out", "cityscapes", split="val")
    assert (tmp_path / "cs-out" / "gtFine" / "val" / "aachen" / "aachen_000000_000019_gtFine_labelIds.png").is_file()
    import_dataset("cityscapes", tmp_path / "cs-out", tmp_path / "b", ImportOptions(split="val"))
    assert_same_labels(load(tmp_path / "a")[1], load(tmp_path / "b")[1])

    labels = tmp_path / "cs" / "gtFine" / "val" / "bremen" / "bremen_000003_000019_gtFine_labelIds.png"
    bad = np.array(Image.open(labels))
    bad[0, 0] = 40
    save_grey_png(labels, bad)
    with pytest.raises(DatasetdmError, match=r"bremen_000003_000019_gtFine_labelIds.png: unknown label id\(s\) \[40\]"):
        import_dataset("cityscapes", tmp_path / "cs", tmp_path / "c", ImportOptions(split="val"))
    assert_nothing_written(tmp_path / "c")
    (tmp_path / "cs" / "leftImg8bit" / "val" / "bremen" / "bremen_000003_000019_leftImg8bit.png").unlink()
    with pytest.raises(DatasetdmError, match="labelIds.png: mask without an image"):
        import_dataset("cityscapes", tmp_path / "cs", tmp_path / "c", ImportOptions(split="val"))


# ---------------------------------------------------------------------------------- ADE20K


def make_ade(root, object_info=False):
    expected = {}
    for n, (sid, h, w) in enumerate([("ADE_train_00000001", 20, 30), ("ADE_train_00000002", 36, 18)]):
        save_image(root / "images" / "training" / f"{sid}.jpg", rgb(h, w, n))
        labels = np.zeros((h, w), np.uint8)  # 0: "other"
        labels[2:10, 2:10] = 1  # wall
        labels[10:, :5] = 3  # sky
        labels[12:16, 10:14] = 150  # flag
        save_grey_png(root / "annotations" / "training" / f"{sid}.png", labels)
        expected[sid] = labels
    (root / "sceneCategories.txt").write_text("ADE_train_00000001 airport_terminal\nADE_train_00000002 bathroom\n")
    if object_info:
        rows = ["Idx,Ratio,Train,Val,Name"] + [f"{i},0.01,10,1,name{i};synonym" for i in range(1, 151)]
        (root / "objectInfo150.csv").write_text("\n".join(rows) + "\n")
    return expected


def test_ade20k_import(tmp_path):
    expected = make_ade(tmp_path / "ADEChallengeData2016")
    import_dataset("ade20k", tmp_path / "ADEChallengeData2016", tmp_path / "out")
    folder, samples = load(tmp_path / "out")
    names = {c.id: c.name for c in folder.categories}
    assert len(names) == 150 and names[1] == "wall" and names[3] == "sky" and names[150] == "flag"
    for sid, labels in expected.items():
        truth = labels.copy()
        truth[labels == 0] = 255  # "other" -> ignore; 1..150 keep their ids
        np.testing.assert_array_equal(samples[sid].semantic, truth)
    assert samples["ADE_train_00000002"].meta == {"scene": "bathroom"}
    make_ade(tmp_path / "ade2", object_info=True)
    folder = read_labelled_folder(import_dataset("ade20k", tmp_path / "ade2", tmp_path / "out2").out)
    assert folder.categories[0].name == "name1" and folder.categories[149].name == "name150"


# ---------------------------------------------------------------------------------- NYU


def test_nyu_sync_pairs_and_image_depth_folders(tmp_path):
    sync = tmp_path / "sync"
    truth = {}
    for n, (scene, number, h, w) in enumerate([("kitchen_0028b", "00045", 24, 32), ("bathroom_0001", "00003", 30, 20)]):
        save_image(sync / scene / f"rgb_{number}.jpg", rgb(h, w, n))
        mm = np.random.default_rng(n).integers(0, 10000, (h, w)).astype(np.uint16)
        mm[0, 0] = 0  # no reading
        save_grey_png(sync / scene / f"sync_depth_{number}.png", mm)
        truth[f"{scene}_{number}"] = mm
    import_dataset("nyu", sync, tmp_path / "out", ImportOptions(n_images=50))
    folder, samples = load(tmp_path / "out")
    assert folder.tasks == ("depth",) and folder.categories == []
    for sid, mm in truth.items():
        np.testing.assert_array_equal(samples[sid].depth, (mm.astype(np.float64) * 0.001).astype(np.float32))

    flat = tmp_path / "flat"
    save_image(flat / "images" / "a.png", rgb(16, 40, 3))
    save_image(flat / "images" / "b.jpg", rgb(20, 20, 4))
    metres = np.random.default_rng(5).uniform(0.5, 9.0, (16, 40)).astype(np.float32)
    (flat / "depth").mkdir()
    np.save(flat / "depth" / "a.npy", metres)
    save_grey_png(flat / "depth" / "b.png", np.full((20, 20), 1234, np.uint16))
    import_dataset("nyu", flat, tmp_path / "out2", ImportOptions(depth_scale=0.0001))
    samples = load(tmp_path / "out2")[1]
    np.testing.assert_allclose(samples["a"].depth, metres, atol=0.0005)  # the folder stores millimetres
    np.testing.assert_array_equal(samples["b"].depth, np.full((20, 20), 0.123, np.float32))

    save_grey_png(flat / "depth" / "b.png", np.full((20, 20), 12, np.uint8))
    with pytest.raises(DatasetdmError, match=r"depth/b.png: depth must be a 16-bit"):
        import_dataset("nyu", flat, tmp_path / "out3")
    (flat / "images" / "b.jpg").unlink()
    with pytest.raises(DatasetdmError, match=r"depth/b.png: depth without an image"):
        import_dataset("nyu", flat, tmp_path / "out3")
    with pytest.raises(DatasetdmError, match="no classes; use --n-images"):
        import_dataset("nyu", sync, tmp_path / "out3", ImportOptions(per_class=5))
    assert_nothing_written(tmp_path / "out3")


# ---------------------------------------------------------------------------------- HF, merge


def test_hf_parquet_export(tmp_path):
    make_coco(tmp_path / "coco")
    import_dataset("coco", tmp_path / "coco", tmp_path / "a")
    export_dataset(tmp_path / "a", tmp_path / "hf", "hf")
    parquet = tmp_path / "hf" / "data" / "train-00000-of-00001.parquet"
    id2label = json.loads((tmp_path / "hf" / "id2label.json").read_text())
    assert id2label == {"0": "background", "1": "person", "18": "dog"}
    samples = load(tmp_path / "a")[1]
    rows = read_hf_rows(parquet)
    assert [r["id"] for r in rows] == list(samples)
    for row in rows:
        sample = samples[row["id"]]
        np.testing.assert_array_equal(row["image"], sample.image)
        np.testing.assert_array_equal(row["semantic"], sample.semantic)
        assert row["caption"] == sample.caption
        for obj, inst in zip(row["objects"], sample.instances, strict=True):
            mask = mask_utils.decode({"size": obj["segmentation"]["size"], "counts": obj["segmentation"]["counts"].encode()})
            np.testing.assert_array_equal(mask.astype(bool), inst.mask)
            assert obj["keypoints"] == ([] if inst.keypoints is None else inst.keypoints.reshape(-1).tolist())
    datasets = pytest.importorskip("datasets")
    loaded = datasets.load_dataset("parquet", data_files=str(parquet), split="train", cache_dir=str(tmp_path / "cache"))
    assert isinstance(loaded.features["image"], datasets.Image)
    first = loaded[0]
    assert first["image"].size == (40, 30) and first["image"].mode == "RGB"
    np.testing.assert_array_equal(np.asarray(first["semantic"]), samples[first["id"]].semantic)
    assert first["objects"][0]["category_id"] == 1


def test_merge_matches_classes_by_name(tmp_path):
    voc, _ = make_voc(tmp_path)
    make_coco(tmp_path / "coco")
    import_dataset("voc", voc, tmp_path / "real", ImportOptions(n_images=2, seed=0))
    import_dataset("coco", tmp_path / "coco", tmp_path / "synthetic")
    summary = merge_folders([tmp_path / "real", tmp_path / "synthetic"], tmp_path / "joint")
    assert summary.samples == 5
    folder, samples = load(tmp_path / "joint")
    ids = {c.name: c.id for c in folder.categories}
    assert ids["dog"] == 12 and ids["person"] == 15 and len(ids) == 20  # COCO's 1 and 18 remapped to VOC's
    assert next(c for c in folder.categories if c.name == "person").keypoints == COCO_KEYPOINT_NAMES
    coco_sample = samples["synthetic_000000000139"]
    assert set(np.unique(coco_sample.semantic).tolist()) == {0, 12, 15}
    assert [i.category_id for i in coco_sample.instances] == [15, 12]
    assert coco_sample.meta["source"] == "synthetic"
    assert all(sid.startswith(("real_", "synthetic_")) for sid in samples)


# ---------------------------------------------------------------------------------- prompts


def test_caption_prompts_from_a_labelled_folder(tmp_path):
    from datasetdm.labelers.attention import appended_prompt
    from datasetdm.prompts import read_prompts

    make_coco(tmp_path / "coco")
    import_dataset("coco", tmp_path / "coco", tmp_path / "a")
    prompts = read_prompts(tmp_path / "a")
    assert [(p.text, p.classes) for p in prompts] == [
        ("A person and a dog in a park.; person dog", ("person", "dog")),
        ("A dog near a crowd.; dog", ("dog",)),
    ]
    assert read_prompts(tmp_path / "a", classes=["dog", "cat"])[0].text == "A person and a dog in a park.; dog"
    # the attention labeler appends the classes itself: a prompt appended already stays as it is
    assert appended_prompt(prompts[0].text, ("person", "dog")) == prompts[0].text
    with pytest.raises(DatasetdmError, match="none of its classes"):
        read_prompts(tmp_path / "a", classes=["car"])


# ---------------------------------------------------------------------------------- CLI


def test_cli_data_import_export_and_merge(tmp_path):
    from typer.testing import CliRunner

    from datasetdm.cli import app

    voc, _ = make_voc(tmp_path)
    runner = CliRunner()
    result = runner.invoke(app, ["data", "import", "--format", "voc", str(voc), "--out", str(tmp_path / "few"),
                                 "--per-class", "1", "--seed", "2", "--no-progress"])
    assert result.exit_code == 0, result.output
    n = json.loads(result.stdout.strip().splitlines()[-1])["samples"]
    assert n >= 3
    for fmt in ("coco", "voc", "hf", "folder"):
        result = runner.invoke(app, ["export", str(tmp_path / "few"), "--format", fmt, "--out",
                                     str(tmp_path / f"x-{fmt}"), "--no-progress"])
        assert result.exit_code == 0, result.output
        assert f"exported {n} samples to {tmp_path / f'x-{fmt}'}" in result.stdout
    assert (tmp_path / "x-coco" / "annotations" / "instances_train2017.json").is_file()
    result = runner.invoke(app, ["data", "merge", str(tmp_path / "few"), str(tmp_path / "x-folder"), "--out",
                                 str(tmp_path / "m"), "--prefix", "real,synth", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["samples"] == 2 * n
    result = runner.invoke(app, ["export", str(tmp_path / "few"), "--format", "cityscapes", "--out", str(tmp_path / "cs")])
    assert isinstance(result.exception, DatasetdmError) and "no Cityscapes label" in str(result.exception)
    assert_nothing_written(tmp_path / "cs")
    result = runner.invoke(app, ["data", "import", "--format", "pascal", str(voc), "--out", str(tmp_path / "y")])
    assert isinstance(result.exception, DatasetdmError) and "--format 'pascal'" in str(result.exception)


def test_cached_import_reuses_a_matching_import(tmp_path):
    from datasetdm.formats.layouts import cached_import

    voc, _ = make_voc(tmp_path)
    first = cached_import("voc", voc, tmp_path / "cache", ImportOptions(n_images=2))
    stamp = (first / "annotations.json").stat().st_mtime_ns
    assert cached_import("voc", voc, tmp_path / "cache", ImportOptions(n_images=2)) == first
    assert (first / "annotations.json").stat().st_mtime_ns == stamp  # not imported again
    other = cached_import("voc", voc, tmp_path / "cache", ImportOptions(n_images=3))
    assert other != first and len(read_labelled_folder(other)) == 3


def test_imported_photos_train_generate_export(tmp_path, tiny_clip_path):
    """Real-photo sizes (JPEG, portrait and landscape) and VOC classes the world does not have,
    end to end: import -> train a decoder (2 iterations) -> generate from caption prompts -> export."""
    from datasetdm.generation.setup import generate_labelled
    from datasetdm.training import TrainOptions, train_decoder

    voc, _ = make_voc(tmp_path)
    make_coco(tmp_path / "coco")
    import_dataset("voc", voc, tmp_path / "voc")
    import_dataset("coco", tmp_path / "coco", tmp_path / "captions")
    train_decoder(tmp_path / "voc", tmp_path / "semantic",
                  TrainOptions(task="semantic", iterations=2, views=1, batch_size=2, dim=16, num_queries=4),
                  backbone_source=str(tiny_clip_path), show_progress=False)
    summary = generate_labelled(tmp_path / "run", backbone=str(tiny_clip_path), n=2, seed=0, steps=1, guidance=1.0,
                                batch_size=2, prompts=tmp_path / "captions", decoders=[tmp_path / "semantic"],
                                show_progress=False)
    assert summary.kept + summary.dropped == 2
    from datasetdm.formats.shards import read_manifest

    prompts = read_manifest(tmp_path / "run").column("prompt").to_pylist()
    assert all(p.endswith(("; person dog", "; dog")) for p in prompts)  # caption + appended classes
    export = export_dataset(tmp_path / "run", tmp_path / "synthetic-voc", "voc")
    assert export.samples == summary.kept
    assert len((tmp_path / "synthetic-voc" / "ImageSets" / "Segmentation" / "train.txt").read_text().split()) == summary.kept


def test_train_imports_a_layout_on_the_fly(tmp_path, tiny_clip_path):
    from typer.testing import CliRunner

    from datasetdm.decoder.cli import app

    voc, _ = make_voc(tmp_path)
    args = ["train", "--data", str(voc), "--format", "voc", "--per-class", "1", "--task", "semantic",
            "--backbone", str(tiny_clip_path), "--iterations", "1", "--views", "1", "--batch-size", "2", "--no-progress"]
    result = CliRunner().invoke(app, args + ["--out", str(tmp_path / "ckpt")])
    assert result.exit_code == 0, result.output
    imports = list((tmp_path / "ckpt.data").iterdir())
    assert len(imports) == 1 and (imports[0] / "import.json").is_file()
    assert json.loads(result.stdout.strip().splitlines()[-1])["checkpoint"] == str(tmp_path / "ckpt")
    result = CliRunner().invoke(app, args + ["--out", str(tmp_path / "ckpt"), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert list((tmp_path / "ckpt.data").iterdir()) == imports  # the import is reused


def test_a_killed_import_leaves_nothing_the_next_one_keeps(tmp_path):
    voc, _ = make_voc(tmp_path)
    stale = tmp_path / ".out.tmp-999999-abc"  # what a kill -9 during an import leaves
    (stale / "images").mkdir(parents=True)
    import_dataset("voc", voc, tmp_path / "out")
    assert leftovers(tmp_path, "out") == [] and len(read_labelled_folder(tmp_path / "out")) == 5


def _nyu_pairs(root):
    for n, (scene, number, h, w) in enumerate([("kitchen_0028b", "00045", 24, 32), ("bathroom_0001", "00003", 30, 20)]):
        save_image(root / scene / f"rgb_{number}.jpg", rgb(h, w, n))
        save_grey_png(root / scene / f"sync_depth_{number}.png",
                      np.random.default_rng(n).integers(500, 10000, (h, w)).astype(np.uint16))
    return root


LAYOUT_CASES = {  # format: (fixture, decoder task, export format, ImportOptions)
    "voc": (lambda p: make_voc(p)[0], "semantic", "voc", ImportOptions()),
    "coco": (lambda p: make_coco(p) and p, "instance", "coco", ImportOptions()),
    "cityscapes": (lambda p: make_cityscapes(p) and p, "semantic", "cityscapes", ImportOptions()),
    "ade20k": (lambda p: make_ade(p) and p, "semantic", "hf", ImportOptions()),
    "nyu": (_nyu_pairs, "depth", "hf", ImportOptions(n_images=50)),
}


@pytest.mark.parametrize("fmt", sorted(LAYOUT_CASES))
def test_every_layout_imports_trains_generates_and_exports_back(fmt, tmp_path, tiny_clip_path):
    """Issue 20's round: each layout as it ships -> labelled folder -> a decoder (1 iteration) ->
    2 generated samples -> exported in a layout a training script reads (and imported again
    where this project reads that layout)."""
    from datasetdm.generation.setup import generate_labelled
    from datasetdm.training import TrainOptions, train_decoder

    make, task, export_fmt, options = LAYOUT_CASES[fmt]
    src = make(tmp_path / "src")
    import_dataset(fmt, src, tmp_path / "real", options)
    train_decoder(tmp_path / "real", tmp_path / "decoder",
                  TrainOptions(task=task, iterations=1, views=1, batch_size=2, dim=16, num_queries=4),
                  backbone_source=str(tiny_clip_path), show_progress=False)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a room with a table\n")
    summary = generate_labelled(tmp_path / "run", backbone=str(tiny_clip_path), n=2, seed=0, steps=1, guidance=1.0,
                                batch_size=2, prompts=prompts if task == "depth" else None,
                                decoders=[tmp_path / "decoder"], show_progress=False)
    assert summary.kept == 2  # no filter asked for: every sample is kept
    exported = export_dataset(tmp_path / "run", tmp_path / "synthetic", export_fmt)
    assert exported.samples == summary.kept
    if export_fmt == "hf":
        (parquet,) = (tmp_path / "synthetic").rglob("*.parquet")
        rows = read_hf_rows(parquet)
        assert len(rows) == summary.kept and all(r["image"].ndim == 3 for r in rows)
        if task == "depth":
            assert all(r["depth"] is not None and r["depth"].shape == r["image"].shape[:2] for r in rows)
    else:
        import_dataset(export_fmt, tmp_path / "synthetic", tmp_path / "again")
        assert len(read_labelled_folder(tmp_path / "again")) == summary.kept
