import numpy as np
import pytest

from datasetdm.formats.sample import COCO_KEYPOINT_NAMES
from datasetdm.world.render import CATEGORIES, COLOURS, IMAGE_SIZE, render_scene

SCENES = [render_scene("train", 0, i) for i in range(40)]


def test_deterministic():
    for i in (0, 7, 19):
        a, b = render_scene("train", 0, i), render_scene("train", 0, i)
        assert np.array_equal(a.image, b.image)
        assert np.array_equal(a.semantic, b.semantic)
        assert np.array_equal(a.depth, b.depth)
        assert a.caption == b.caption


def test_splits_and_seeds_do_not_share_scenes():
    train = {s.image.tobytes() for s in SCENES}
    for split, seed in (("val", 0), ("test", 0), ("train", 1)):
        other = {render_scene(split, seed, i).image.tobytes() for i in range(40)}
        assert not train & other, (split, seed)


def test_scene_contents():
    assert len({c.name for c in CATEGORIES}) >= 9
    seen = set()
    for s in SCENES:
        assert s.image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and s.image.dtype == np.uint8
        assert 1 <= len(s.instances) <= 6
        seen |= {inst.category_id for inst in s.instances}
        # smooth images: neighbouring pixels mostly identical or close (no per-pixel noise)
        dx = np.abs(np.diff(s.image.astype(int), axis=1)).sum(-1)
        assert np.median(dx) <= 6
    assert seen == {c.id for c in CATEGORIES}


def test_instances_consistent_with_semantic():
    for s in SCENES:
        union = np.zeros(s.semantic.shape, int)
        rebuilt = np.zeros_like(s.semantic)
        for inst in s.instances:
            assert inst.mask.sum() >= 6
            union += inst.mask
            rebuilt[inst.mask] = inst.category_id
        assert union.max() <= 1, "instances overlap"
        assert np.array_equal(rebuilt, s.semantic)


def test_depth_consistent_with_objects_and_ground():
    for s in SCENES:
        horizon = s.meta["horizon"]
        rows = np.arange(IMAGE_SIZE)[:, None].repeat(IMAGE_SIZE, 1)
        bg = s.semantic == 0
        sky = bg & (rows < int(horizon) - 1)
        assert (s.depth[sky] == 0).all()
        ground = bg & (rows > horizon + 1)
        assert (s.depth[ground] > 0).all()
        # ground depth falls with image row (nearer towards the bottom of the image)
        g = np.where(ground, s.depth, np.nan)
        rowmeans = np.nanmean(g[int(horizon) + 2:], axis=1)
        rowmeans = rowmeans[~np.isnan(rowmeans)]
        assert (np.diff(rowmeans) <= 1e-3).all()
        for inst, dist in zip(s.instances, s.meta["instance_distances"]):
            d = s.depth[inst.mask]
            assert (d <= dist + 1e-3).all() and (d >= dist - 1.5).all()


def test_keypoints_inside_their_person_when_visible():
    people = 0
    for s in SCENES:
        for inst in s.instances:
            if inst.category_id != 1:
                assert inst.keypoints is None
                continue
            people += 1
            kp = inst.keypoints
            assert kp.shape == (len(COCO_KEYPOINT_NAMES), 3)
            for x, y, v in kp:
                if v == 2:
                    assert inst.mask[int(round(y)), int(round(x))]
                elif v == 1:
                    assert not inst.mask[int(round(y)), int(round(x))]
                else:
                    assert x == 0 and y == 0
    assert people >= 5


def test_caption_names_what_is_there():
    names = {c.id: c.name for c in CATEGORIES}
    for s in SCENES:
        cap = s.caption
        for inst in s.instances:
            name = names[inst.category_id]
            assert name in cap or {"person": "people", "box": "boxes"}.get(name, name + "s") in cap
        assert any(c in cap for c in COLOURS)
        assert cap.split()[-1] in {"day", "dusk", "night"}


@pytest.mark.parametrize("split", ["bogus"])
def test_unknown_split(split):
    with pytest.raises(ValueError, match="unknown split"):
        render_scene(split, 0, 0)


def _render_cli(out, *args):
    from typer.testing import CliRunner

    from datasetdm.cli import app

    result = CliRunner().invoke(app, ["world", "render", "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    return out


def test_render_cli_is_byte_identical_and_loads(tmp_path):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from PIL import Image

    from datasetdm.formats.labelled_folder import read_labelled_folder

    a = _render_cli(tmp_path / "a", "--split", "val", "--n", "6", "--seed", "3")
    b = _render_cli(tmp_path / "b", "--split", "val", "--n", "6", "--seed", "3")
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) == 6 * 3 + 1
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel

    coco = COCO(str(a / "annotations.json"))
    person = [c for c in coco.loadCats(coco.getCatIds()) if c["name"] == "person"][0]
    assert len(person["keypoints"]) == 17 and person["skeleton"]
    folder = read_labelled_folder(a)
    assert set(folder.tasks) >= {"semantic", "instances", "keypoints", "depth", "captions"}
    for i, img_id in enumerate(coco.getImgIds()):
        sample = folder[i]
        expected = render_scene("val", 3, i)
        assert np.array_equal(sample.image, expected.image)
        assert np.array_equal(sample.semantic, expected.semantic)
        assert np.abs(sample.depth - expected.depth).max() <= 0.0006  # millimetre PNG
        sem = np.asarray(Image.open(a / "semantic" / f"{expected.id}.png"))
        assert Image.open(a / "semantic" / f"{expected.id}.png").mode == "P"
        assert np.array_equal(sem, expected.semantic)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
        assert len(anns) == len(expected.instances)
        for ann, inst in zip(anns, expected.instances):
            assert np.array_equal(mask_utils.decode(ann["segmentation"]).astype(bool), inst.mask)
            if inst.keypoints is not None:
                assert ann["num_keypoints"] == int((inst.keypoints[:, 2] > 0).sum())


def test_default_preset_is_framed_like_voc():
    """World v2 (issue 16): at most 3 objects, 1.8 on average, median instance ≥ 5% of the image,
    people's left/right joints about two latent cells apart; the crowded v1 preset is smaller."""
    from datasetdm.world.render import scene_stats

    default = scene_stats([render_scene("test", 0, i) for i in range(150)])
    crowded = scene_stats([render_scene("test", 0, i, "crowded") for i in range(150)])
    assert default["max_objects"] <= 3 and default["objects_per_image"] <= 2.2
    assert default["median_instance_area"] >= 0.05
    assert default["median_joint_spacing_cells"] >= 1.5
    assert crowded["median_instance_area"] < 0.04 and crowded["max_objects"] > 3
    for s in SCENES:
        assert s.meta["preset"] == "default"
        # framed objects stay inside the frame vertically: every person's head is in the image
        for inst in s.instances:
            if inst.keypoints is not None:
                assert inst.keypoints[0, 2] > 0 or inst.keypoints[1, 2] > 0 or inst.keypoints[2, 2] > 0


def test_scene_stats_known_answer():
    from datasetdm.formats.sample import Instance, LabelledSample
    from datasetdm.world.render import scene_stats

    def sample(areas):
        instances = []
        for a in areas:
            m = np.zeros((IMAGE_SIZE, IMAGE_SIZE), bool)
            m.flat[:a] = True
            instances.append(Instance(category_id=2, mask=m))
        return LabelledSample(id="x", image=np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8), instances=instances)

    stats = scene_stats([sample([410]), sample([40, 820, 2048])])
    assert stats["objects_per_image"] == 2.0 and stats["max_objects"] == 3
    assert stats["median_instance_area"] == round((410 + 820) / 2 / 4096, 4)
    assert stats["under_64_px"] == 0.25
    assert stats["median_joint_spacing_cells"] is None


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown world preset"):
        render_scene("train", 0, 0, "huge")


def test_stats_cli_prints_json_last(tmp_path):
    import json

    from typer.testing import CliRunner

    from datasetdm.cli import app

    result = CliRunner().invoke(app, ["world", "stats", "--n", "20", "--preset", "crowded"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.output.strip().splitlines()[-1])
    assert stats["preset"] == "crowded" and stats["scenes"] == 20
    bad = CliRunner().invoke(app, ["world", "render", "--out", str(tmp_path / "x"), "--preset", "huge"])
    assert bad.exit_code != 0 and not (tmp_path / "x").exists()
