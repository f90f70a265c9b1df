"""P-Decoder heads behind one interface (paper §3.4, supplementary §3).

Every head has:

- ``forward(levels, pixel_embed, inp, **kw) -> dict``: raw outputs (logits, maps);
- ``targets(sample) -> dict``: tensors built from a ``LabelledSample`` at image resolution;
- ``loss(out, targets) -> (loss, parts)``: a scalar to minimise and detached parts to log;
- ``predict(out, **kw) -> list[dict]``: per image, LabelledSample fields: ``semantic`` (H, W) uint8,
  ``instances`` list[Instance] (masks, scores, keypoints), ``depth`` (H, W) float32 metres.

so a single parametrised test and a single training loop run over every task.

Class indices: a head's classes are positions in the decoder config's category list (the labelled
folder's categories, in order); the semantic head adds background at index 0.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from datasetdm.decoder.inputs import DecoderInput
from datasetdm.decoder.losses import (
    SetCriterion,
    gaussian_heatmaps,
    heatmap_mse,
    heatmap_peaks,
    masked_bce_dice,
    point_mask_losses,
    resize_logits,
    silog_loss,
)
from datasetdm.decoder.transformer import MaskedAttentionDecoder
from datasetdm.decoder.modules import MLP
from datasetdm.formats.sample import IGNORE_INDEX, Instance, LabelledSample

NUM_KEYPOINTS = 17
# COCO left/right keypoint pairs (0-based), swapped under a horizontal flip
FLIP_PAIRS = ((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16))


class Head(nn.Module):
    task: str = ""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.category_ids = [c["id"] for c in cfg.categories]

    def targets(self, sample: LabelledSample) -> dict:
        raise NotImplementedError

    def loss(self, out: dict, targets: list[dict]):
        raise NotImplementedError

    def predict(self, out: dict, **kw) -> list[dict]:
        raise NotImplementedError


def _semantic_classes(head: Head) -> None:
    """Both semantic heads' class tables: background is index 0, then the config's categories."""
    head.value_to_index = {0: 0, **{cid: i + 1 for i, cid in enumerate(head.category_ids)}}
    head.index_to_value = np.array([0] + head.category_ids, dtype=np.uint8)


def _semantic_labels(head: Head, seg: torch.Tensor, share: torch.Tensor, min_pixel_confidence: float | None):
    """Per image ``semantic`` (class indices → the folder's values) and ``confidence``, the mean of
    each pixel's winning-class share; pixels whose share is below ``min_pixel_confidence`` are ignore."""
    share = share.cpu().numpy()
    labels = head.index_to_value[seg.cpu().numpy()]
    if min_pixel_confidence is not None:
        labels[share < min_pixel_confidence] = IGNORE_INDEX
    return [{"semantic": lab, "confidence": float(c.mean())} for lab, c in zip(labels, share)]


class _QueryHead(Head):
    """Learned queries + Mask2Former transformer decoder + class logits (semantic, instance, pose)."""

    def __init__(self, cfg, num_classes: int, num_queries: int):
        super().__init__(cfg)
        self.num_classes = num_classes
        self.query_feat = nn.Embedding(num_queries, cfg.dim)
        self.query_pos = nn.Embedding(num_queries, cfg.dim)
        self.transformer = MaskedAttentionDecoder(cfg.dim, cfg.heads, cfg.ffn_dim, cfg.layers)
        self.class_embed = nn.Linear(cfg.dim, num_classes + 1)  # + "no object"
        self.criterion = SetCriterion(num_classes, num_points=cfg.point_loss_points)

    def decode(self, levels, pixel_embed):
        B = pixel_embed.shape[0]
        q = self.query_feat.weight[None].expand(B, -1, -1)
        qp = self.query_pos.weight[None].expand(B, -1, -1)
        states, masks = self.transformer(levels, pixel_embed, q, qp)
        return states, masks

    def forward(self, levels, pixel_embed, inp: DecoderInput, **kw) -> dict:
        states, masks = self.decode(levels, pixel_embed)
        return {
            "class_logits": [self.class_embed(s) for s in states],
            "mask_logits": masks,
            "states": states,
            "image_size": inp.image_size,
        }

    def loss(self, out, targets):
        loss, parts, _ = self.criterion(out["class_logits"], out["mask_logits"], targets)
        return loss, parts

    def _final(self, out):
        probs = out["class_logits"][-1].softmax(-1)[..., :-1]  # drop "no object"
        masks = resize_logits(out["mask_logits"][-1], out["image_size"]).sigmoid()
        return probs, masks


class SemanticHead(_QueryHead):
    """Semantic masks with classes; one query per class region (Mask2Former semantic inference)."""

    task = "semantic"

    def __init__(self, cfg):
        super().__init__(cfg, len(cfg.categories) + 1, cfg.num_queries)
        _semantic_classes(self)

    def targets(self, sample):
        sem8 = np.asarray(sample.semantic, dtype=np.uint8)
        # the values present, ascending: a histogram of the uint8 map (torch.unique sorts all pixels:
        # a third of a training step's batch making at 512 px)
        values = [int(v) for v in np.flatnonzero(np.bincount(sem8.ravel(), minlength=256)) if v != IGNORE_INDEX]
        sem = torch.from_numpy(sem8.astype(np.int64))
        masks = torch.stack([(sem == v) for v in values]).float() if values else torch.zeros(0, *sem.shape)
        labels = torch.tensor([self.value_to_index[v] for v in values], dtype=torch.long)
        return {"masks": masks, "labels": labels, "valid": (sem != IGNORE_INDEX).float(), "semantic": sem}

    def predict(self, out, min_pixel_confidence: float | None = None, **kw):
        """Per image ``semantic`` and ``confidence``, the mean over pixels of the winning class's
        share of all class scores. With ``min_pixel_confidence``, pixels whose share is lower are
        ignore (255): uncertain pixels stay out of a generated label rather than being guessed, as
        Dataset Diffusion's uncertainty-aware labels do (its §3.3)."""
        probs, masks = self._final(out)
        scores = torch.einsum("bqk,bqhw->bkhw", probs, masks)  # Mask2Former semantic inference
        top, seg = scores.max(1)
        return _semantic_labels(self, seg, top / scores.sum(1).clamp_min(1e-6), min_pixel_confidence)


class PixelSemanticHead(Head):
    """Semantic labels by per-pixel classification: a 1×1 conv on the pixel decoder's embeddings
    (``DecoderConfig.semantic_head = "pixels"``), instead of the paper's mask classification.

    Why it exists: on world v2 with backbone v2 it scored above mask classification on the same
    cached views (the decoder ablation in the README), and it is the cheaper head (no queries,
    no matching). Loss: cross-entropy plus a soft dice per class present in the batch, so a small
    class weighs as much as a large one (with cross-entropy alone one training seed in three
    never learnt two small classes)."""

    task = "semantic"

    def __init__(self, cfg):
        super().__init__(cfg)
        _semantic_classes(self)
        self.classifier = nn.Conv2d(cfg.dim, len(self.category_ids) + 1, 1)
        lut = np.full(256, IGNORE_INDEX, np.int64)
        for value, index in self.value_to_index.items():
            lut[value] = index
        self._lut = lut  # semantic value → class index; unknown values are ignored

    def forward(self, levels, pixel_embed, inp, **kw):
        return {"pixel_logits": self.classifier(pixel_embed), "image_size": inp.image_size}

    def targets(self, sample):
        sem = np.asarray(sample.semantic, dtype=np.uint8)
        return {"index": torch.as_tensor(self._lut[sem]), "semantic": torch.as_tensor(sem.astype(np.int64))}

    def loss(self, out, targets):
        index = torch.stack([t["index"] for t in targets]).to(out["pixel_logits"].device)
        logits = resize_logits(out["pixel_logits"], index.shape[-2:])
        ce = F.cross_entropy(logits, index, ignore_index=IGNORE_INDEX)
        valid = (index != IGNORE_INDEX)[:, None]
        probs = logits.softmax(1) * valid
        onehot = F.one_hot(torch.where(valid[:, 0], index, 0), logits.shape[1]).permute(0, 3, 1, 2) * valid
        inter, total = (probs * onehot).sum((0, 2, 3)), (probs + onehot).sum((0, 2, 3))
        present = onehot.sum((0, 2, 3)) > 0
        dice = (1 - (2 * inter + 1) / (total + 1))[present].mean() if present.any() else ce.new_zeros(())
        return ce + dice, {"loss_ce": ce.detach(), "loss_dice": dice.detach()}

    def predict(self, out, min_pixel_confidence: float | None = None, **kw):
        """As ``SemanticHead.predict``; a pixel's share is its winning class's softmax probability."""
        probs = resize_logits(out["pixel_logits"], out["image_size"]).softmax(1)
        top, seg = probs.max(1)
        return _semantic_labels(self, seg, top, min_pixel_confidence)


class InstanceHead(_QueryHead):
    """One query per instance with a class and a score (Mask2Former instance inference)."""

    task = "instance"

    def __init__(self, cfg, categories=None, num_queries=None):
        cats = categories if categories is not None else cfg.categories
        super().__init__(cfg, len(cats), num_queries or cfg.num_queries)
        self.head_ids = [c["id"] for c in cats]
        self.id_to_index = {cid: i for i, cid in enumerate(self.head_ids)}

    def targets(self, sample):
        H, W = sample.size
        insts = [i for i in (sample.instances or []) if i.category_id in self.id_to_index and i.mask.any()]
        masks = torch.stack([torch.as_tensor(i.mask) for i in insts]).float() if insts else torch.zeros(0, H, W)
        labels = torch.tensor([self.id_to_index[i.category_id] for i in insts], dtype=torch.long)
        return {"masks": masks, "labels": labels, "valid": torch.ones(H, W), "instances": insts}

    def predict(self, out, score_threshold: float = 0.05, max_instances: int = 50, **kw):
        probs, masks = self._final(out)
        B, Q, K = probs.shape
        results = []
        for b in range(B):
            # every candidate at once on the decoder's device; the kept masks come to the CPU together
            scores, flat = probs[b].flatten().topk(min(max_instances, Q * K))
            q, k = flat // K, flat % K
            soft = masks[b, q]  # (N, H, W)
            binary = soft > 0.5
            area = binary.flatten(1).sum(1)
            # Mask2Former's score: class probability × mean mask probability inside the mask
            inside = (soft * binary).flatten(1).sum(1) / area.clamp_min(1)
            score = scores * inside
            keep = ((area > 0) & (score >= score_threshold)).nonzero()[:, 0]
            kept_masks = binary[keep].cpu().numpy()
            insts = [self._instance(out, b, qi, ki, m, si) for qi, ki, m, si in
                     zip(q[keep].tolist(), k[keep].tolist(), kept_masks, score[keep].tolist())]
            results.append({"instances": insts})
        return results

    def _instance(self, out, b, q, k, mask: np.ndarray, score):
        return Instance(category_id=self.head_ids[k], mask=mask, score=score)


class PoseHead(InstanceHead):
    """Human pose, several people per image: one query per person predicts the person's mask and
    17 keypoint heatmaps (dot products of 17 per-query keypoint embeddings with the per-pixel
    embeddings, as masks are made in §3.2 of the supplementary).

    Why per-person queries rather than bottom-up heatmaps + grouping: the Hungarian matching that
    already assigns instances assigns people, so no grouping heuristic (associative embeddings,
    part affinity fields) is needed; every person comes out with a score, which COCO keypoint AP
    ranks by; and a generated sample gets a person mask with its keypoints.
    Loss: matched queries' heatmaps against Gaussians (σ = ``keypoint_sigma``, 2 px; the paper's §3.4
    uses 1 px at 512 px), MSE.
    """

    task = "pose"

    def __init__(self, cfg):
        people = [c for c in cfg.categories if c.get("keypoints")]
        if not people:
            raise ValueError("pose needs a category with keypoints (COCO 'person')")
        super().__init__(cfg, people[:1], cfg.num_queries)
        self.keypoint_embed = MLP(cfg.dim, cfg.dim, NUM_KEYPOINTS * cfg.dim, layers=3)
        # heatmaps start near 0 (the Gaussian targets are mostly 0), not at ±|embedding|·|pixel|
        nn.init.normal_(self.keypoint_embed[-1].weight, std=1e-3)
        nn.init.zeros_(self.keypoint_embed[-1].bias)
        self.w_keypoints = 5.0

    def targets(self, sample):
        t = super().targets(sample)
        kps = [i.keypoints if i.keypoints is not None else np.zeros((NUM_KEYPOINTS, 3), np.float32)
               for i in t["instances"]]
        kp = torch.as_tensor(np.stack(kps), dtype=torch.float32) if kps else torch.zeros(0, NUM_KEYPOINTS, 3)
        t["keypoints"] = kp
        t["heatmaps"] = gaussian_heatmaps(kp, sample.size, sigma=self.cfg.keypoint_sigma)
        return t

    def forward(self, levels, pixel_embed, inp, **kw):
        out = super().forward(levels, pixel_embed, inp, **kw)
        B, Q, C = out["states"][-1].shape
        emb = self.keypoint_embed(out["states"][-1]).view(B, Q, NUM_KEYPOINTS, C)
        out["heatmaps"] = torch.einsum("bqjc,bchw->bqjhw", emb, pixel_embed)
        return out

    def _heatmaps(self, out, b, q):
        hm = out["heatmaps"][b, q]
        return resize_logits(hm[None], out["image_size"])[0]

    def loss(self, out, targets):
        loss, parts, indices = self.criterion(out["class_logits"], out["mask_logits"], targets)
        kp_loss = out["heatmaps"].new_zeros(())
        n = 0
        for b, ((qi, ti), t) in enumerate(zip(indices, targets)):
            if len(qi) == 0:
                continue
            pred = resize_logits(out["heatmaps"][b, qi], out["image_size"])
            weight = (t["keypoints"][ti, :, 2] > 0).float()
            kp_loss = kp_loss + heatmap_mse(pred, t["heatmaps"][ti], weight) * len(qi)
            n += len(qi)
        kp_loss = self.w_keypoints * kp_loss / max(n, 1)
        parts["loss_keypoints"] = kp_loss.detach()
        return loss + kp_loss, parts

    def _instance(self, out, b, q, k, mask, score):
        peaks = heatmap_peaks(self._heatmaps(out, b, q)[None])[0].cpu().numpy()
        vis = np.where(peaks[:, 2] >= 0.1, 2.0, 0.0).astype(np.float32)
        kps = np.concatenate([peaks[:, :2], vis[:, None]], 1).astype(np.float32)
        # a person is ranked by how sure the decoder is of the person and of its joints, as top-down
        # pose estimators rank people (person score × mean keypoint score): a heatmap's peak height is
        # its joint's confidence (the targets peak at 1). Keypoint AP +0.02 on the tuning seed.
        score = score * float(np.clip(peaks[:, 2], 0.0, 1.0).mean())
        return Instance(category_id=self.head_ids[k], mask=mask, score=score, keypoints=kps)


class OpenVocabHead(Head):
    """Open-vocabulary semantic segmentation (paper eq. 4, supplementary §3.1).

    For each class asked for, its name's text embedding τ(C_j) (from the backbone's own text
    encoder) is concatenated to the learned query Q_i and fused by an MLP: Q̂ = MLP([Q_i, τ(C_j)]).
    One query per class name; all class queries attend to each other in the decoder's
    self-attention, so they compete for pixels. Each query predicts a mask and a "present" logit.
    The class's own cross-attention map, when the prompt names it, is added to its mask logits and
    its peak to its present logit, each through a learned gain and offset: for a name never trained
    on, that map is the only spatial hint the backbone gives.
    Name dropout (``cfg.name_dropout``): in training each class query's τ(C_j) is replaced by the
    zero "unknown name" embedding with that probability, so the decoder learns to find a class from
    its attention map alone; a name never trained on is then given the zero embedding
    (``embeddings_for``). Seven seen classes are too few for a small text encoder's embedding of an
    eighth to generalise: on the tuning seed, unseen mIoU 0.002 without name dropout, 0.22 with it
    and the text embedding, 0.46 with it and the zero embedding.
    Any class name works at inference.
    """

    task = "open-vocab"

    def __init__(self, cfg):
        super().__init__(cfg)
        d = cfg.dim
        self.query_feat = nn.Parameter(torch.randn(d) * 0.02)
        self.query_pos = nn.Parameter(torch.randn(d) * 0.02)
        self.text_norm = nn.LayerNorm(cfg.text_dim)
        self.fuse = MLP(d + cfg.text_dim, d, d, layers=2)  # eq. 4
        self.fuse_pos = nn.Linear(cfg.text_dim, d)
        self.transformer = MaskedAttentionDecoder(d, cfg.heads, cfg.ffn_dim, cfg.layers)
        self.present = nn.Linear(d, 1)
        on = 1.0 if cfg.attention else 0.0
        self.attention_gain = nn.Parameter(torch.tensor(4.0 * on))
        self.attention_offset = nn.Parameter(torch.tensor(-2.0 * on))
        self.present_gain = nn.Parameter(torch.tensor(4.0 * on))
        self.present_offset = nn.Parameter(torch.tensor(-2.0 * on))
        # τ(C_j) of the decoder's own categories, in config order, stored with the weights so a
        # loaded decoder labels its classes without a text encoder (training fills it in)
        self.register_buffer("text_embeddings", torch.zeros(len(cfg.categories), cfg.text_dim))

    def default_kw(self, inp: DecoderInput) -> dict:
        """Forward/predict arguments for "all my categories": their stored embeddings, their
        attention maps at the same positions of ``inp.class_attention`` (as ``hypercolumn_input``
        lays them out for the config's categories), and their ids."""
        K = len(self.category_ids)
        has_maps = self.cfg.attention and bool(inp.class_attention) and inp.class_attention[0].shape[1] == K
        return {"text_embeddings": self.text_embeddings, "class_index": list(range(K)) if has_maps else None,
                "class_ids": list(self.category_ids)}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # decoders trained before the offsets and the present gain existed: zeros reproduce them
        for name in ("attention_offset", "present_gain", "present_offset"):
            if prefix + "attention_gain" in state_dict and prefix + name not in state_dict:
                state_dict[prefix + name] = torch.zeros(())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def embeddings_for(self, names: list[str], embed=None) -> torch.Tensor:
        """(K, D_text) τ for each name: the stored embedding of a class trained on; for a name never
        trained on (held out, or new), the zero "unknown name" embedding when the decoder was trained
        with name dropout, else ``embed(names)`` (the backbone's text encoder)."""
        stored = {c["name"]: i for i, c in enumerate(self.cfg.categories)}
        if self.cfg.name_dropout > 0:
            known = {n: i for n, i in stored.items() if n not in self.cfg.held_out}
            fresh = {n: torch.zeros(self.text_embeddings.shape[1]) for n in names if n not in known}
        else:  # held-out names keep the text embeddings stored at training
            known = stored
            new = [n for n in names if n not in known]
            if new and embed is None:
                raise ValueError(f"open-vocab: {new} were never trained on: their text embeddings are needed")
            fresh = dict(zip(new, embed(new))) if new else {}
        return torch.stack([self.text_embeddings[known[n]] if n in known else fresh[n].to(self.text_embeddings)
                            for n in names])

    def forward(self, levels, pixel_embed, inp, text_embeddings=None, class_index=None, **kw):
        """text_embeddings: (K, D_text) for the classes asked for; class_index: their positions in
        ``inp.class_attention`` (None: no attention maps for them)."""
        if text_embeddings is None:
            raise ValueError("open-vocab decoding needs text_embeddings for the class names")
        B, K = pixel_embed.shape[0], text_embeddings.shape[0]
        t = text_embeddings.to(pixel_embed)
        if self.training and self.cfg.name_dropout > 0:  # torch's RNG is seeded per step by the trainer
            t = t * (torch.rand(K, 1) >= self.cfg.name_dropout).to(t)
        t = self.text_norm(t)
        q = self.fuse(torch.cat([self.query_feat.expand(K, -1), t], -1))
        qp = self.query_pos + self.fuse_pos(t)
        states, masks = self.transformer(levels, pixel_embed, q[None].expand(B, -1, -1), qp[None].expand(B, -1, -1))
        bias = present_bias = 0
        if class_index is not None and self.cfg.attention and inp.class_attention[0].shape[1]:
            att = inp.class_attention[0][:, class_index].float()  # finest level, (B, K, h, w)
            bias = self.attention_gain * resize_logits(att, masks[-1].shape[-2:]) + self.attention_offset
            present_bias = self.present_gain * att.flatten(2).amax(-1) + self.present_offset  # named: peak 1
        return {
            "present_logits": [self.present(s)[..., 0] + present_bias for s in states],
            "mask_logits": [m + bias for m in masks],
            "image_size": inp.image_size,
        }

    def targets(self, sample, class_ids=None):
        """class_ids: the category ids queried (default: all); unqueried classes become ignore."""
        sem = torch.as_tensor(np.asarray(sample.semantic, dtype=np.int64))
        ids = class_ids if class_ids is not None else self.category_ids
        valid = sem != IGNORE_INDEX
        unqueried = set(torch.unique(sem).tolist()) - set(ids) - {0, IGNORE_INDEX}
        for v in unqueried:  # held-out classes: neither positive nor background
            valid &= sem != v
        masks = torch.stack([(sem == c) for c in ids]).float() if ids else torch.zeros(0, *sem.shape)
        return {"masks": masks, "present": masks.flatten(1).amax(1), "valid": valid.float(), "semantic": sem}

    def loss(self, out, targets):
        total, parts = 0.0, {}
        for s, (pl, ml) in enumerate(zip(out["present_logits"], out["mask_logits"])):
            present = torch.stack([t["present"] for t in targets])
            ce = F.binary_cross_entropy_with_logits(pl, present)
            bce = dice = pl.new_zeros(())
            n = max(1, int(present.sum()))
            if self.cfg.point_loss_points:  # every present class's mask at once, on sampled points
                idx = [t["present"].nonzero()[:, 0] for t in targets]
                if any(len(i) for i in idx):
                    bce, dice = point_mask_losses(ml, [(i, i) for i in idx], targets, self.cfg.point_loss_points)
            else:
                for b, t in enumerate(targets):
                    idx = t["present"].nonzero()[:, 0]
                    if len(idx) == 0:
                        continue
                    m = resize_logits(ml[b, idx][None], t["masks"].shape[-2:])[0]
                    l_bce, l_dice = masked_bce_dice(m, t["masks"][idx], t["valid"][None].expand_as(m))
                    bce, dice = bce + l_bce, dice + l_dice
            losses = {"loss_class": 2.0 * ce, "loss_mask": 5.0 * bce / n, "loss_dice": 5.0 * dice / n}
            total = total + sum(losses.values())
            parts = {k: v.detach() for k, v in losses.items()}
        return total / len(out["mask_logits"]), parts

    def predict(self, out, class_ids=None, **kw):
        ids = np.array([0] + list(class_ids if class_ids is not None else self.category_ids), dtype=np.uint8)
        present = out["present_logits"][-1].sigmoid()  # (B, K)
        masks = resize_logits(out["mask_logits"][-1], out["image_size"]).sigmoid()
        score = present[..., None, None] * masks  # (B, K, H, W)
        best, arg = score.max(1)
        label = torch.where(best > 0.5, arg + 1, torch.zeros_like(arg)).cpu().numpy()
        return [{"semantic": ids[s]} for s in label]


class DepthHead(Head):
    """One depth map from the pixel decoder only (paper §3.4), via two extra convs (supp. §3.3).
    Predicts log-depth; trained with the scale-invariant log loss."""

    task = "depth"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.out = nn.Sequential(
            nn.Conv2d(cfg.dim, cfg.dim, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(cfg.dim, 1, 1)
        )

    def forward(self, levels, pixel_embed, inp, **kw):
        return {"log_depth": resize_logits(self.out(pixel_embed), inp.image_size)[:, 0], "image_size": inp.image_size}

    def targets(self, sample):
        return {"depth": torch.from_numpy(np.array(sample.depth, dtype=np.float32))}  # a copy: read-only inputs

    def loss(self, out, targets):
        depth = torch.stack([t["depth"] for t in targets]).to(out["log_depth"])
        loss = silog_loss(out["log_depth"], depth)
        return loss, {"loss_silog": loss.detach()}

    def predict(self, out, **kw):
        return [{"depth": d} for d in out["log_depth"].detach().exp().float().cpu().numpy()]


HEADS = {h.task: h for h in (SemanticHead, InstanceHead, OpenVocabHead, DepthHead, PoseHead)}
TASKS = tuple(HEADS)
SEMANTIC_HEADS = {"masks": SemanticHead, "pixels": PixelSemanticHead}  # DecoderConfig.semantic_head


def head_for(cfg) -> Head:
    """The head of a decoder config: its task's, or for semantic the one ``semantic_head`` names."""
    if cfg.task == "semantic":
        return SEMANTIC_HEADS[cfg.semantic_head](cfg)
    return HEADS[cfg.task](cfg)
