"""Views of the few labelled images (paper §3.3, supplementary §1.3): the classes each image holds,
the prompt it is read with (its caption, or the template "a photo of a {cls}, …"), and its
augmented copies (random scale, crop, flip), each seeded from (seed, image, view)."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from datasetdm.decoder.heads import FLIP_PAIRS
from datasetdm.decoder.inputs import class_prompt
from datasetdm.errors import DatasetdmError
from datasetdm.formats.sample import IGNORE_INDEX, Instance, LabelledSample
from datasetdm.io import sample_seed

if TYPE_CHECKING:
    from datasetdm.training.trainer import TrainOptions


# ------------------------------------------------------------------------------------- samples


def folder_categories(folder) -> list[dict]:
    out = []
    for c in folder.categories:
        d = {"id": int(c.id), "name": c.name}
        if c.keypoints:
            d["keypoints"] = list(c.keypoints)
        out.append(d)
    return out


def check_task_data(folder, task: str, data_dir) -> None:
    need = {"semantic": "semantic", "open-vocab": "semantic", "depth": "depth", "instance": "instances",
            "pose": "instances"}[task]
    if need not in folder.tasks:
        raise DatasetdmError(f"{data_dir}: task {task!r} needs {need} labels; this folder has {list(folder.tasks) or 'none'}")
    if task == "pose" and not any(c.keypoints for c in folder.categories):
        raise DatasetdmError(f"{data_dir}: task 'pose' needs a category with keypoints (COCO 'person')")


def check_task_labels(samples, task: str, data_dir) -> None:
    """Refuse, before anything is computed or written, training data with nothing to learn from:
    no labelled instance (instance), no person with a visible keypoint (pose), only ignore (255)
    pixels (semantic, open-vocab), no depth > 0 (depth). Otherwise training runs, writes a
    checkpoint, and evaluation later scores a decoder that never saw a label."""
    n = len(samples)
    used = f"the {n} image{'s' if n != 1 else ''} used"
    if task == "instance" and not any(np.asarray(i.mask).any() for s in samples for i in s.instances or []):
        raise DatasetdmError(f"{data_dir}: --task instance needs at least one labelled instance; {used} have none")
    if task == "pose":
        visible = any(i.keypoints is not None and (np.asarray(i.keypoints)[:, 2] > 0).any()
                      for s in samples for i in s.instances or [])
        if not visible:
            people = sum(i.keypoints is not None for s in samples for i in s.instances or [])
            raise DatasetdmError(f"{data_dir}: --task pose needs at least one person with a visible keypoint "
                                 f"(v = 1 or 2); {used} have {people} people with keypoints, none visible")
    if task in ("semantic", "open-vocab") and not any((np.asarray(s.semantic) != IGNORE_INDEX).any() for s in samples):
        raise DatasetdmError(f"{data_dir}: --task {task} needs labelled pixels; every semantic pixel of {used} is "
                             f"{IGNORE_INDEX} (ignore)")
    if task == "depth" and not any((np.asarray(s.depth) > 0).any() for s in samples):
        raise DatasetdmError(f"{data_dir}: --task depth needs depth > 0 somewhere; every depth pixel of {used} is 0 (no depth)")


def present_category_ids(sample: LabelledSample) -> list[int]:
    ids: set[int] = set()
    if sample.semantic is not None:
        ids |= {int(v) for v in np.unique(sample.semantic)} - {0, IGNORE_INDEX}
    for inst in sample.instances or []:
        ids.add(int(inst.category_id))
    return sorted(ids)


PROMPT_MODES = ("auto", "caption", "template")


def resolve_prompt_mode(mode: str, samples, held_out, data_dir) -> str:
    """``auto`` → ``caption`` when every sample has a caption and no class is held out (a caption
    would name the held-out classes to the backbone), else ``template``."""
    if mode not in PROMPT_MODES:
        raise DatasetdmError(f"--prompt must be one of {', '.join(PROMPT_MODES)}, not {mode!r}")
    missing = [s.id for s in samples if not s.caption]
    if mode == "caption":
        if missing:
            raise DatasetdmError(f"{data_dir}: --prompt caption, but images {missing[:5]} have no caption in annotations.json")
        if held_out:
            raise DatasetdmError("--prompt caption cannot keep classes out of training: captions name them; use template")
        return "caption"
    if mode == "auto" and not missing and not held_out:
        return "caption"
    return "template"


def prompt_for(sample: LabelledSample, categories: list[dict], exclude: set[str] = frozenset(),
               mode: str = "template") -> str:
    """The prompt the backbone reads with ``sample``: its caption (``mode="caption"``; the template
    when it has none), or the template naming the classes present, less ``exclude``."""
    if mode == "caption" and sample.caption:
        return sample.caption
    present = set(present_category_ids(sample))
    return class_prompt([c["name"] for c in categories if c["id"] in present and c["name"] not in exclude])


def _resize(a: np.ndarray, size_hw, resample) -> np.ndarray:
    h, w = size_hw
    if a.shape[:2] == (h, w):
        return a
    if a.dtype == bool:
        return np.asarray(Image.fromarray(a.astype(np.uint8)).resize((w, h), resample)).astype(bool)
    if a.dtype == np.float32:
        return np.asarray(Image.fromarray(a).resize((w, h), resample))
    return np.asarray(Image.fromarray(a).resize((w, h), resample))


def view_scale(opts) -> tuple[float, float]:
    """The zoom range of augmented views: ``opts.scale``, or by default 1–1.5 (supplementary §1.3),
    except for depth: zoomed views move the horizon and change apparent size against a fixed
    camera, and depth views without zoom scored AbsRel 0.078 against 0.087 zoomed with depth/s and
    0.120 zoomed without (tuning seed, NOTES session 11)."""
    if opts.scale is not None:
        return tuple(opts.scale)
    return (1.0, 1.0) if opts.task == "depth" else (1.0, 1.5)


def augment(sample: LabelledSample, rng: np.random.Generator | None, out_size, scale=(1.0, 1.5), flip=True) -> LabelledSample:
    """A view of ``sample`` at ``out_size`` (H, W): resize (zoom factor drawn from ``scale``), random
    crop, random horizontal flip; labels follow (nearest-neighbour), keypoints too (left/right
    swapped under a flip, joints cropped away become v = 0). ``rng=None``: plain resize."""
    H0, W0 = sample.size
    oh, ow = out_size
    s = float(rng.uniform(*scale)) if rng is not None else 1.0
    base = max(oh / H0, ow / W0)
    rh, rw = max(oh, round(H0 * base * s)), max(ow, round(W0 * base * s))
    y0 = int(rng.integers(0, rh - oh + 1)) if rng is not None else (rh - oh) // 2
    x0 = int(rng.integers(0, rw - ow + 1)) if rng is not None else (rw - ow) // 2
    do_flip = bool(rng is not None and flip and rng.random() < 0.5)

    def geo(a, resample):
        a = _resize(a, (rh, rw), resample)[y0 : y0 + oh, x0 : x0 + ow]
        return np.ascontiguousarray(a[:, ::-1] if do_flip else a)

    image = geo(sample.image, Image.BILINEAR)
    semantic = None if sample.semantic is None else geo(sample.semantic, Image.NEAREST)
    depth = None if sample.depth is None else geo(sample.depth.astype(np.float32), Image.NEAREST)
    if depth is not None and s != 1.0:
        # magnifying by s looks like a camera s times closer: depth divided by s keeps apparent size and
        # depth consistent (Eigen et al. 2014 §3.3); unscaled, AbsRel was 0.120, scaled 0.087 (tuning seed)
        depth = depth / np.float32(s)
    instances = None
    if sample.instances is not None:
        instances = []
        sy, sx = rh / H0, rw / W0
        for inst in sample.instances:
            mask = geo(inst.mask.astype(bool), Image.NEAREST)
            if not mask.any():
                continue
            kps = None
            if inst.keypoints is not None:
                kps = np.asarray(inst.keypoints, np.float32).copy()
                # integer pixel-centre convention (see decoder/losses.gaussian_heatmaps)
                kps[:, 0] = (kps[:, 0] + 0.5) * sx - 0.5 - x0
                kps[:, 1] = (kps[:, 1] + 0.5) * sy - 0.5 - y0
                if do_flip:
                    kps[:, 0] = ow - 1 - kps[:, 0]
                    for a, b in FLIP_PAIRS:
                        kps[[a, b]] = kps[[b, a]]
                out = (kps[:, 0] < -0.5) | (kps[:, 0] > ow - 0.5) | (kps[:, 1] < -0.5) | (kps[:, 1] > oh - 0.5)
                kps[out | (kps[:, 2] == 0)] = 0
            instances.append(Instance(category_id=inst.category_id, mask=mask, keypoints=kps))
    return LabelledSample(id=sample.id, image=image, caption=sample.caption, semantic=semantic,
                          instances=instances, depth=depth, meta=dict(sample.meta))



class ViewSet(Sequence):
    """The views of ``samples`` (``opts.views`` each: the image resized, then augmented copies),
    made when indexed rather than held: at 512 px a view and its targets take megabytes, and a
    training set has 1600 of them. View i is view ``i % views`` of sample ``i // views``, the
    same array for the same index every time (its augmentation is seeded by (seed, sample, view))."""

    def __init__(self, samples, opts: TrainOptions, size):
        self.samples = list(samples)
        self.per_sample = int(opts.views)
        self.seed, self.scale, self.size = opts.seed, view_scale(opts), tuple(size)

    def __len__(self) -> int:
        return len(self.samples) * self.per_sample

    def sample_of(self, i: int) -> LabelledSample:
        return self.samples[i // self.per_sample]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = operator.index(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"view {i} of {len(self)}")
        s, v = divmod(i, self.per_sample)
        if v == 0:
            return augment(self.samples[s], None, self.size)
        rng = np.random.default_rng(sample_seed(self.seed, s, f"view{v}"))
        return augment(self.samples[s], rng, self.size, scale=self.scale)


def build_views(samples, opts: TrainOptions, size) -> list[LabelledSample]:
    """Every view of ``ViewSet`` at once, in its order."""
    return list(ViewSet(samples, opts, size))


def view_prompts(views: ViewSet, categories: list[dict], exclude: set[str], mode: str) -> list[str]:
    """``prompt_for`` each view; captions need no view made (an augmentation does not change them)."""
    out = []
    for i in range(len(views)):
        sample = views.sample_of(i)
        out.append(sample.caption if mode == "caption" and sample.caption else
                   prompt_for(views[i], categories, exclude, mode))
    return out


def view_noise_seeds(opts: TrainOptions, n: int) -> list[int]:
    """The timestep-noise seed of each view (paper §3.3: noise to t = 1 before the UNet pass)."""
    return [sample_seed(opts.seed, i, "noise") for i in range(n)]
