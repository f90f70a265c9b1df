"""The decoder's feature cache on disk (issue 19): fp16 shards written once, a build that is
interrupted resumes, a complete cache is reused, a batch is read without keeping the shards
mapped, and a decoder trained from it is the one trained from the in-memory cache."""

import json

import numpy as np
import pytest
import torch

from datasetdm.formats.labelled_folder import LabelledFolderWriter
from datasetdm.world.render import CATEGORIES, render_scene

OPTS = dict(task="semantic", n_images=6, views=2, iterations=5, batch_size=4, dim=16, num_queries=4, layers=2,
            extract_batch=4)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache_world") / "train"
    with LabelledFolderWriter(path, list(CATEGORIES)) as w:
        for i in range(6):
            w.add(render_scene("train", 0, i))
    return path


def _opts(**kw):
    from datasetdm.training import TrainOptions

    return TrainOptions(**{**OPTS, **kw})


def _counting_extract(monkeypatch, fail_at=None):
    """Count FeatureSource.extract calls (one per shard); raise at call ``fail_at``."""
    from datasetdm.training import FeatureSource

    calls = []
    real = FeatureSource.extract

    def extract(self, *a, **k):
        calls.append(1)
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(FeatureSource, "extract", extract)
    return calls


def test_disk_cache_trains_the_decoder_of_the_memory_cache(world, tiny_clip_path, tmp_path):
    from datasetdm.decoder import load_decoder
    from datasetdm.training import prepare, train_decoder

    bb = str(tiny_clip_path)
    disk = train_decoder(world, tmp_path / "disk", _opts(), backbone_source=bb, show_progress=False)
    mem = train_decoder(world, tmp_path / "mem", _opts(feature_cache="memory"), backbone_source=bb,
                        show_progress=False)
    assert disk["final_loss"] == mem["final_loss"]
    a, b = load_decoder(tmp_path / "disk"), load_decoder(tmp_path / "mem")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)

    # the stores hold the same inputs: fp16 features and maps, the view's pixels
    p_disk = prepare(world, _opts(), bb, work_dir=tmp_path / "w")
    p_mem = prepare(world, _opts(feature_cache="memory"), bb, work_dir=tmp_path / "w2")
    idx = torch.tensor([5, 0, 11, 3])
    x, y = p_disk.trainer.inp.select(idx), p_mem.trainer.inp.select(idx)
    assert [f.dtype for f in x.features] == [torch.float16] * len(x.features)
    assert all(torch.equal(f, g) for f, g in zip(x.features, y.features))
    assert all(torch.equal(f, g) for f, g in zip(x.class_attention, y.class_attention))
    assert torch.equal(x.image, y.image) and x.image_size == y.image_size
    # and the decoders predict alike from it
    pa, pb = a.predict(x), b.predict(x)
    assert all(np.array_equal(u["semantic"], v["semantic"]) for u, v in zip(pa, pb))


def test_an_interrupted_cache_build_resumes_and_a_complete_one_is_reused(world, tiny_clip_path, tmp_path,
                                                                          monkeypatch):
    from datasetdm.training import prepare

    bb, work = str(tiny_clip_path), tmp_path / "work"
    calls = _counting_extract(monkeypatch, fail_at=3)
    with pytest.raises(KeyboardInterrupt):
        prepare(world, _opts(), bb, work_dir=work)
    (folder,) = work.glob("features-*")
    shards = sorted(folder.glob("shard-*.safetensors"))
    assert len(shards) == 2 and not json.loads((folder / "cache.json").read_text())["complete"]
    written = {p.name: p.stat().st_mtime_ns for p in shards}

    calls = _counting_extract(monkeypatch)
    resumed = prepare(world, _opts(), bb, work_dir=work)
    assert len(calls) == 1  # 12 views, 4 a shard: only the missing third shard was computed
    assert {p.name: p.stat().st_mtime_ns for p in shards} == written  # finished shards are written once
    assert json.loads((folder / "cache.json").read_text())["complete"]

    fresh = prepare(world, _opts(feature_cache="memory"), bb)
    got, want = resumed.trainer.inp.select(range(12)), fresh.trainer.inp
    assert all(torch.equal(f, g) for f, g in zip(got.features, want.features))
    assert all(torch.equal(f, g) for f, g in zip(got.class_attention, want.class_attention))

    calls = _counting_extract(monkeypatch)
    prepare(world, _opts(iterations=99, task="instance"), bb, work_dir=work)  # same images and views: reused
    assert calls == []
    prepare(world, _opts(views=3), bb, work_dir=work)  # other views: another cache
    assert len(calls) == 5 and len(list(work.glob("features-*"))) == 2  # 18 views: 5 shards


def test_a_damaged_shard_is_recomputed(world, tiny_clip_path, tmp_path, monkeypatch):
    from datasetdm.training import prepare

    bb, work = str(tiny_clip_path), tmp_path / "work"
    first = prepare(world, _opts(), bb, work_dir=work).trainer.inp.select(range(12))
    (folder,) = work.glob("features-*")
    shard = folder / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    calls = _counting_extract(monkeypatch)
    again = prepare(world, _opts(), bb, work_dir=work).trainer.inp.select(range(12))
    assert len(calls) == 1
    assert all(torch.equal(f, g) for f, g in zip(first.features, again.features))


def test_a_batch_is_read_without_keeping_the_cache_mapped(world, tiny_clip_path, tmp_path):
    """Resident memory holds a batch: no shard stays mapped after a read (mapped pages count as
    resident), and a read returns the batch's rows only."""
    from datasetdm.training import prepare

    prep = prepare(world, _opts(), str(tiny_clip_path), work_dir=tmp_path / "work")
    store = prep.trainer.inp
    batch = store.select([7, 2])
    assert batch.batch_size == 2 and len(store) == 12
    maps = open("/proc/self/maps").read() if __import__("os").path.exists("/proc/self/maps") else ""
    assert "shard-" not in maps
    with pytest.raises(IndexError):
        store.select([12])


def test_train_cli_feature_cache_folder_is_kept_and_shared(world, tiny_clip_path, tmp_path, capsys):
    from datasetdm.decoder.cli import main

    cache = tmp_path / "cache"
    args = ["--data", world, "--backbone", tiny_clip_path, "--iterations", "2", "--views", "1", "--batch-size", "2",
            "--no-progress", "--feature-cache", cache]
    for task in ("semantic", "instance"):
        with pytest.raises(SystemExit) as ex:
            main([str(a) for a in ["train", "--task", task, "--out", tmp_path / task, *args]])
        assert ex.value.code in (0, None), capsys.readouterr().err
    (folder,) = cache.glob("features-*")  # one cache for both tasks, kept after training
    assert json.loads((folder / "cache.json").read_text())["complete"]
    assert not (tmp_path / "semantic.work").exists()


def test_depth_views_are_unzoomed_so_depth_gets_its_own_cache(world, tiny_clip_path, tmp_path, monkeypatch):
    """views.view_scale: depth views are not zoomed, so their features differ from the other tasks'."""
    from datasetdm.training import prepare

    bb, work = str(tiny_clip_path), tmp_path / "work"
    prepare(world, _opts(), bb, work_dir=work)
    calls = _counting_extract(monkeypatch)
    prepare(world, _opts(task="depth"), bb, work_dir=work)
    assert calls and len(list(work.glob("features-*"))) == 2
