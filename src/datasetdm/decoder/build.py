"""The P-Decoder (paper §3.4, Fig. 3) and its builders.

One architecture for every task, "with only minor variations (whether to start up some layers)":
fusion → pixel decoder → (transformer decoder, for mask tasks) → head.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from datasetdm.config import STRICT
from datasetdm.decoder.heads import HEADS, SEMANTIC_HEADS, TASKS, head_for
from datasetdm.decoder.inputs import RAW_PIXELS, DecoderInput, raw_pixel_input
from datasetdm.decoder.modules import Fusion, PixelDecoder, image_stages
from datasetdm.errors import DatasetdmError


@dataclass
class DecoderConfig:
    __pydantic_config__ = STRICT

    task: str
    categories: list[dict]  # [{"id", "name", "keypoints"?}], the labelled folder's, in order
    feature_channels: list[int]  # per level, highest resolution first
    feature_sizes: list[list[int]]  # (h, w) per level
    image_size: list[int]  # (H, W) of the decoder's output
    features: str = "hypercolumns"  # or RAW_PIXELS = "raw-pixels" (the paper's baseline)
    attention: bool = True  # fuse per-class cross-attention maps (paper §3.3)
    use_image: bool = True  # image path in the pixel decoder (see modules.py)
    dim: int = 64
    num_queries: int = 16
    layers: int = 3  # transformer decoder layers, one per level (Mask2Former: 9)
    heads: int = 4
    ffn_dim: int = 256
    text_dim: int = 0  # open-vocab: width of the text encoder's embeddings
    held_out: list[str] = field(default_factory=list)  # open-vocab: class names kept out of training
    name_dropout: float = 0.0  # open-vocab: share of class names hidden in training (heads.OpenVocabHead)
    backbone: dict = field(default_factory=dict)  # {"fingerprint", "source", "name"}
    timestep: int = 1  # paper §3.3: t = 1
    prompt: str = "template"  # how prompts were built for training (see training.py)
    # pose: σ of the Gaussian keypoint targets, in output pixels. The paper's σ = 1 is at 512 px;
    # at the world's 64 px, σ = 2 lifted keypoint AP from 0.28 to 0.53 (tuning seed, NOTES session 10)
    keypoint_sigma: float = 2.0
    # issue 19 item 4: at Stable Diffusion's sizes the decoder step is dominated by full-resolution
    # mask products and losses. ``mask_stride``: mask logits of the mask tasks (semantic, instance,
    # open-vocab) at 1/stride of the image, upsampled only at inference (Mask2Former: 1/4); depth
    # and pose keep 1. ``point_loss_points``: mask losses on that many sampled points per mask
    # (Mask2Former §3.2/§4, PointRend's importance sampling; losses.point_mask_losses); 0 = dense.
    # Configs written before these fields existed load as 1 and 0: the old behaviour, to the bit.
    # ``resolve_mask_resolution`` gives the defaults training records.
    mask_stride: int = 1
    point_loss_points: int = 0
    # semantic decoders: "masks", Mask2Former mask classification (the paper's §3.4), or "pixels",
    # a per-pixel classifier on the same pixel embeddings (heads.PixelSemanticHead)
    semantic_head: str = "masks"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "decoder config") -> "DecoderConfig":
        """Validated: an unknown key or an ill-typed value is a DatasetdmError naming ``where``."""
        from datasetdm.config import load_config

        return load_config(cls, d, where)

    @property
    def attention_channels(self) -> int:
        if not self.attention:
            return 0
        # open-vocab: the set of classes varies per call, so one class-agnostic map (the max
        # over the named classes); closed vocabularies: one map per class
        return 1 if self.task == "open-vocab" else len(self.categories)

    @property
    def mask_size(self) -> tuple[int, int]:
        """(h, w) of the mask logits the pixel decoder's image path ends at."""
        return mask_size(self.image_size, self.mask_stride)


AUTO = "auto"
AUTO_MIN_SIDE = 256  # images at least this side (SD-sized backbones) get the cheap mask path
AUTO_MASK_STRIDE = 4  # Mask2Former's mask resolution, 1/4 of the image
AUTO_MAX_POINTS = 12544  # Mask2Former's 112 × 112 points per mask
FULL_RESOLUTION_TASKS = ("depth", "pose")  # per-pixel regression and keypoint heatmaps need every pixel


def mask_size(image_size, stride: int) -> tuple[int, int]:
    return tuple(-(-int(s) // int(stride)) for s in image_size)


def resolve_mask_resolution(task: str, image_size, mask_stride: int | str = AUTO,
                            point_loss_points: int | str = AUTO) -> tuple[int, int]:
    """(mask_stride, point_loss_points) for a decoder of ``task`` on images of ``image_size``.

    "auto": below ``AUTO_MIN_SIDE`` (the embedded 64-px backbone) the dense full-resolution path,
    stride 1 and no points, exactly what decoders did before the fields existed; from it up, masks
    at 1/4 and point losses with one point per mask-logit pixel up to Mask2Former's 12544 (at
    256 px the logits have 4096 pixels; more points than that resample the same bilinear surface).
    Depth never samples points (its loss is not a mask loss); pose keeps full resolution for its
    heatmaps but samples its person masks' losses."""
    big = min(int(s) for s in image_size) >= AUTO_MIN_SIDE
    stride = mask_stride
    if stride == AUTO:
        stride = AUTO_MASK_STRIDE if big and task not in FULL_RESOLUTION_TASKS else 1
    stride = int(stride)
    if stride < 1:
        raise DatasetdmError(f"mask stride must be at least 1, got {stride}")
    if stride > 1 and task in FULL_RESOLUTION_TASKS:
        raise DatasetdmError(f"{task} decoders predict at full resolution: mask stride must be 1, got {stride}")
    points = point_loss_points
    if points == AUTO:
        h, w = mask_size(image_size, stride)
        points = min(AUTO_MAX_POINTS, h * w) if big and task != "depth" else 0
    points = int(points)
    if points < 0:
        raise DatasetdmError(f"point-loss points must be ≥ 0 (0: dense losses), got {points}")
    return stride, points


def check_backbone(cfg: DecoderConfig, backbone, name) -> None:
    """DatasetdmError naming ``name`` unless ``backbone`` (a ``Backbone`` or its fingerprint) is the
    one ``cfg`` was trained on. Raw-pixel decoders read the image only and fit every backbone."""
    fingerprint = backbone if isinstance(backbone, str) else backbone.fingerprint
    if cfg.features == RAW_PIXELS:
        return
    mine = cfg.backbone.get("fingerprint")
    if mine != fingerprint:
        raise DatasetdmError(
            f"{name}: decoder was trained on backbone {cfg.backbone.get('source') or '?'} "
            f"(fingerprint {mine}), not on the one given (fingerprint {fingerprint}); "
            "its weights only fit the features they were trained on — retrain it with `datasetdm train`"
        )


class PDecoder(nn.Module):
    """Fusion → pixel decoder → head. ``cfg`` names the task, the categories and the backbone.

    Set by ``load_decoder``: ``checkpoint_path`` (named in errors) and ``checkpoint`` (config.json).
    """

    checkpoint_path = None
    checkpoint: dict | None = None
    # compute precision of forward (torch.autocast; parameters stay fp32, outputs come back fp32):
    # set to the backbone's dtype by whoever runs it (generation, evaluation, training)
    precision: torch.dtype = torch.float32

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        if cfg.task not in HEADS:
            raise ValueError(f"unknown task {cfg.task!r}; one of {TASKS}")
        if cfg.mask_stride < 1 or (cfg.mask_stride > 1 and cfg.task in FULL_RESOLUTION_TASKS):
            raise ValueError(f"mask_stride {cfg.mask_stride} is not valid for a {cfg.task} decoder")
        if cfg.point_loss_points < 0:
            raise ValueError(f"point_loss_points must be ≥ 0, got {cfg.point_loss_points}")
        if cfg.semantic_head not in SEMANTIC_HEADS:
            raise ValueError(f"semantic_head {cfg.semantic_head!r}: one of {', '.join(SEMANTIC_HEADS)}")
        self.cfg = cfg
        self.fusion = Fusion(cfg.feature_channels, cfg.attention_channels, cfg.dim)
        stages = image_stages(tuple(cfg.feature_sizes[0]), cfg.mask_size) if cfg.use_image else 0
        self.pixel_decoder = PixelDecoder(len(cfg.feature_channels), cfg.dim, stages)
        self.head = head_for(cfg)

    @property
    def name(self) -> str:
        return str(self.checkpoint_path) if self.checkpoint_path is not None else f"{self.cfg.task} decoder"

    def check_backbone(self, backbone) -> None:
        """Refuse a backbone (a ``Backbone`` or its fingerprint) other than the one trained on."""
        check_backbone(self.cfg, backbone, self.name)

    def _check_input(self, inp: DecoderInput) -> None:
        got = [int(f.shape[1]) for f in inp.features]
        if got != list(self.cfg.feature_channels):
            raise DatasetdmError(
                f"{self.name}: features have channels {got} but the decoder was trained on {self.cfg.feature_channels} "
                f"(backbone {self.cfg.backbone.get('source') or '?'}): use the backbone it was trained on"
            )
        if self.cfg.attention and self.cfg.task != "open-vocab":
            k = [int(a.shape[1]) for a in inp.class_attention]
            if k != [len(self.cfg.categories)] * len(got):
                raise ValueError(f"{self.name}: expected {len(self.cfg.categories)} class attention maps per level, got {k}")
        if self.cfg.use_image and inp.image is None:
            raise ValueError(f"{self.name}: this decoder reads the image too: pass it in DecoderInput.image")

    def _attention(self, inp: DecoderInput, class_index=None) -> list[torch.Tensor]:
        if not self.cfg.attention:
            return []
        if self.cfg.task == "open-vocab":
            att = [a if class_index is None else a[:, class_index] for a in inp.class_attention]
            return [a.amax(1, keepdim=True) if a.shape[1] else a.new_zeros(a.shape[0], 1, *a.shape[-2:]) for a in att]
        return inp.class_attention

    def forward(self, inp: DecoderInput, **kw) -> dict:
        if self.cfg.features == RAW_PIXELS:  # the paper's baseline reads the image, whatever came with it
            if inp.image is None:
                raise ValueError(f"{self.name}: a raw-pixels decoder needs DecoderInput.image")
            inp = raw_pixel_input(inp.image.float(), len(self.cfg.categories))
        self._check_input(inp)
        if self.cfg.task == "open-vocab" and kw.get("text_embeddings") is None:
            kw = {**self.head.default_kw(inp), **{k: v for k, v in kw.items() if v is not None}}
        if self.precision == torch.float32:
            return self._forward(inp, kw)
        from datasetdm.backbone.device import autocast

        # reduced precision for the convolutions and matmuls only; losses, matching and
        # prediction read fp32 outputs, so thresholds and argmaxes see no fp16 rounding of their own
        with autocast(next(self.parameters()).device, self.precision):
            out = self._forward(inp, kw)
        return _to_float(out)

    def _forward(self, inp: DecoderInput, kw: dict) -> dict:
        fused = self.fusion(inp.features, self._attention(inp, kw.get("class_index")))
        levels, pixel_embed = self.pixel_decoder(fused, inp.image if self.cfg.use_image else None, self.cfg.mask_stride)
        return self.head(levels, pixel_embed, inp, **kw)

    def loss(self, out: dict, targets: list[dict]):
        return self.head.loss(out, targets)

    def targets(self, sample, **kw) -> dict:
        return self.head.targets(sample, **kw)

    @torch.no_grad()
    def predict(self, inp: DecoderInput, **kw) -> list[dict]:
        """Per image, LabelledSample fields (see heads.py). Inputs are moved to the decoder's device
        and the heads post-process there (full-size masks, argmaxes): only the final labels come to
        the CPU, as numpy arrays / ``Instance``s. Open-vocab without ``text_embeddings``: the
        decoder's own categories."""
        was = self.training
        self.eval()
        try:
            param = next(self.parameters())
            inp = inp.to(device=param.device, dtype=torch.float32)
            if self.cfg.task == "open-vocab" and kw.get("text_embeddings") is None:
                kw = {**self.head.default_kw(inp), **{k: v for k, v in kw.items() if v is not None}}
            out = self(inp, **kw)
            return self.head.predict(out, **kw)
        finally:
            self.train(was)

    def predict_hypercolumns(self, hypercolumns, images, tokenizer, **kw) -> list[dict]:
        """Predict from captured ``Hypercolumns`` (generation, or ``capture_real``) and the images they
        belong to ((B, H, W, 3) uint8); ``tokenizer`` is the backbone's, to find class tokens in the
        prompts. What ``labelers.decoder.decoder_annotator`` does, as one call (``decoder.predictor``)."""
        from datasetdm.decoder.predictor import Predictor

        predictor = Predictor(decoders={"decoder": self}, tokenizer=tokenizer)
        predictor.set_hypercolumns(hypercolumns, images)
        return predictor.predict("decoder", **kw)


def _to_float(x):
    if isinstance(x, torch.Tensor):
        return x.float() if x.is_floating_point() else x
    if isinstance(x, (list, tuple)):
        return type(x)(_to_float(v) for v in x)
    if isinstance(x, dict):
        return {k: _to_float(v) for k, v in x.items()}
    return x


# segment-anything style: a small dict of builders, one per task, all returning a PDecoder
BUILDERS = {task: PDecoder for task in TASKS}


def build_decoder(cfg: DecoderConfig) -> PDecoder:
    return BUILDERS[cfg.task](cfg)
