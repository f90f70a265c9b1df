"""bench/label_source.py: a decoder's labels of real scenes, written as a labelled folder the
downstream harness reads (issue 22: is the synthetic data's loss in the labels or the images?)."""

from datasetdm.evaluation.evaluate import decoder_predictions
from datasetdm.formats.labelled_folder import LabelledFolderWriter, read_labelled_folder
from datasetdm.training import TrainOptions, train_decoder
from datasetdm.world.render import CATEGORIES, render_scene

from bench_support import load_bench


def _bench():
    return load_bench("label_source")


def _folder(path, seed, n):
    """n train-split scenes that show a person (pose data must)."""
    with LabelledFolderWriter(path, list(CATEGORIES)) as w:
        index = 0
        while n:
            scene = render_scene("train", seed, index)
            index += 1
            if any(i.keypoints is not None for i in scene.instances):
                w.add(scene)
                n -= 1
    return path


def test_real_scenes_labelled_by_a_pose_decoder(tmp_path, tiny_clip_path):
    train, scenes = _folder(tmp_path / "train", 0, 3), _folder(tmp_path / "scenes", 1, 4)
    ckpt = tmp_path / "pose"
    train_decoder(train, ckpt, TrainOptions(task="pose", iterations=2, views=1, batch_size=2, dim=16, num_queries=4,
                                            n_images=3), str(tiny_clip_path), show_progress=False)
    # every instance kept (an untrained decoder's scores are low), so there is something to compare
    out = _bench().label_real_scenes(ckpt, scenes, tmp_path / "labels", min_instance_score=0.0)
    labels, truth = read_labelled_folder(out), read_labelled_folder(scenes)
    assert [s.id for s in labels] == [s.id for s in truth]
    assert [s.caption for s in labels] == [s.caption for s in truth]
    assert [s.image.tolist() for s in labels] == [s.image.tolist() for s in truth]
    # the decoder's own predictions: people, with joints
    _, batches = decoder_predictions(ckpt, scenes)
    kept = [p["instances"] for _, preds in batches for p in preds]
    assert [len(s.instances) for s in labels] == [len(k) for k in kept] and sum(map(len, kept)) > 0
    for sample, insts in zip(labels, kept):
        for got, want in zip(sample.instances, insts):
            assert got.category_id == want.category_id == 1 and (got.mask == want.mask).all()
            assert got.keypoints.shape == (17, 3)
    stamp = (out / "annotations.json").stat().st_mtime_ns
    assert _bench().label_real_scenes(ckpt, scenes, out, min_instance_score=0.0) == out  # a rerun reuses it
    assert (out / "annotations.json").stat().st_mtime_ns == stamp
