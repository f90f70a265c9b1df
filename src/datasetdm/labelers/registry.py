"""One factory for every labeler (timm-style): ``create_labeler("decoder" | "attention", ...)``
gives what the generation loop needs — the categories, the annotators, the function that
generates (and captures what the annotators read), and the record of settings a resumed run
must match."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from datasetdm.errors import DatasetdmError
from datasetdm.formats.sample import Category

LABELERS = ("decoder", "attention")


@dataclass
class Labeling:
    categories: list[Category]
    annotators: dict[str, Callable]  # name -> annotate(images, hypercolumns, prompts)
    generate_fn: Callable  # (prompts, seeds) -> (images, hypercolumns)
    config: dict = field(default_factory=dict)  # goes into run.json; a resume must match it
    read_prompt: Callable | None = None  # text -> PromptFit: what the model reads of the prompt it is given
    # drops what the annotators keep of the current batch (the decoder predictor's hypercolumns
    # and inputs, otherwise held until the next generate_fn); for a caller that measures memory
    # between batches, as bench/generation.py does
    release: Callable[[], None] = lambda: None


def create_labeler(name: str, backbone, *, steps: int, guidance: float, decoders: Sequence[Path] = (),
                   categories: Sequence[Category] = (), attention=None,
                   min_pixel_confidence: float | None = None, min_instance_score: float | None = None,
                   capture_step: int = -1) -> Labeling:
    """``decoder``: the P-Decoder checkpoints ``decoders`` each label every image (DatasetDM);
    ``attention``: the model's own attention labels ``categories`` (Dataset Diffusion), with
    ``attention`` an ``AttentionLabelerConfig`` or None for its defaults. ``capture_step``: the
    denoising step whose features the decoders read (``backbone.capture.generate``; default the
    last, as DatasetDM does)."""
    check_labeler_args(name, decoders, categories, min_pixel_confidence)
    if not -steps <= capture_step < steps:
        raise DatasetdmError(f"--capture-step {capture_step}: out of range for {steps} denoising steps")
    config: dict = {"steps": steps, "guidance": guidance}
    if name == "decoder":
        if capture_step != -1:  # only when set, so runs made before the option still resume
            config["capture_step"] = capture_step
        return _decoder_labeling(backbone, decoders, config, min_pixel_confidence, min_instance_score)
    if capture_step != -1:
        raise DatasetdmError("--capture-step is for decoder labels; the attention labeler reads the last step")
    from dataclasses import asdict

    from datasetdm.labelers.attention import AttentionLabeler, AttentionLabelerConfig

    settings = attention or AttentionLabelerConfig()
    labeler = AttentionLabeler(backbone, list(categories), settings)
    config.update(decoders=[], attention_labeler={k: v for k, v in asdict(settings).items()
                                                  if k in ("tau", "label_threshold", "ignore_threshold")})
    return Labeling(list(labeler.categories), {"attention": labeler.annotator},
                    labeler.generate_fn(num_inference_steps=steps, guidance_scale=guidance), config,
                    read_prompt=labeler.read_prompt)


def check_labeler_args(name: str, decoders: Sequence[Path] = (), categories: Sequence[Category] = (),
                       min_pixel_confidence: float | None = None) -> None:
    """The argument checks of ``create_labeler``, cheap enough to run before a backbone loads."""
    if name not in LABELERS:
        raise DatasetdmError(f"--labeler {name!r}: choose one of {', '.join(LABELERS)}")
    if name == "decoder":
        if not decoders:
            raise DatasetdmError("--labeler decoder needs at least one --decoder checkpoint")
        return
    if decoders:
        raise DatasetdmError("--labeler attention labels without decoders; drop --decoder")
    if min_pixel_confidence is not None:
        raise DatasetdmError("--min-pixel-confidence is for decoder labels; the attention labeler has "
                             "--label-threshold and --ignore-threshold")
    if not categories:
        raise DatasetdmError("--labeler attention needs --classes (the class names to label, in id order)")


def _decoder_labeling(backbone, decoders, config: dict, min_pixel_confidence, min_instance_score) -> Labeling:
    from datasetdm.backbone.capture import generate
    from datasetdm.decoder.predictor import Predictor
    from datasetdm.labelers.decoder import (
        DEFAULT_MIN_INSTANCE_SCORE,
        decoder_categories,
        file_digest,
        load_decoder_checkpoint,
        predictor_annotator,
    )

    if min_instance_score is None:
        min_instance_score = DEFAULT_MIN_INSTANCE_SCORE

    loaded = [(Path(p), load_decoder_checkpoint(p)) for p in decoders]
    for _, dec in loaded:
        dec.check_backbone(backbone)  # a decoder reads the features of the backbone it was trained on
    annotators = {}
    predictor = Predictor(backbone)  # one for all decoders: each batch's inputs are made once per class list
    for _, dec in loaded:
        key = dec.cfg.task if dec.cfg.task not in annotators else f"{dec.cfg.task}{len(annotators)}"
        dec.precision = backbone.dtype  # the decoder in the backbone's precision (autocast, fp32 outputs)
        predictor.decoders[key] = dec.to(backbone.device)
        annotators[key] = predictor_annotator(predictor, key, min_pixel_confidence, min_instance_score)
    config["decoders"] = [file_digest(p) for p, _ in loaded]
    if any(dec.cfg.task in ("instance", "pose") for _, dec in loaded):
        config["min_instance_score"] = min_instance_score
    if min_pixel_confidence is not None:  # only when set, so runs made before the option still resume
        config["min_pixel_confidence"] = min_pixel_confidence
    steps, guidance, capture_step = config["steps"], config["guidance"], config.get("capture_step", -1)

    def generate_fn(texts, seeds):
        predictor.reset()  # the previous batch is freed before this one is made
        return generate(backbone, texts, seeds, num_inference_steps=steps, guidance_scale=guidance,
                        capture_step=capture_step)

    def read_prompt(text):
        from datasetdm.backbone.tokens import fit_prompt

        return fit_prompt(backbone.tokenizer, text, backbone.max_tokens)

    return Labeling(decoder_categories(loaded), annotators, generate_fn, config, read_prompt=read_prompt,
                    release=predictor.reset)
