"""decoder.predictor.Predictor: one UNet pass, every decoder answered from it. Its outputs must be
the previous call sites' to the bit: each test writes the chain out by hand, as training's feature
source, evaluate and the decoder labeler built it before the predictor, and compares."""

import numpy as np
import pytest
import torch

from datasetdm.backbone.capture import capture_real, generate
from datasetdm.backbone.tokens import name_token_ids
from datasetdm.decoder import DecoderConfig, build_decoder
from datasetdm.decoder.inputs import DecoderInput, class_attention_maps, hypercolumn_input, image_tensor, raw_pixel_input
from datasetdm.decoder.predictor import Predictor
from datasetdm.errors import DatasetdmError

PROMPTS = ["a photo of a dog", "a cat and a bus", "a dog on a bus"]
CATS = [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}, {"id": 3, "name": "bus"}]
TASKS = ("semantic", "depth", "instance")


@pytest.fixture(scope="module")
def generated(tiny_clip):
    return generate(tiny_clip, PROMPTS, [0, 1, 2], num_inference_steps=2, guidance_scale=2.0)


def _decoder(task, features, image_size, fingerprint="tiny"):
    cfg = DecoderConfig(task=task, categories=CATS, feature_channels=[int(f.shape[1]) for f in features],
                        feature_sizes=[list(f.shape[-2:]) for f in features], image_size=list(image_size), dim=16,
                        num_queries=4, layers=2, heads=2, ffn_dim=32, backbone={"fingerprint": fingerprint})
    torch.manual_seed(0)
    return build_decoder(cfg).eval()


@pytest.fixture(scope="module")
def decoders(generated):
    images, hc = generated
    return {task: _decoder(task, hc.features, images.shape[1:3]) for task in TASKS}


def _same_input(a: DecoderInput, b: DecoderInput):
    assert a.image_size == b.image_size and torch.equal(a.image, b.image)
    for x, y in zip(a.features + a.class_attention, b.features + b.class_attention, strict=True):
        assert x.dtype == y.dtype and x.device == y.device and torch.equal(x, y)


def _same_predictions(a: list[dict], b: list[dict]):
    assert len(a) == len(b)
    for p, q in zip(a, b):
        assert p.keys() == q.keys()
        for k in p:
            if k == "instances":
                assert len(p[k]) == len(q[k])
                for i, j in zip(p[k], q[k]):
                    assert (i.category_id, i.score) == (j.category_id, j.score) and np.array_equal(i.mask, j.mask)
            elif isinstance(p[k], np.ndarray):
                assert p[k].dtype == q[k].dtype and np.array_equal(p[k], q[k])
            else:
                assert p[k] == q[k]


def _cache_input(bb, images, prompts, seeds, t=1):
    """training.features.FeatureSource.extract before the predictor (what evaluate read too)."""
    img = image_tensor(images)
    H, W = img.shape[-2:]
    hc = capture_real(bb, list(img), prompts, t=t, seeds=seeds, size=(H, W))
    att = class_attention_maps(hc, name_token_ids(bb.tokenizer, [c["name"] for c in CATS]))
    return DecoderInput([f.float().cpu().half() for f in hc.features], [a.float().cpu().half() for a in att], img, (H, W))


def test_real_images_match_the_cache_and_evaluate_path(tiny_clip, generated, decoders):
    images, _ = generated
    old = _cache_input(tiny_clip, images, PROMPTS, [5, 6, 7], t=3)
    predictor = Predictor(tiny_clip, decoders, store_dtype=torch.float16)
    hc = predictor.set_images(images, PROMPTS, [5, 6, 7], timestep=3)
    assert hc.timestep == 3 and hc.batch_size == 3
    _same_input(predictor.inputs([c["name"] for c in CATS]), old)
    every = predictor.predict_all()
    assert list(every) == list(TASKS)
    for task, dec in decoders.items():
        _same_predictions(every[task], dec.predict(old))

    # the training feature source is the same predictor step: the cache's bytes do not change
    from datasetdm.training.features import FeatureSource

    _same_input(FeatureSource("hypercolumns", CATS, tiny_clip).extract(list(images), PROMPTS, [5, 6, 7], timestep=3), old)


def test_generated_hypercolumns_match_the_decoder_labeler(tiny_clip, generated, decoders):
    from datasetdm.labelers.decoder import decoder_annotator, labels_from_predictions

    images, hc = generated
    tokens = name_token_ids(tiny_clip.tokenizer, [c["name"] for c in CATS])
    old_inp = hypercolumn_input(hc, tokens, image_tensor(images), images.shape[1:3])  # the labeler before
    predictor = Predictor(tokenizer=tiny_clip.tokenizer, decoders=decoders)
    predictor.set_hypercolumns(hc, images)
    inp = predictor.inputs([c["name"] for c in CATS])
    _same_input(inp, old_inp)
    predictor.set_hypercolumns(hc, images)  # a second annotator of the same batch: the inputs are reused
    assert predictor.inputs([c["name"] for c in CATS]) is inp
    for task, dec in decoders.items():
        old = dec.predict(old_inp, min_pixel_confidence=0.3)
        _same_predictions(predictor.predict(task, min_pixel_confidence=0.3), old)
        labels = decoder_annotator(dec, tiny_clip.tokenizer, 0.3, 0.1)(images, hc, PROMPTS)
        for a, b in zip(labels, labels_from_predictions(old, images, 0.1)):
            for k in ("semantic", "depth"):
                assert (getattr(a, k) is None) == (getattr(b, k) is None)
                assert getattr(a, k) is None or np.array_equal(getattr(a, k), getattr(b, k))
            assert [(i.category_id, i.score) for i in a.instances or []] == [(i.category_id, i.score) for i in b.instances or []]
            assert a.meta == b.meta
        _same_predictions(dec.predict_hypercolumns(hc, images, tiny_clip.tokenizer), dec.predict(old_inp))


def test_predictor_generate_and_the_registry_labeler(tiny_clip, generated, decoders, tmp_path):
    """The decoder labeler of ``generate``: its annotators share one predictor; labels equal the
    hand-built chain's, and generation itself is unchanged."""
    from datasetdm.decoder.checkpoint import save_decoder
    from datasetdm.labelers.decoder import labels_from_predictions
    from datasetdm.labelers.registry import create_labeler

    shape_images, shape_hc = generated
    paths = []
    for task in ("semantic", "depth", "semantic"):
        dec = _decoder(task, shape_hc.features, shape_images.shape[1:3], tiny_clip.fingerprint)
        paths.append(tmp_path / f"{task}{len(paths)}")
        save_decoder(dec, paths[-1])
    labeling = create_labeler("decoder", tiny_clip, steps=2, guidance=2.0, decoders=paths)
    assert list(labeling.annotators) == ["semantic", "depth", "semantic2"]
    images, hc = labeling.generate_fn(PROMPTS, [3, 4, 5])
    ref_images, ref_hc = generate(tiny_clip, PROMPTS, [3, 4, 5], num_inference_steps=2, guidance_scale=2.0)
    assert np.array_equal(images, ref_images)
    tokens = name_token_ids(tiny_clip.tokenizer, [c["name"] for c in CATS])
    old_inp = hypercolumn_input(ref_hc, tokens, image_tensor(ref_images), ref_images.shape[1:3])
    from datasetdm.decoder import load_decoder

    for path, (name, annotate) in zip(paths, labeling.annotators.items()):
        labels = annotate(images, hc, PROMPTS)
        old = labels_from_predictions(load_decoder(path).predict(old_inp), ref_images, 0.5)
        for a, b in zip(labels, old):
            for k in ("semantic", "depth"):
                assert getattr(a, k) is None or np.array_equal(getattr(a, k), getattr(b, k)), name
            assert a.meta == b.meta

    predictor = Predictor(tiny_clip, {"semantic": decoders["semantic"]})
    images2, hc2 = predictor.generate(PROMPTS, [3, 4, 5], num_inference_steps=2, guidance_scale=2.0)
    assert np.array_equal(images2, ref_images) and predictor.hypercolumns is hc2
    _same_predictions(predictor.predict("semantic"), decoders["semantic"].predict(old_inp))


def test_raw_pixels_without_a_backbone(generated):
    images, _ = generated
    raw = raw_pixel_input(image_tensor(images), len(CATS))
    dec = _decoder("semantic", raw.features, images.shape[1:3])
    dec.cfg.features = "raw-pixels"
    predictor = Predictor(None, {"semantic": dec}, store_dtype=torch.float16)
    assert predictor.set_images(images, PROMPTS) is None
    _same_input(predictor.inputs([c["name"] for c in CATS]), raw)  # raw pixels are never rounded to fp16
    _same_predictions(predictor.predict("semantic"), dec.predict(raw))


def test_predictor_errors(tiny_clip, decoders):
    predictor = Predictor(tiny_clip, decoders)
    with pytest.raises(DatasetdmError, match="no images yet"):
        predictor.predict("semantic")
    with pytest.raises(DatasetdmError, match="no decoder 'pose'"):
        predictor.predict("pose")
    with pytest.raises(DatasetdmError, match="needs a backbone"):
        Predictor().generate(PROMPTS, [0, 1, 2])
