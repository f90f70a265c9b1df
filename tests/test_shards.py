import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from datasetdm.errors import DatasetdmError
from datasetdm.formats.sample import COCO_KEYPOINT_NAMES, COCO_SKELETON, Category, Instance, LabelledSample
from datasetdm.formats.shards import (
    MANIFEST_FILE,
    ShardWriter,
    read_manifest,
    read_shards,
    shard_categories,
    shard_paths,
)

CATS = [Category(1, "person", COCO_KEYPOINT_NAMES, COCO_SKELETON), Category(2, "dog")]
H, W = 12, 10


def make_sample(i: int) -> LabelledSample:
    rng = np.random.default_rng(i)
    image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    semantic = np.zeros((H, W), np.uint8)
    semantic[2:6, 1:5] = 1
    semantic[8:, 6:] = 2
    semantic[0, :] = 255
    person = semantic == 1
    kp = np.zeros((17, 3), np.float32)
    kp[:5] = [[2, 3, 2], [3, 3, 1], [1.5, 4.25, 2], [0, 0, 0], [4, 5, 2]]
    instances = [Instance(1, person, kp, score=0.9), Instance(2, semantic == 2, score=0.5 + i / 100)]
    depth = rng.uniform(0.5, 20, (H, W)).astype(np.float32)
    depth[0, 0] = 0
    return LabelledSample(id=str(i), image=image, semantic=semantic, instances=instances, depth=depth)


def row(i: int, drop: bool = False) -> dict:
    r = {"prompt": f"a photo of dog {i}", "classes": ["dog"], "seed": 1000 + i, "scores": {"confidence": i / 10, "area": 0.25}}
    if drop:
        r["dropped_reason"] = "confidence 0.10 < 0.50"
    return r


def write_run(out, ids, n, drop=(3,), per_shard=4, resume=False, config=None):
    writer = ShardWriter(out, CATS, config or {"seed": 7}, samples_per_shard=per_shard, backbone="fake", resume=resume)
    start = writer.resume_from(n)
    for i in range(start, n):
        if i not in ids:
            break
        writer.add(i, row(i, i in drop), None if i in drop else make_sample(i))
    else:
        writer.close()
    return writer


def tree_bytes(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name != MANIFEST_FILE}


def test_roundtrip_and_manifest(tmp_path):
    write_run(tmp_path, range(10), 10)
    assert [p.name for p in shard_paths(tmp_path)] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    samples = list(read_shards(tmp_path))
    assert [s.meta["id"] for s in samples] == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    for s in samples:
        ref = make_sample(s.meta["id"])
        assert s.id == f"{s.meta['id']:09d}"
        np.testing.assert_array_equal(s.image, ref.image)
        np.testing.assert_array_equal(s.semantic, ref.semantic)
        np.testing.assert_allclose(s.depth, ref.depth, atol=0.0005 + 1e-6)
        assert s.depth[0, 0] == 0
        assert [i.category_id for i in s.instances] == [1, 2]
        np.testing.assert_array_equal(s.instances[0].mask, ref.instances[0].mask)
        np.testing.assert_allclose(s.instances[0].keypoints[:5], [[2, 3, 2], [3, 3, 1], [1.5, 4.25, 2], [0, 0, 0], [4, 5, 2]])
        assert s.instances[1].score == pytest.approx(0.5 + s.meta["id"] / 100)
        assert s.caption == f"a photo of dog {s.meta['id']}"
        assert s.meta["seed"] == 1000 + s.meta["id"]
        assert s.meta["scores"] == {"confidence": s.meta["id"] / 10, "area": 0.25}
    assert shard_categories(tmp_path) == CATS

    table = pq.read_table(tmp_path / MANIFEST_FILE)
    assert table.column_names[:10] == ["id", "key", "shard", "prompt", "classes", "seed", "kept", "dropped_reason", "backbone", "versions"]
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == list(range(10))
    assert rows[3]["kept"] is False and rows[3]["shard"] is None and rows[3]["dropped_reason"] == "confidence 0.10 < 0.50"
    assert rows[5]["shard"] == "shard-000001.tar" and rows[5]["score_confidence"] == 0.5
    assert json.loads(rows[0]["versions"])["numpy"] == np.__version__
    assert json.loads(table.schema.metadata[b"datasetdm"])["samples_per_shard"] == 4


def test_webdataset_reads_the_shards(tmp_path):
    webdataset = pytest.importorskip("webdataset")
    write_run(tmp_path, range(6), 6)
    urls = [str(p) for p in shard_paths(tmp_path)]
    ds = webdataset.WebDataset(urls, shardshuffle=False).decode("rgb8")
    items = list(ds)
    assert [it["__key__"] for it in items] == ["000000000", "000000001", "000000002", "000000004", "000000005"]
    first = items[0]
    assert {"png", "semantic.png", "depth.png", "json"} <= set(first)
    np.testing.assert_array_equal(first["png"], make_sample(0).image)
    assert first["json"]["instances"][0]["segmentation"]["size"] == [H, W]
    assert first["json"]["categories"][0]["keypoints"][0] == "nose"
    raw = next(iter(webdataset.WebDataset(urls, shardshuffle=False)))
    from io import BytesIO

    from PIL import Image

    sem = Image.open(BytesIO(raw["semantic.png"]))
    assert sem.mode == "P"
    np.testing.assert_array_equal(np.asarray(sem), make_sample(0).semantic)
    assert Image.open(BytesIO(raw["depth.png"])).mode.startswith("I;16")


def test_resume_after_crash_gives_identical_shards(tmp_path):
    full = tmp_path / "full"
    write_run(full, range(10), 10)

    crashed = tmp_path / "crashed"
    writer = write_run(crashed, range(6), 10)  # "crash" in the middle of shard 1
    assert writer.next_id == 6
    assert sorted(p.name for p in (crashed / "shards").iterdir()) == [".shard-000001.tar.tmp", "shard-000000.tar"]
    # as if killed right after renaming shard 1, before the manifest listed it
    (crashed / "shards" / "shard-000001.tar").write_bytes(b"half")
    assert read_manifest(crashed).num_rows == 4
    # killed inside the next manifest and run.json writes, before their renames
    (crashed / ".manifest.parquet.k9x2ab.tmp").write_bytes(b"half a parquet")
    (crashed / ".run.json.q1w2e3.tmp").write_text("{")

    write_run(crashed, range(10), 10, resume=True)
    assert tree_bytes(crashed) == tree_bytes(full)
    assert read_manifest(crashed).equals(read_manifest(full))


def test_a_run_killed_while_writing_its_run_file_starts_over(tmp_path):
    """Killed inside the first write (run.json's temporary, nothing renamed): the same command
    starts the run anew, with or without resume, instead of calling the folder someone else's."""
    full = tmp_path / "full"
    write_run(full, range(10), 10)
    for resume in (False, True):
        killed = tmp_path / f"killed-{resume}"
        (killed / "shards").mkdir(parents=True)
        (killed / ".run.json.a1b2c3.tmp").write_text('{"format": ')
        write_run(killed, range(10), 10, resume=resume)
        assert tree_bytes(killed) == tree_bytes(full)


def test_extending_a_finished_run_redoes_the_partial_shard(tmp_path):
    full = tmp_path / "full"
    write_run(full, range(10), 10)
    short = tmp_path / "short"
    write_run(short, range(6), 6)
    assert read_manifest(short).num_rows == 6
    write_run(short, range(10), 10, resume=True)
    assert tree_bytes(short) == tree_bytes(full)
    assert read_manifest(short).equals(read_manifest(full))


def test_resume_rules(tmp_path):
    write_run(tmp_path, range(5), 5)
    with pytest.raises(DatasetdmError, match="run.json: output folder already holds a run; pass --resume"):
        write_run(tmp_path, range(5), 5)
    with pytest.raises(DatasetdmError, match="run.json: cannot resume.*different settings: seed"):
        write_run(tmp_path, range(8), 8, resume=True, config={"seed": 8})
    with pytest.raises(DatasetdmError, match="different samples_per_shard"):
        write_run(tmp_path, range(8), 8, resume=True, per_shard=3)
    (tmp_path / "shards" / "shard-000000.tar").unlink()
    with pytest.raises(DatasetdmError, match="shard-000000.tar: listed in the manifest but missing"):
        write_run(tmp_path, range(8), 8, resume=True)


def test_bad_input_errors(tmp_path):
    writer = ShardWriter(tmp_path, CATS, {}, samples_per_shard=2)
    with pytest.raises(DatasetdmError, match="expected 0, got 1"):
        writer.add(1, row(1), make_sample(1))
    bad = make_sample(0)
    bad.depth[1, 1] = np.nan
    with pytest.raises(DatasetdmError, match="sample 0: depth contains NaN"):
        writer.add(0, row(0), bad)
    with pytest.raises(DatasetdmError, match="run.json: missing; not a datasetdm shard folder"):
        list(read_shards(tmp_path / "nothing"))
