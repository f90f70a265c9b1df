"""The thin predictor (in the spirit of segment-anything's ``SamPredictor``): one UNet pass per batch,
every decoder answered from its hypercolumns.

The chain backbone → hypercolumns → per-class attention maps → ``DecoderInput`` → decoder is built
here and nowhere else: ``train``'s feature cache (``training.features.FeatureSource``), ``evaluate``,
the decoder labeler of ``generate`` and ``PDecoder.predict_hypercolumns`` all go through it::

    predictor = Predictor(backbone, {"semantic": semantic, "depth": depth})
    predictor.set_images(images, prompts, seeds)   # real images: VAE encode, noise to t, one UNet pass
    images, _ = predictor.generate(prompts, seeds, num_inference_steps=25, guidance_scale=4.0)  # or generated
    predictor.predict("semantic"); predictor.predict_all()

Without a backbone the decoders read raw pixels (the paper's Table 6a baseline), or hypercolumns
captured elsewhere (``set_hypercolumns``, with a ``tokenizer``).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from datasetdm.backbone.hypercolumns import Hypercolumns
from datasetdm.backbone.tokens import name_token_ids
from datasetdm.decoder.inputs import DecoderInput, hypercolumn_input, image_tensor, raw_pixel_input
from datasetdm.errors import DatasetdmError


class Predictor:
    """``backbone`` (or None: raw pixels), ``decoders`` {name: PDecoder} (a name is usually the task).

    ``store_dtype``: hypercolumn inputs as the training feature cache stores them, on the CPU in this
    dtype (fp16), so that ``evaluate`` reads the numbers training read; None (generation) keeps the
    capture's device and dtype. Decoders keep their own device and ``precision``: set them before.
    """

    def __init__(self, backbone=None, decoders: Mapping | None = None, *, tokenizer=None,
                 store_dtype: torch.dtype | None = None):
        self.backbone = backbone
        self.decoders = dict(decoders or {})
        self.tokenizer = tokenizer if tokenizer is not None else getattr(backbone, "tokenizer", None)
        self.store_dtype = store_dtype
        self._class_tokens: dict[tuple[str, ...], list[list[int]]] = {}
        self.reset()

    def reset(self) -> None:
        """Drop the current batch (its hypercolumns and inputs are not kept past it)."""
        self.hypercolumns: Hypercolumns | None = None
        self.images: torch.Tensor | None = None  # (B, 3, H, W) float in [0, 1]
        self._given = None  # what set_hypercolumns was given: a second annotator of the batch reuses it
        self._inputs: dict[tuple[str, ...], DecoderInput] = {}

    # ------------------------------------------------------------------------- one UNet pass

    def set_images(self, images, prompts: Sequence[str], seeds: Sequence[int] | None = None,
                   timestep: int = 1) -> Hypercolumns | None:
        """Real images (uint8 (B, H, W, 3) or a list of (H, W, 3)) read with ``prompts``: their
        hypercolumns at their own size (``backbone.capture.capture_real``; paper §3.3: t = 1).
        Without a backbone only the pixels are kept."""
        self.reset()
        img = image_tensor(images)
        hc = None
        if self.backbone is not None:
            from datasetdm.backbone.capture import capture_real

            H, W = img.shape[-2:]
            hc = capture_real(self.backbone, list(img), prompts, t=timestep, seeds=seeds, size=(H, W))
        self.images, self.hypercolumns = img, hc
        return hc

    def generate(self, prompts, seeds: Sequence[int], **kw):
        """Text to images with the hypercolumns of the captured step (``backbone.capture.generate``,
        same arguments); returns (images, hypercolumns), the generation loop's ``generate_fn``."""
        from datasetdm.backbone.capture import generate

        if self.backbone is None:
            raise DatasetdmError("Predictor.generate needs a backbone")
        self.reset()  # the previous batch is freed before this one is made
        images, hc = generate(self.backbone, prompts, seeds, **kw)
        if hc is not None:
            self.set_hypercolumns(hc, images)
        return images, hc

    def set_hypercolumns(self, hypercolumns: Hypercolumns, images) -> None:
        """Hypercolumns captured elsewhere and the images they belong to ((B, H, W, 3) uint8)."""
        if self._given is not None and self._given[0] is hypercolumns and self._given[1] is images:
            return  # the same batch again: keep the inputs already made
        self.reset()
        self.hypercolumns, self.images = hypercolumns, image_tensor(images)
        self._given = (hypercolumns, images)

    # ------------------------------------------------------------------------------ decoders

    def class_tokens(self, names: Sequence[str]) -> list[list[int]]:
        key = tuple(names)
        if key not in self._class_tokens:
            if self.tokenizer is None:
                raise DatasetdmError("Predictor: class tokens need the backbone's tokenizer")
            self._class_tokens[key] = name_token_ids(self.tokenizer, list(key))
        return self._class_tokens[key]

    def inputs(self, names: Sequence[str]) -> DecoderInput:
        """The decoder input for the classes ``names`` (in order): hypercolumn features, one
        cross-attention map per class and the image; raw pixels when nothing was captured.
        Made once per batch and class list, shared by the decoders that read it."""
        key = tuple(names)
        if key not in self._inputs:
            self._inputs[key] = self._make_inputs(key)
        return self._inputs[key]

    @torch.no_grad()
    def _make_inputs(self, names: tuple[str, ...]) -> DecoderInput:
        if self.images is None:
            raise DatasetdmError("Predictor: no images yet (set_images, generate or set_hypercolumns first)")
        img = self.images
        if self.hypercolumns is None:
            return raw_pixel_input(img, len(names))
        inp = hypercolumn_input(self.hypercolumns, self.class_tokens(names), img, img.shape[-2:])
        if self.store_dtype is None:
            return inp
        store = lambda ts: [t.float().cpu().to(self.store_dtype) for t in ts]  # noqa: E731
        return DecoderInput(store(inp.features), store(inp.class_attention), inp.image, inp.image_size)

    def predict(self, name: str, names: Sequence[str] | None = None, **kw) -> list[dict]:
        """Decoder ``name``'s ``predict`` on the current batch (per image, LabelledSample fields).
        ``names``: the classes whose attention maps it reads (default its own categories; an
        open-vocab decoder may be asked about others). ``kw`` go to ``PDecoder.predict``."""
        if name not in self.decoders:
            raise DatasetdmError(f"Predictor: no decoder {name!r} (has {', '.join(self.decoders) or 'none'})")
        decoder = self.decoders[name]
        if names is None:
            names = [c["name"] for c in decoder.cfg.categories]
        return decoder.predict(self.inputs(names), **kw)

    def predict_all(self, **kw) -> dict[str, list[dict]]:
        """Every decoder's predictions on the current batch, by name."""
        return {name: self.predict(name, **kw) for name in self.decoders}
