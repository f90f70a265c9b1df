import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from datasetdm.backbone.hypercolumns import Hypercolumns
from datasetdm.errors import DatasetdmError
from datasetdm.formats.sample import Category, Instance, LabelledSample
from datasetdm.formats.shards import MANIFEST_FILE, read_manifest, read_shards
from datasetdm.generation import Filters, generate_dataset, quality_scores
from datasetdm.prompts import Prompt, TemplatePrompts
from faults_support import kill_when

CATS = [Category(1, "dog"), Category(2, "cat"), Category(3, "bus")]
IDS = {c.name: c.id for c in CATS}
SIZE = 16


class FakeBackbone:
    """Images and 'hypercolumns' that depend only on each sample's seed, like a real backbone."""

    def __init__(self, fail_at_call=None, delay=0.0):
        self.calls = 0
        self.fail_at_call = fail_at_call
        self.delay = delay

    def __call__(self, prompts, seeds):
        self.calls += 1
        if self.fail_at_call is not None and self.calls == self.fail_at_call:
            raise RuntimeError("simulated crash")
        time.sleep(self.delay)
        images, feats = [], []
        for p, s in zip(prompts, seeds):
            rng = np.random.default_rng(s)
            blob = np.zeros((SIZE, SIZE), np.float32)
            r = rng.integers(0, 7)  # object size; 0 means the image shows nothing
            y, x = rng.integers(0, SIZE - 6, 2)
            blob[y : y + r, x : x + r] = 1
            images.append((rng.integers(0, 100, (SIZE, SIZE, 3)) + blob[..., None] * 150).astype(np.uint8))
            feats.append(blob)
        features = torch.from_numpy(np.stack(feats))[:, None]
        hc = Hypercolumns(features=[features], cross_attention=[features], prompts=list(prompts))
        return np.stack(images), hc


def seg_annotator(images, hc, prompts):
    """Segments the blob from the captured features as the prompt's first class."""
    out = []
    for b, p in enumerate(prompts):
        blob = hc.features[0][b, 0].numpy() > 0.5
        sem = (blob * IDS[p.classes[0]]).astype(np.uint8)
        sem[0, 0] = 255
        inst = [Instance(IDS[p.classes[0]], blob, score=0.6 + 0.05 * (blob.sum() % 2))] if blob.any() else []
        out.append(LabelledSample(id="", image=images[b], semantic=sem, instances=inst))
    return out


def depth_annotator(images, hc, prompts):
    return [LabelledSample(id="", image=im, depth=1.0 + hc.features[0][b, 0].numpy() * 2, meta={"confidence": 0.9}) for b, im in enumerate(images)]


def attn_annotator(images, hc, prompts):
    # a second semantic labeler (as the training-free one will be): stored as an extra
    return [LabelledSample(id="", image=im, semantic=(hc.cross_attention[0][b, 0].numpy() > 0.5).astype(np.uint8) * IDS[p.classes[0]]) for b, (im, p) in enumerate(zip(images, prompts))]


ANNOTATORS = {"seg": seg_annotator, "depth": depth_annotator, "attn": attn_annotator}


def run(out, n=23, batch_size=4, backbone=None, resume=False, filters=Filters(min_area=0.01)):
    return generate_dataset(
        out,
        backbone or FakeBackbone(),
        ANNOTATORS,
        TemplatePrompts([c.name for c in CATS], seed=5),
        CATS,
        n=n,
        seed=11,
        batch_size=batch_size,
        samples_per_shard=5,
        filters=filters,
        backbone="fake",
        resume=resume,
        progress=False,
    )


def tree_bytes(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(Path(out).rglob("*")) if p.is_file() and p.name != MANIFEST_FILE}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    summary = run(out)
    return out, summary


def test_generation_writes_annotated_filtered_shards(reference):
    out, summary = reference
    assert summary.n == 23 and summary.generated == 23
    rows = read_manifest(out).to_pylist()
    assert [r["id"] for r in rows] == list(range(23))
    assert summary.kept + summary.dropped == 23
    assert summary.dropped > 0 and summary.kept > 0  # the fake backbone draws some empty images
    dropped = [r for r in rows if not r["kept"]]
    assert all(re.fullmatch(r"area 0\.00\d < 0\.01", r["dropped_reason"]) for r in dropped)
    assert summary.drop_reasons == {"area": summary.dropped}
    prompts = TemplatePrompts([c.name for c in CATS], seed=5)
    assert [r["prompt"] for r in rows] == [prompts.prompt(i).text for i in range(23)]
    assert len({r["seed"] for r in rows}) == 23

    samples = list(read_shards(out, with_extras=True))
    assert [s.meta["id"] for s, _ in samples] == [r["id"] for r in rows if r["kept"]]
    for s, extras in samples:
        row = rows[s.meta["id"]]
        blob = s.semantic > 0
        blob[0, 0] = False
        np.testing.assert_array_equal(s.semantic[blob], IDS[row["classes"][0]])
        assert s.semantic[0, 0] == 255
        np.testing.assert_allclose(s.depth[blob], 3.0)
        np.testing.assert_allclose(s.depth[~blob & (np.arange(SIZE) > 0)[None, :]], 1.0)
        assert s.meta["annotators"] == {"semantic": "seg", "instances": "seg", "depth": "depth"}
        np.testing.assert_array_equal(extras["attn"].semantic > 0, blob)
        assert s.meta["scores"]["agreement"] == 1 / len(row["classes"])  # only the first class is drawn
        assert row["score_confidence"] == pytest.approx(np.mean([0.6 + 0.05 * (blob.sum() % 2), 0.9]))
        assert row["score_area"] == pytest.approx(blob.mean())


def test_output_does_not_depend_on_batch_size(reference, tmp_path):
    out, _ = reference
    for batch_size in (1, 7):
        other = tmp_path / f"b{batch_size}"
        run(other, batch_size=batch_size)
        assert tree_bytes(other) == tree_bytes(out)
        assert read_manifest(other).equals(read_manifest(out))


def test_resume_after_an_exception_mid_run(reference, tmp_path):
    out, _ = reference
    with pytest.raises(RuntimeError, match="simulated crash"):
        # batches of 4 cut at shard ends: 0-3, 4, 5-8, 9, 10-13: the 5th call fails inside shard 2
        run(tmp_path, backbone=FakeBackbone(fail_at_call=5))
    assert read_manifest(tmp_path).num_rows == 10
    assert not list((tmp_path / "shards").glob(".*"))  # the open shard's temporary was removed
    with pytest.raises(DatasetdmError, match="pass --resume"):
        run(tmp_path)
    summary = run(tmp_path, resume=True)
    assert summary.generated == 13
    assert tree_bytes(tmp_path) == tree_bytes(out)
    assert read_manifest(tmp_path).equals(read_manifest(out))
    # a finished run resumed again does nothing
    assert run(tmp_path, resume=True).generated == 0
    with pytest.raises(DatasetdmError, match="different settings: filters"):
        run(tmp_path, resume=True, filters=Filters(min_area=0.5))


_CHILD = """
import sys
sys.path.insert(0, {tests!r})
import test_generation as t
t.run({out!r}, backbone=t.FakeBackbone(delay=0.15), batch_size=2)
"""


def test_resume_after_sigkill(reference, tmp_path):
    out, _ = reference
    target = tmp_path / "killed"
    code = _CHILD.format(tests=str(Path(__file__).parent), out=str(target))
    # kill once a shard is complete and the next one is being written
    kill_when([sys.executable, "-c", code],
              lambda: (target / MANIFEST_FILE).exists() and bool(list((target / "shards").glob(".*.tmp"))))
    done = read_manifest(target).num_rows
    assert 0 < done < 23
    summary = run(target, resume=True)
    assert summary.generated == 23 - done
    assert tree_bytes(target) == tree_bytes(out)
    assert read_manifest(target).equals(read_manifest(out))


def test_quality_scores_and_filters():
    sem = np.zeros((10, 10), np.uint8)
    sem[:2] = 1  # dog: 20%
    sem[9, 9] = 255
    sample = LabelledSample(id="0", image=np.zeros((10, 10, 3), np.uint8), semantic=sem)
    scores = quality_scores(sample, Prompt("a dog and a cat", ("dog", "cat")), CATS, [0.2, 0.4])
    assert scores == pytest.approx({"confidence": 0.3, "area": 0.2, "ignore": 0.01, "agreement": 0.5})
    assert Filters(min_agreement=0.6).reason(scores) == "agreement 0.500 < 0.6"
    assert Filters(max_ignore=0.005).reason(scores) == "ignore 0.010 > 0.005"
    assert Filters(min_confidence=0.3, min_area=0.2).reason(scores) is None
    # a sample without labels of a kind is never dropped for it
    depth_only = LabelledSample(id="0", image=sample.image, depth=np.ones((10, 10), np.float32))
    assert quality_scores(depth_only, Prompt("a dog", ("dog",)), CATS) == {"confidence": None, "area": None, "ignore": None, "agreement": None}
    assert Filters(min_area=0.5, min_agreement=1).reason({"area": None, "agreement": None}) is None


def test_bad_annotator_outputs(tmp_path):
    def wrong_ids(images, hc, prompts):
        return [LabelledSample(id="", image=im, semantic=np.full(im.shape[:2], 9, np.uint8)) for im in images]

    with pytest.raises(DatasetdmError, match=r"annotator 'bad': semantic mask has category ids \[9\]"):
        generate_dataset(tmp_path / "a", FakeBackbone(), {"bad": wrong_ids}, TemplatePrompts(["dog"]), CATS, n=2, progress=False)

    def too_few(images, hc, prompts):
        return []

    with pytest.raises(DatasetdmError, match="annotator 'few': returned 0 outputs for 2 images"):
        generate_dataset(tmp_path / "b", FakeBackbone(), {"few": too_few}, TemplatePrompts(["dog"]), CATS, n=2, progress=False)
    with pytest.raises(DatasetdmError, match="at least one annotator"):
        generate_dataset(tmp_path / "c", FakeBackbone(), {}, TemplatePrompts(["dog"]), CATS, n=2, progress=False)


def test_real_backbone_and_decoders_plug_in(tiny_clip, tmp_path):
    """The tiny random backbone's generate + two random-weight P-Decoders through the loop."""
    from datasetdm.backbone.capture import generate
    from datasetdm.decoder import DecoderConfig, build_decoder
    from datasetdm.labelers.decoder import decoder_annotator

    def generate_fn(prompts, seeds):
        return generate(tiny_clip, prompts, seeds, num_inference_steps=2, guidance_scale=1.0)

    images, hc = generate_fn(["a photo of a dog"], [0])
    cats = [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}]
    annotators, decoders = {}, {}
    for task in ("semantic", "depth"):
        cfg = DecoderConfig(
            task=task, categories=cats, feature_channels=[f.shape[1] for f in hc.features],
            feature_sizes=[list(f.shape[-2:]) for f in hc.features], image_size=list(images.shape[1:3]),
            dim=16, num_queries=4, layers=2, heads=2, ffn_dim=32,
        )
        torch.manual_seed(0)
        decoders[task] = build_decoder(cfg).eval()
        annotators[task] = decoder_annotator(decoders[task], tiny_clip.tokenizer)
    summary = generate_dataset(
        tmp_path, generate_fn, annotators, TemplatePrompts(["dog", "cat"]), [Category(1, "dog"), Category(2, "cat")],
        n=3, batch_size=2, samples_per_shard=2, progress=False,
    )
    assert summary.kept == 3
    samples = list(read_shards(tmp_path))
    assert len(samples) == 3
    for s in samples:
        assert s.image.shape == images.shape[1:]
        assert s.semantic.shape == images.shape[1:3] and set(np.unique(s.semantic)) <= {0, 1, 2}
        assert s.depth.shape == images.shape[1:3] and (s.depth > 0).all()
        assert s.meta["annotators"] == {"semantic": "semantic", "depth": "depth"}
    # the semantic decoder's confidence reaches the manifest (the --min-confidence filter reads it)
    confidences = read_manifest(tmp_path).column("score_confidence").to_pylist()
    assert all(1 / 3 <= c <= 1 for c in confidences)
    # --min-pixel-confidence reaches the decoder: a share below 1 everywhere leaves only ignore
    strict = decoder_annotator(decoders["semantic"], tiny_clip.tokenizer, min_pixel_confidence=1.0)
    (label,) = strict(images, hc, [None])
    assert (label.semantic == 255).all()


def test_pose_keypoints_merge_onto_instances():
    """An instance decoder first, a pose decoder second: the dataset's people carry keypoints."""
    from datasetdm.formats.sample import Instance
    from datasetdm.generation.loop import merge_labels

    def box(x0, x1):
        m = np.zeros((8, 8), bool)
        m[1:7, x0:x1] = True
        return m

    kps = np.ones((17, 3), np.float32)
    image = np.zeros((8, 8, 3), np.uint8)
    instance_out = LabelledSample(id="", image=image, instances=[
        Instance(1, box(0, 3), score=0.9), Instance(2, box(4, 8), score=0.8)])
    pose_out = LabelledSample(id="", image=image, instances=[
        Instance(1, box(0, 2), keypoints=kps, score=0.7),  # IoU 2/3 with the first person
        Instance(1, box(5, 8), keypoints=2 * kps, score=0.6)])  # a person no instance matches (id 2 is a dog)
    sample, extras, source = merge_labels(image, {"instance": instance_out, "pose": pose_out})
    assert source["instances"] == "instance"
    assert len(sample.instances) == 3
    assert np.array_equal(sample.instances[0].keypoints, kps) and np.array_equal(sample.instances[0].mask, box(0, 3))
    assert sample.instances[1].keypoints is None
    assert np.array_equal(sample.instances[2].keypoints, 2 * kps)
    assert extras["pose"].instances is pose_out.instances  # the pose output itself stays comparable
    assert instance_out.instances[0].keypoints is None  # the annotator's output is not mutated


def test_instances_below_the_score_threshold_are_dropped():
    from datasetdm.formats.sample import Instance
    from datasetdm.labelers.decoder import labels_from_predictions

    m = np.ones((4, 4), bool)
    preds = [{"instances": [Instance(1, m, score=0.9), Instance(1, m, score=0.3), Instance(2, m, score=0.5)]}]
    (label,) = labels_from_predictions(preds, np.zeros((1, 4, 4, 3), np.uint8), min_instance_score=0.5)
    assert [i.score for i in label.instances] == [0.9, 0.5]
    (label,) = labels_from_predictions(preds, np.zeros((1, 4, 4, 3), np.uint8))
    assert len(label.instances) == 3
