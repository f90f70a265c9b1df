import json

import numpy as np
import pytest
from PIL import Image

from datasetdm.errors import DatasetdmError
from datasetdm.formats.export import export_shards
from datasetdm.formats.labelled_folder import read_labelled_folder
from datasetdm.formats.sample import COCO_KEYPOINT_NAMES, COCO_SKELETON, Category, Instance, LabelledSample
from datasetdm.formats.shards import ShardWriter

CATS = [Category(1, "person", COCO_KEYPOINT_NAMES, COCO_SKELETON), Category(2, "dog")]
H, W = 12, 10


def make_sample(i):
    rng = np.random.default_rng(i)
    sem = np.zeros((H, W), np.uint8)
    sem[2:7, 1:4] = 1
    sem[8:, 5:] = 2
    sem[0] = 255
    kp = np.zeros((17, 3), np.float32)
    kp[0] = [2, 3, 2]
    kp[5] = [1, 5, 1]
    depth = rng.uniform(0.3, 9, (H, W)).astype(np.float32)
    return LabelledSample(
        id=str(i),
        image=rng.integers(0, 256, (H, W, 3), dtype=np.uint8),
        semantic=sem,
        instances=[Instance(1, sem == 1, kp, score=0.8), Instance(2, sem == 2, score=0.7)],
        depth=depth,
    )


@pytest.fixture()
def shards(tmp_path):
    out = tmp_path / "shards"
    with ShardWriter(out, CATS, {"seed": 1}, samples_per_shard=2) as writer:
        for i in range(5):
            row = {"prompt": f"a person and a dog {i}", "classes": ["person", "dog"], "seed": i, "scores": {"area": 0.5}}
            if i == 2:
                writer.add(i, {**row, "dropped_reason": "area 0.000 < 0.1"}, None)
                continue
            extra = LabelledSample(id="", image=np.zeros((H, W, 3), np.uint8), semantic=np.full((H, W), 2, np.uint8))
            writer.add(i, row, make_sample(i), {"attn": extra})
    return out


def test_export_to_labelled_folder(shards, tmp_path):
    out = tmp_path / "folder"
    assert export_shards(shards, out) == 4

    folder = read_labelled_folder(out)
    assert folder.ids == ["000000000", "000000001", "000000003", "000000004"]
    assert folder.tasks == ("semantic", "instances", "keypoints", "depth", "captions")
    assert folder.categories == CATS
    for sample, i in zip(folder, (0, 1, 3, 4)):
        ref = make_sample(i)
        np.testing.assert_array_equal(sample.image, ref.image)
        np.testing.assert_array_equal(sample.semantic, ref.semantic)
        np.testing.assert_allclose(sample.depth, ref.depth, atol=0.0006)
        assert sample.caption == f"a person and a dog {i}"
        assert sample.meta["seed"] == i and sample.meta["scores"] == {"area": 0.5}
        np.testing.assert_array_equal(sample.instances[0].mask, ref.instances[0].mask)
        np.testing.assert_allclose(sample.instances[0].keypoints[[0, 5]], [[2, 3, 2], [1, 5, 1]])

    # the files themselves, as other tools see them
    sem = Image.open(out / "semantic" / "000000003.png")
    assert sem.mode == "P" and 255 in np.asarray(sem)
    depth = Image.open(out / "depth" / "000000003.png")
    assert depth.mode.startswith("I;16")
    raw = np.asarray(depth)
    assert raw.max() > 1000  # millimetres, not metres
    from pycocotools.coco import COCO

    coco = COCO(str(out / "annotations.json"))
    assert len(coco.getImgIds()) == 4
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[coco.getImgIds()[0]]))
    assert [a["category_id"] for a in anns] == [1, 2]
    np.testing.assert_array_equal(coco.annToMask(anns[0]), make_sample(0).instances[0].mask)
    assert anns[0]["num_keypoints"] == 2
    assert coco.loadCats(1)[0]["skeleton"] == [list(e) for e in COCO_SKELETON]
    info = json.loads((out / "annotations.json").read_text())["info"]
    assert info["depth_scale"] == 0.001


def test_export_a_second_annotators_labels(shards, tmp_path):
    out = tmp_path / "attn"
    export_shards(shards, out, annotator="attn", limit=2)
    folder = read_labelled_folder(out)
    assert len(folder) == 2
    assert (folder[0].semantic == 2).all()
    with pytest.raises(DatasetdmError, match="no labels from annotator 'other'"):
        export_shards(shards, tmp_path / "x", annotator="other")


def test_export_errors(shards, tmp_path):
    with pytest.raises(DatasetdmError, match="run.json: missing"):
        export_shards(tmp_path / "nope", tmp_path / "out")
    export_shards(shards, tmp_path / "out")
    with pytest.raises(DatasetdmError, match="already exists"):
        export_shards(shards, tmp_path / "out")
    assert export_shards(shards, tmp_path / "out", overwrite=True) == 4


def test_export_and_view_commands(shards, tmp_path):
    import typer
    from typer.testing import CliRunner

    from datasetdm.generation import cli as generation_cli

    app = typer.Typer()
    app.command()(generation_cli.export)
    app.command()(generation_cli.view)
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(shards), "--out", str(tmp_path / "folder")])
    assert result.exit_code == 0, result.output
    assert "exported 4 samples" in result.output
    result = runner.invoke(app, ["view", str(tmp_path / "folder"), "--limit", "3"])
    assert result.exit_code == 0, result.output
    assert "(3 samples)" in result.output
    assert (tmp_path / "folder" / "gallery" / "index.html").exists()
    result = runner.invoke(app, ["export", str(tmp_path / "missing"), "--out", str(tmp_path / "x")])
    assert isinstance(result.exception, DatasetdmError)
