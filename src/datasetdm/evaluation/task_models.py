"""Ordinary dense models for the downstream check of depth, instances and pose (paper §4, Table 2).

The paper measures its synthetic data with standard perception models trained on it (Mask2Former,
Depthformer, HRNet). Here every task uses the same small from-scratch U-Net as the semantic
downstream check (``segmenter.UNetSegmenter``, pixels in, no diffusion features) with one plain
head per output, so the three trainings (real, synthetic, joint) differ in their data only:

- depth: one regression map, the log of the depth in metres, L1 loss over pixels with depth
  (Eigen et al., 2014, regress log depth; plain L1 as in most later monocular depth work);
- instances: the bottom-up Panoptic-DeepLab formulation (Cheng et al., CVPR 2020): a semantic
  head, a class-agnostic instance-centre heatmap (a Gaussian at each instance's centre of mass,
  MSE) and per-pixel offsets to the centre (L1 on instance pixels). At inference, centres are the
  local maxima of the heatmap (max-pool NMS), each "thing" pixel joins the centre its offset
  points nearest to, an instance's class is its pixels' majority vote and its score the centre
  value times the mean class probability;
- pose: the same grouping for people, plus 17 keypoint heatmaps (Gaussians at the joints, MSE,
  as in Simple Baselines, Xiao et al., ECCV 2018, and HRNet); each person takes, per joint, the
  heatmap's maximum inside its mask grown by a few pixels.

The regression heads (centre, offsets, keypoints) start at zero output (``zero_init_heads``).

Samples are ``LabelledSample``s; predictions come out in the form ``evaluate`` scores
(``evaluation.evaluate.Scores``): ``{"depth": (H, W)}`` or ``{"instances": [Instance ...]}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from datasetdm.errors import DatasetdmError
from datasetdm.evaluation.segmenter import SegmenterTrainConfig, UNetSegmenter
from datasetdm.formats.sample import IGNORE_INDEX, Category, Instance, LabelledSample

TASKS = ("depth", "instance", "pose")
# COCO keypoint pairs swapped by a horizontal flip (left <-> right), 0-based
_FLIP_PAIRS = [(i, i + 1) for i in range(1, 17, 2)]
_FLIP_ORDER = list(range(17))
for _a, _b in _FLIP_PAIRS:
    _FLIP_ORDER[_a], _FLIP_ORDER[_b] = _b, _a


@dataclass
class TaskModelConfig(SegmenterTrainConfig):
    """Recipe of the downstream depth / instance / pose models (one for all three trainings): the
    segmenter's training fields (``SegmenterTrainConfig``), the downstream check's steps, and the
    task heads' settings."""

    steps: int = 2000  # the semantic downstream check's (DownstreamConfig)
    base: int = 24  # U-Net width and depth: those of the semantic downstream segmenter
    depth: int = 4
    center_sigma: float = 2.0  # px, the instance-centre Gaussians
    keypoint_sigma: float = 2.0  # px, the joint Gaussians (the pose decoder's default)
    center_weight: float = 200.0  # Panoptic-DeepLab's loss weights: centre MSE 200 ...
    offset_weight: float = 0.05  # ... offsets L1 (0.01 there, offsets in px of 1024-px images)
    keypoint_weight: float = 200.0
    center_threshold: float = 0.1
    # the centre, offset and keypoint heads start at zero output: their MSE x 200 then starts at
    # the targets' own small energy, not at a random head's (a first loss of ~40 whose gradients
    # flattened the shared U-Net: the pose model, a person on ~2% of the pixels, found no one)
    zero_init_heads: bool = True
    max_instances: int = 16  # centres kept per image (top-k of the heatmap's maxima)
    nms_kernel: int = 5


# --------------------------------------------------------------------------------------------
# data


@dataclass
class TaskData:
    """Training or test data of one task as arrays.

    ``inst``: (N, H, W) uint8, 0 no instance, k = the image's k-th instance slot (1-based), 255
    ignore; ``classes``: (N, K) category ids of the slots (0 unused); ``keypoints``: (N, K, 17, 3);
    ``keypoints_labelled``: (N,) bool, the images whose keypoints are trained on (None: all)."""

    task: str
    images: np.ndarray
    depth: np.ndarray | None = None
    inst: np.ndarray | None = None
    classes: np.ndarray | None = None
    keypoints: np.ndarray | None = None
    keypoints_labelled: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.images)

    def arrays(self) -> list[np.ndarray]:
        return [a for a in (self.images, self.depth, self.inst, self.classes, self.keypoints, self.keypoints_labelled)
                if a is not None]


def people_ids(categories: Sequence[Category]) -> set[int]:
    return {c.id for c in categories if c.keypoints}


def task_data(samples: Sequence[LabelledSample], task: str, categories: Sequence[Category],
              id_map: dict[int, int] | None = None, where: str = "data", need_keypoints: bool = True) -> TaskData:
    """Arrays for ``task`` from samples whose category ids become the reference ids through
    ``id_map`` (ids it lacks are dropped; None: the ids as they are). Pose keeps people only;
    without any labelled joint it is an error unless ``need_keypoints`` is False (generated data
    whose decoder found no person: its model then learns that, and scores accordingly)."""
    if task not in TASKS:
        raise DatasetdmError(f"--task {task!r}: choose one of semantic, {', '.join(TASKS)}")
    samples = list(samples)
    if not samples:
        raise DatasetdmError(f"{where}: no images")
    shapes = {s.image.shape[:2] for s in samples}
    if len(shapes) > 1:
        raise DatasetdmError(f"{where}: images differ in size {sorted(shapes)}; the model needs one size")
    images = np.stack([np.asarray(s.image, np.uint8) for s in samples])
    if task == "depth":
        if any(s.depth is None for s in samples):
            raise DatasetdmError(f"{where}: has no depth maps")
        return TaskData(task, images, depth=np.stack([np.asarray(s.depth, np.float32) for s in samples]))
    if any(s.instances is None for s in samples):
        raise DatasetdmError(f"{where}: has no instance annotations")
    people = people_ids(categories)
    per_image = []
    for s in samples:
        kept = []
        for inst in s.instances:
            cid = inst.category_id if id_map is None else id_map.get(inst.category_id)
            if cid is None or (task == "pose" and cid not in people):
                continue
            kept.append((cid, inst))
        per_image.append(kept)
    if task == "pose" and need_keypoints and not any(inst.keypoints is not None for kept in per_image for _, inst in kept):
        raise DatasetdmError(f"{where}: has no person keypoints")
    k_max = max(1, max(len(kept) for kept in per_image))
    if k_max > 254:
        raise DatasetdmError(f"{where}: an image has {k_max} instances; at most 254 are supported")
    n, (h, w) = len(samples), images.shape[1:3]
    inst = np.zeros((n, h, w), np.uint8)
    classes = np.zeros((n, k_max), np.int64)
    keypoints = np.zeros((n, k_max, 17, 3), np.float32)
    for i, kept in enumerate(per_image):
        # larger instances first, so a smaller one in front of a larger one keeps its pixels
        order = sorted(range(len(kept)), key=lambda j: -int(kept[j][1].mask.sum()))
        for slot, j in enumerate(order, start=1):
            cid, instance = kept[j]
            inst[i][np.asarray(instance.mask, bool)] = slot
            classes[i, slot - 1] = cid
            if instance.keypoints is not None:
                keypoints[i, slot - 1] = np.asarray(instance.keypoints, np.float32)
    return TaskData(task, images, inst=inst, classes=classes, keypoints=keypoints if task == "pose" else None)


def concat_data(parts: Sequence[TaskData]) -> TaskData:
    """One TaskData of several (instance slots padded to the largest count)."""
    task = parts[0].task
    if task == "depth":
        return TaskData(task, np.concatenate([p.images for p in parts]), depth=np.concatenate([p.depth for p in parts]))
    k = max(p.classes.shape[1] for p in parts)

    def pad(a, axis_len):
        widths = [(0, 0)] * a.ndim
        widths[1] = (0, axis_len - a.shape[1])
        return np.pad(a, widths)

    kp = [pad(p.keypoints, k) for p in parts] if task == "pose" else None
    labelled = None
    if any(p.keypoints_labelled is not None for p in parts):
        labelled = np.concatenate([np.ones(len(p), bool) if p.keypoints_labelled is None else p.keypoints_labelled
                                   for p in parts])
    return TaskData(task, np.concatenate([p.images for p in parts]), inst=np.concatenate([p.inst for p in parts]),
                    classes=np.concatenate([pad(p.classes, k) for p in parts]),
                    keypoints=np.concatenate(kp) if kp is not None else None, keypoints_labelled=labelled)


# --------------------------------------------------------------------------------------------
# targets, built per batch (after the flip) from the compact labels


def _grid(h: int, w: int):
    ys = torch.arange(h, dtype=torch.float32).view(1, h, 1)
    xs = torch.arange(w, dtype=torch.float32).view(1, 1, w)
    return ys, xs


def instance_targets(inst: torch.Tensor, classes: torch.Tensor, sigma: float):
    """(B, H, W) slot maps and (B, K) classes -> semantic (B, H, W) long with 255 ignore, centre
    heatmap (B, 1, H, W), offsets (B, 2, H, W) (dy, dx to the centre of mass, px) and the mask of
    pixels the offsets are trained on (B, H, W)."""
    b, h, w = inst.shape
    k = classes.shape[1]
    valid = inst != IGNORE_INDEX
    slots = torch.where(valid, inst, torch.zeros_like(inst)).long()
    onehot = F.one_hot(slots, k + 1)[..., 1:].float()  # (B, H, W, K)
    area = onehot.sum((1, 2))  # (B, K)
    ys, xs = _grid(h, w)
    cy = (onehot * ys[..., None]).sum((1, 2)) / area.clamp(min=1)
    cx = (onehot * xs[..., None]).sum((1, 2)) / area.clamp(min=1)
    present = area > 0
    g = torch.exp(-((ys[..., None] - cy[:, None, None]) ** 2 + (xs[..., None] - cx[:, None, None]) ** 2) / (2 * sigma**2))
    g = g * present[:, None, None].float()
    heat = g.amax(-1, keepdim=True).permute(0, 3, 1, 2) if k else torch.zeros(b, 1, h, w)
    padded = torch.cat([torch.zeros(b, 1, dtype=classes.dtype), classes], 1)
    semantic = torch.gather(padded, 1, slots.view(b, -1)).view(b, h, w)
    semantic = torch.where(valid, semantic, torch.full_like(semantic, IGNORE_INDEX))
    cyx = torch.stack([torch.cat([torch.zeros(b, 1), cy], 1), torch.cat([torch.zeros(b, 1), cx], 1)], 1)  # (B, 2, K+1)
    centre = torch.gather(cyx, 2, slots.view(b, 1, -1).expand(b, 2, -1)).view(b, 2, h, w)
    offsets = centre - torch.cat([ys.expand(b, h, w)[:, None], xs.expand(b, h, w)[:, None]], 1)
    return semantic, heat, offsets, slots > 0


def keypoint_targets(keypoints: torch.Tensor, size, sigma: float) -> torch.Tensor:
    """(B, K, 17, 3) joints -> (B, 17, H, W): per joint, the max over people of a Gaussian of peak
    1 at each labelled joint (pixel (i, j) has its centre at x = j, y = i, as the world's
    keypoints)."""
    h, w = size
    ys, xs = _grid(h, w)
    x = keypoints[..., 0, None, None]
    y = keypoints[..., 1, None, None]
    g = torch.exp(-((xs[None] - x) ** 2 + (ys[None] - y) ** 2) / (2 * sigma**2))
    g = g * (keypoints[..., 2, None, None] > 0)
    return g.amax(1) if keypoints.shape[1] else torch.zeros(keypoints.shape[0], 17, h, w)


def _flip_batch(batch: dict, flip: torch.Tensor, width: int) -> dict:
    out = dict(batch)
    for key in ("images", "depth", "inst"):
        if key in batch:
            a = batch[key]
            out[key] = torch.where(flip.view(-1, *[1] * (a.ndim - 1)), a.flip(-1), a)
    if "keypoints" in batch:
        kp = batch["keypoints"]
        mirrored = kp[:, :, _FLIP_ORDER].clone()
        mirrored[..., 0] = torch.where(mirrored[..., 2] > 0, width - 1 - mirrored[..., 0], mirrored[..., 0])
        out["keypoints"] = torch.where(flip.view(-1, 1, 1, 1), mirrored, kp)
    return out


def heads_for(task: str, num_classes: int) -> dict[str, int]:
    if task == "depth":
        return {"depth": 1}
    heads = {"semantic": num_classes if task == "instance" else 2, "center": 1, "offset": 2}
    if task == "pose":
        heads["keypoints"] = 17
    return heads


def task_loss(task: str, out: dict, batch: dict, config: TaskModelConfig, person_id: int | None = None) -> torch.Tensor:
    if task == "depth":
        d = batch["depth"]
        valid = d > 0
        if not valid.any():
            return out["depth"].sum() * 0.0
        return (out["depth"][:, 0][valid] - torch.log(d[valid])).abs().mean()
    classes = batch["classes"]
    if task == "pose":  # people vs the rest: a two-class semantic head
        classes = (classes > 0).long()
    semantic, heat, offsets, on = instance_targets(batch["inst"], classes, config.center_sigma)
    loss = F.cross_entropy(out["semantic"].float(), semantic, ignore_index=IGNORE_INDEX)
    loss = loss + config.center_weight * F.mse_loss(out["center"].float(), heat)
    if on.any():
        loss = loss + config.offset_weight * (out["offset"].float() - offsets).abs().sum(1)[on].mean()
    if task == "pose":
        target = keypoint_targets(batch["keypoints"], batch["inst"].shape[-2:], config.keypoint_sigma)
        if "keypoints_labelled" in batch:  # the MSE over the images whose joints are trained on only
            per_image = F.mse_loss(out["keypoints"].float(), target, reduction="none").mean((1, 2, 3))
            labelled = batch["keypoints_labelled"].float()
            loss = loss + config.keypoint_weight * (per_image * labelled).sum() / labelled.sum().clamp(min=1)
        else:
            loss = loss + config.keypoint_weight * F.mse_loss(out["keypoints"].float(), target)
    return loss


# --------------------------------------------------------------------------------------------
# training


def train_task_model(data: TaskData, num_classes: int, config: TaskModelConfig | None = None,
                     weights: np.ndarray | None = None, progress: Callable[[int, float], None] | None = None,
                     device: str = "cpu", init: dict | None = None) -> UNetSegmenter:
    """Train on ``data``, from scratch or from the state dict ``init`` (fine-tuning a model of the
    same task and classes); batches drawn with replacement from a seeded generator (with
    ``weights``, each sample's chance; the joint training's half-real batches). ``num_classes``
    counts the background (instance task). The model is returned on the CPU, in eval mode."""
    config = config or TaskModelConfig()
    if len(data) == 0:
        raise DatasetdmError("no training images")
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    dev = torch.device(device)
    model = UNetSegmenter(heads_for(data.task, num_classes), base=config.base, depth=config.depth)
    if config.zero_init_heads:
        for name in ("center", "offset", "keypoints"):
            if name in model.heads:
                torch.nn.init.zeros_(model.heads[name].weight)
                torch.nn.init.zeros_(model.heads[name].bias)
    if init is not None:
        model.load_state_dict(init)
    model = model.to(dev, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=config.steps, pct_start=0.1)
    tensors = {"images": torch.from_numpy(np.ascontiguousarray(data.images)).permute(0, 3, 1, 2)}
    for key in ("depth", "inst", "classes", "keypoints", "keypoints_labelled"):
        a = getattr(data, key)
        if a is not None:
            tensors[key] = torch.from_numpy(np.ascontiguousarray(a))
    p = None if weights is None else torch.as_tensor(np.asarray(weights, np.float64))
    width = data.images.shape[2]
    model.train()
    for step in range(config.steps):
        if p is None:
            idx = torch.randint(len(data), (config.batch_size,), generator=gen)
        else:
            idx = torch.multinomial(p, config.batch_size, replacement=True, generator=gen)
        batch = {k: v[idx] for k, v in tensors.items()}
        batch["images"] = batch["images"].float() / 255.0
        if config.flip:
            batch = _flip_batch(batch, torch.rand(len(idx), generator=gen) < 0.5, width)
        x = batch["images"].contiguous(memory_format=torch.channels_last).to(dev)
        batch = {k: v.to(dev) for k, v in batch.items()}
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=config.bf16):  # as train_segmenter
            out = model(x)
        loss = task_loss(data.task, out, batch, config)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None:
            progress(step, loss.item())
    return model.cpu().eval()


# --------------------------------------------------------------------------------------------
# inference


def group_instances(semantic_prob: torch.Tensor, center: torch.Tensor, offset: torch.Tensor,
                    config: TaskModelConfig) -> list[tuple[np.ndarray, int, float]]:
    """One image's heads -> [(mask (H, W) bool, class index, score)] (Panoptic-DeepLab grouping).

    semantic_prob (C, H, W) softmax, centre (H, W), offset (2, H, W) in px."""
    c, h, w = semantic_prob.shape
    pooled = F.max_pool2d(center[None, None], config.nms_kernel, stride=1, padding=config.nms_kernel // 2)[0, 0]
    peaks = ((center == pooled) & (center > config.center_threshold)).nonzero()  # (P, 2) y, x
    if len(peaks) == 0:
        return []
    values = center[peaks[:, 0], peaks[:, 1]]
    top = values.argsort(descending=True)[: config.max_instances]
    peaks, values = peaks[top].float(), values[top]
    label = semantic_prob.argmax(0)
    things = label > 0
    if not things.any():
        return []
    ys, xs = _grid(h, w)
    voted = torch.stack([ys[0].expand(h, w) + offset[0], xs[0].expand(h, w) + offset[1]], -1)  # (H, W, 2)
    dist = ((voted[:, :, None, :] - peaks[None, None]) ** 2).sum(-1)  # (H, W, P)
    owner = dist.argmin(-1)
    found = []
    for k in range(len(peaks)):
        mask = things & (owner == k)
        if int(mask.sum()) < 2:
            continue
        votes = torch.bincount(label[mask], minlength=c)
        votes[0] = 0
        cls = int(votes.argmax())
        score = float(values[k]) * float(semantic_prob[cls][mask].mean())
        found.append((mask.numpy(), cls, min(max(score, 0.0), 1.0)))
    return found


def _joint_positions(heat: torch.Tensor, mask: np.ndarray, grow: int = 3) -> np.ndarray:
    """(17, H, W) heatmaps and a person's mask -> (17, 3) x, y, v: each joint's maximum inside the
    mask grown by ``grow`` px, a quarter pixel towards the higher neighbour (Simple Baselines)."""
    region = F.max_pool2d(torch.from_numpy(mask).float()[None, None], 2 * grow + 1, stride=1, padding=grow)[0, 0] > 0
    h, w = mask.shape
    masked = torch.where(region[None], heat, torch.full_like(heat, -1e9)).view(17, -1)
    best = masked.argmax(1)
    out = np.zeros((17, 3), np.float32)
    for j in range(17):
        y, x = divmod(int(best[j]), w)
        fx, fy = float(x), float(y)
        if 0 < x < w - 1:
            fx += 0.25 * float(torch.sign(heat[j, y, x + 1] - heat[j, y, x - 1]))
        if 0 < y < h - 1:
            fy += 0.25 * float(torch.sign(heat[j, y + 1, x] - heat[j, y - 1, x]))
        out[j] = (fx, fy, 2.0)
    return out


@torch.no_grad()
def predict_task(model: UNetSegmenter, task: str, images: np.ndarray, class_ids: Sequence[int],
                 config: TaskModelConfig | None = None, batch_size: int = 64) -> list[dict]:
    """Predictions per image as ``evaluation.evaluate.Scores.add`` takes them. ``class_ids``:
    the category id of each semantic channel after the background (instance task: the reference
    ids in order; pose: the person id)."""
    config = config or TaskModelConfig()
    model.eval()
    preds = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[i: i + batch_size])).permute(0, 3, 1, 2).float() / 255.0
        out = model(x)
        for b in range(len(x)):
            if task == "depth":
                preds.append({"depth": torch.exp(out["depth"][b, 0]).numpy().astype(np.float32)})
                continue
            prob = torch.softmax(out["semantic"][b].float(), 0)
            instances = []
            for mask, cls, score in group_instances(prob, out["center"][b, 0].float(), out["offset"][b].float(), config):
                kp = _joint_positions(out["keypoints"][b].float(), mask) if task == "pose" else None
                instances.append(Instance(category_id=int(class_ids[cls - 1]), mask=mask, keypoints=kp, score=score))
            preds.append({"instances": instances})
    return preds


def category_dicts(categories: Sequence[Category]) -> list[dict]:
    """Categories in the form ``evaluation.evaluate.Scores`` takes."""
    return [{"id": c.id, "name": c.name, "keypoints": list(c.keypoints) if c.keypoints else None} for c in categories]


def score_task(task: str, preds: Sequence[dict], samples: Sequence[LabelledSample], categories: Sequence[Category]) -> dict:
    """The metrics ``evaluate`` reports for ``task`` (AbsRel/RMSE/δ1; mask AP/AP50; keypoint AP and
    the people's mask AP), predictions against ground-truth samples."""
    from datasetdm.evaluation.evaluate import Scores

    scores = Scores(task, category_dicts(categories))
    for sample, pred in zip(samples, preds):
        scores.add(sample, pred)
    return scores.compute()


def perfect_predictions(task: str, samples: Sequence[LabelledSample], categories: Sequence[Category]) -> list[dict]:
    """Ground truth as predictions (score 1): what the scorer must rate perfect (tests)."""
    people = people_ids(categories)
    out = []
    for s in samples:
        if task == "depth":
            out.append({"depth": np.asarray(s.depth, np.float32)})
            continue
        insts = [Instance(i.category_id, np.asarray(i.mask, bool),
                          None if i.keypoints is None else np.asarray(i.keypoints, np.float32).copy(), 1.0)
                 for i in s.instances or [] if task == "instance" or i.category_id in people]
        out.append({"instances": insts})
    return out

