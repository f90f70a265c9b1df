"""The P-Decoder labeler (DatasetDM, paper §3.5): trained decoders label each generated image from
the hypercolumns captured while generating it. An annotator has the generation loop's signature
``annotate(images, hypercolumns, prompts) -> list[LabelledSample]``."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from datasetdm.errors import DatasetdmError
from datasetdm.formats.sample import Category, LabelledSample
from datasetdm.prompts.base import Prompt


# Mask2Former keeps every query above 0.05 so that AP can rank them; a dataset wants the
# confident ones: at 0.05 the demo's export held 19 instances per image where scenes hold at
# most 6 (issue 18). 0.5 keeps a query the decoder scores at even odds or better.
DEFAULT_MIN_INSTANCE_SCORE = 0.5


def labels_from_predictions(predictions: Sequence[Mapping], images: np.ndarray,
                            min_instance_score: float = 0.0) -> list[LabelledSample]:
    """A decoder's ``predict`` dicts (``semantic``, ``instances``, ``depth``, optional
    ``confidence``) as LabelledSamples, the annotator output format; instances scoring below
    ``min_instance_score`` are dropped."""
    labels = []
    for image, pred in zip(images, predictions):
        meta = {"confidence": float(pred["confidence"])} if pred.get("confidence") is not None else {}
        instances = pred.get("instances")
        if instances is not None:
            instances = [i for i in instances if i.score is None or i.score >= min_instance_score]
        labels.append(
            LabelledSample(
                id="",
                image=image,
                semantic=None if pred.get("semantic") is None else np.asarray(pred["semantic"], dtype=np.uint8),
                instances=instances,
                depth=None if pred.get("depth") is None else np.asarray(pred["depth"], dtype=np.float32),
                meta=meta,
            )
        )
    return labels


def decoder_annotator(decoder, tokenizer, min_pixel_confidence: float | None = None,
                      min_instance_score: float = DEFAULT_MIN_INSTANCE_SCORE):
    """Annotator from a P-Decoder: it reads the hypercolumns captured while generating.

    ``tokenizer`` is the backbone's: the decoder's per-class attention maps are found by the
    class names' tokens inside each prompt. ``min_pixel_confidence`` (semantic decoders): pixels
    whose winning class holds a smaller share of the scores are labelled ignore (255).
    Instance and pose decoders keep the instances scoring at least ``min_instance_score``.
    """
    from datasetdm.decoder.predictor import Predictor

    predictor = Predictor(decoders={"decoder": decoder}, tokenizer=tokenizer)
    label = predictor_annotator(predictor, "decoder", min_pixel_confidence, min_instance_score)

    def annotate(images: np.ndarray, hypercolumns, prompts: list[Prompt]) -> list[LabelledSample]:
        try:
            return label(images, hypercolumns, prompts)
        finally:
            predictor.reset()  # nothing else reads this batch: hold none of it until the next

    return annotate


def predictor_annotator(predictor, name: str, min_pixel_confidence: float | None = None,
                        min_instance_score: float = DEFAULT_MIN_INSTANCE_SCORE):
    """Annotator for the decoder ``name`` of a ``decoder.predictor.Predictor``; the annotators of
    one predictor share each batch's decoder inputs (see ``decoder_annotator`` for the options)."""

    def annotate(images: np.ndarray, hypercolumns, prompts: list[Prompt]) -> list[LabelledSample]:
        predictor.set_hypercolumns(hypercolumns, images)
        predictions = predictor.predict(name, min_pixel_confidence=min_pixel_confidence)
        return labels_from_predictions(predictions, images, min_instance_score)

    return annotate


def load_decoder_checkpoint(path: Path):
    from datasetdm.decoder import load_decoder

    if not Path(path).exists():
        raise DatasetdmError(f"{path}: decoder checkpoint not found")
    return load_decoder(path)


def file_digest(path: Path) -> str:
    """A file's or folder's content hash: a run records its decoders by content, not by path."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        digest.update(p.read_bytes())
    return digest.hexdigest()[:16]


def decoder_categories(decoders) -> list[Category]:
    """The union of the categories of ``decoders`` ([(path, decoder)]), by id; one id must mean
    one name in all of them."""
    from datasetdm.formats.coco import category_from_coco

    by_id: dict[int, Category] = {}
    for path, dec in decoders:
        for entry in dec.cfg.categories:
            cat = category_from_coco(entry)
            if cat.id in by_id and by_id[cat.id].name != cat.name:
                raise DatasetdmError(f"{path}: category id {cat.id} is {cat.name!r} here but "
                                     f"{by_id[cat.id].name!r} in another decoder")
            by_id.setdefault(cat.id, cat)
    return [by_id[i] for i in sorted(by_id)]
