"""The P-Decoder labeler (DatasetDM, paper §3.5): trained decoders label each generated image from
the hypercolumns captured while generating it. An annotator has the generation loop's signature
``annotate(images, hypercolumns, prompts) -> list[LabelledSample]``."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from datasetdm.formats.sample import LabelledSample
from datasetdm.prompts.base import Prompt


def labels_from_predictions(predictions: Sequence[Mapping], images: np.ndarray) -> list[LabelledSample]:
    """A decoder's ``predict`` dicts (``semantic``, ``instances``, ``depth``, optional
    ``confidence``) as LabelledSamples, the annotator output format."""
    labels = []
    for image, pred in zip(images, predictions):
        meta = {"confidence": float(pred["confidence"])} if pred.get("confidence") is not None else {}
        labels.append(
            LabelledSample(
                id="",
                image=image,
                semantic=None if pred.get("semantic") is None else np.asarray(pred["semantic"], dtype=np.uint8),
                instances=pred.get("instances"),
                depth=None if pred.get("depth") is None else np.asarray(pred["depth"], dtype=np.float32),
                meta=meta,
            )
        )
    return labels


def decoder_annotator(decoder, tokenizer, min_pixel_confidence: float | None = None):
    """Annotator from a P-Decoder: it reads the hypercolumns captured while generating.

    ``tokenizer`` is the backbone's: the decoder's per-class attention maps are found by the
    class names' tokens inside each prompt. ``min_pixel_confidence`` (semantic decoders): pixels
    whose winning class holds a smaller share of the scores are labelled ignore (255).
    """
    from datasetdm.decoder.inputs import hypercolumn_input, image_tensor

    names = [c["name"] for c in decoder.cfg.categories]
    class_tokens = [list(tokenizer(name, add_special_tokens=False).input_ids) for name in names]

    def annotate(images: np.ndarray, hypercolumns, prompts: list[Prompt]) -> list[LabelledSample]:
        inp = hypercolumn_input(hypercolumns, class_tokens, image_tensor(images), images.shape[1:3])
        return labels_from_predictions(decoder.predict(inp, min_pixel_confidence=min_pixel_confidence), images)

    return annotate
