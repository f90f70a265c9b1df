"""One test over every labeler of the registry (timm-style), plus its argument checks."""

import numpy as np
import pytest

from datasetdm.errors import DatasetdmError
from datasetdm.formats.sample import Category
from datasetdm.labelers.registry import LABELERS, check_labeler_args, create_labeler

CATS = [Category(1, "dog"), Category(2, "cat")]


@pytest.mark.parametrize("name", LABELERS)
def test_every_labeler_labels_generated_images(name, tiny_clip, semantic_checkpoint):
    labeling = create_labeler(name, tiny_clip, steps=2, guidance=2.0,
                              decoders=[semantic_checkpoint] if name == "decoder" else (),
                              categories=CATS if name == "attention" else ())
    assert [c.name for c in labeling.categories] == ["dog", "cat"]
    assert labeling.config["steps"] == 2 and labeling.config["guidance"] == 2.0
    prompts = ["a dog and a cat in a garden", "a photo of a cat"]
    images, hc = labeling.generate_fn(prompts, [3, 4])
    assert images.shape[0] == 2 and images.dtype == np.uint8
    for annotate in labeling.annotators.values():
        labels = annotate(images, hc, prompts)
        assert len(labels) == 2
        for image, label in zip(images, labels):
            assert label.semantic.shape == image.shape[:2]
            assert set(np.unique(label.semantic)) <= {0, 1, 2, 255}
            assert 0.0 <= label.meta["confidence"] <= 1.0
        labeling.release()  # the batch is dropped; an annotator makes it again from what it is given
        assert all(np.array_equal(a.semantic, b.semantic) for a, b in zip(labels, annotate(images, hc, prompts)))


def test_labeler_argument_errors(tmp_path):
    cases = [
        (("pixels",), {}, "choose one of decoder, attention"),
        (("decoder",), {}, "needs at least one --decoder"),
        (("attention",), {"decoders": [tmp_path]}, "drop --decoder"),
        (("attention",), {"categories": CATS, "min_pixel_confidence": 0.5}, "--min-pixel-confidence is for decoder"),
        (("attention",), {}, "needs --classes"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(DatasetdmError, match=message):
            check_labeler_args(*args, **kwargs)
    with pytest.raises(DatasetdmError, match="decoder checkpoint not found"):
        create_labeler("decoder", None, steps=1, guidance=1.0, decoders=[tmp_path / "missing"])
