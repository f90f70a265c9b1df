"""Few-shot training of the P-Decoder (paper §3.2 "Training" stage); the diffusion model stays frozen.

The reference code ran the UNet again on every one of 50k iterations. Here each labelled image is
turned into a few augmented views (random scale, crop, flip: supplementary §1.3), each view's
hypercolumns are computed ONCE (paper §3.3: VAE encode, noise to t = 1, one UNet pass) and cached —
in memory, and on disk under ``{out}.work/`` so a resumed run skips the UNet too. Training then
samples batches from the cache only.

Prompts: each image's own caption when every training image has one (``prompt="auto"``), else the
paper's template (§3.3) "a photo of a {cls}, {cls}…" naming the classes present in the view. The
caption is what a generated image's prompt looks like (generation prompts describe scenes, with
attributes and counts), so the decoder meets at generation time the kind of text it was trained
with; on the embedded world it also scores higher on held-out scenes (bench/decoder_ablation.py).
The decoder reads per-class attention maps (see ``decoder/inputs.py``).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from datasetdm.decoder.build import DecoderConfig, PDecoder, build_decoder
from datasetdm.decoder.checkpoint import decoder_config, is_checkpoint, save_decoder
from datasetdm.decoder.heads import FLIP_PAIRS, TASKS
from datasetdm.decoder.inputs import (
    RAW_PIXELS,
    DecoderInput,
    class_attention_maps,
    class_prompt,
    find_token_positions,
    image_tensor,
    raw_pixel_input,
)
from datasetdm.errors import DatasetdmError
from datasetdm.formats.sample import IGNORE_INDEX, Instance, LabelledSample
from datasetdm.io import atomic_path, load_state, sample_seed, save_state

EMBEDDED = "embedded"  # the loader's printable source of the embedded backbone


@dataclass
class TrainOptions:
    task: str = "semantic"
    n_images: int = 100
    views: int = 16  # per image: the original + (views − 1) augmented (views are cheap: one UNet pass each)
    scale: tuple[float, float] = (1.0, 1.5)  # zoom range of augmented views (then crop back)
    iterations: int = 1500
    batch_size: int = 8
    lr: float = 1e-3  # supplementary §1.3: Adam, 1e-3
    weight_decay: float = 1e-4
    warmup: int = 50
    seed: int = 0
    features: str = "hypercolumns"  # or "raw-pixels"
    attention: bool = True
    use_image: bool = True
    dim: int = 64
    num_queries: int = 16
    layers: int = 3
    held_out: list[str] = field(default_factory=list)
    checkpoint_every: int = 250
    extract_batch: int = 16
    keep_cache: bool = False
    # shared feature-cache folder (kept): decoders of several tasks on the same images reuse one
    # hypercolumn pass (the cache key does not depend on the task). None: {out}.work/, removed after.
    cache_dir: str | None = None
    device: str = "cpu"  # backbone and decoder; the feature cache stays in CPU memory
    prompt: str = "auto"  # "caption", "template", or "auto": captions when every image has one


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


# ------------------------------------------------------------------------------------ features


class FeatureSource:
    """Turns images + prompts into ``DecoderInput``: hypercolumns of a backbone, or raw pixels."""

    def __init__(self, kind: str, categories: list[dict], backbone=None):
        self.kind = kind
        self.categories = categories
        self.backbone = backbone
        self.class_tokens = None
        if backbone is not None:
            tok = backbone.tokenizer
            self.class_tokens = [list(tok(c["name"], add_special_tokens=False).input_ids) for c in categories]

    @property
    def fingerprint(self) -> str:
        return RAW_PIXELS if self.kind == RAW_PIXELS else self.backbone.fingerprint

    @property
    def description(self) -> dict:
        """What the checkpoint records; ``backbone_from_record`` turns ``source`` back into a backbone."""
        if self.kind == RAW_PIXELS:
            d = {"fingerprint": RAW_PIXELS, "source": RAW_PIXELS, "name": RAW_PIXELS}
            if self.backbone is not None:  # open-vocab: class names embedded by this backbone's text encoder
                d["text_encoder"] = self._source()
            return d
        return {"fingerprint": self.backbone.fingerprint, "source": self._source(), "name": self.backbone.name}

    def _source(self) -> str:
        src = str(self.backbone.source)  # "embedded", a folder as given, or a hub id
        folder = Path(src).expanduser()
        return str(folder.resolve()) if src != EMBEDDED and folder.exists() else src

    def train_size(self, sizes: set) -> tuple[int, int]:
        """One size for every view: the images' own when they share one the backbone accepts."""
        if self.kind == RAW_PIXELS:
            return max(sizes)
        m = self.backbone.size_multiple
        if len(sizes) == 1:
            (h, w), = sizes
            if h % m == 0 and w % m == 0:
                return h, w
        return self.backbone.native_size

    @torch.no_grad()
    def extract(self, images: list[np.ndarray], prompts: list[str], seeds: list[int], timestep: int = 1) -> DecoderInput:
        img = image_tensor(images)
        if self.kind == RAW_PIXELS:
            return raw_pixel_input(img, len(self.categories))
        from datasetdm.backbone.capture import capture_real

        H, W = img.shape[-2:]
        hc = capture_real(self.backbone, list(img), prompts, t=timestep, seeds=seeds, size=(H, W))
        att = class_attention_maps(hc, self.class_tokens)
        feats = [f.float().cpu().half() for f in hc.features]
        return DecoderInput(feats, [a.float().cpu().half() for a in att], img, (H, W))

    @torch.no_grad()
    def text_embeddings(self, names: list[str]) -> torch.Tensor:
        """(K, D): each class name through the backbone's text encoder, averaged over the name's
        own tokens (supplementary §3.1: a name of several tokens is averaged into one)."""
        if self.backbone is None:
            raise DatasetdmError("open-vocab needs a backbone's text encoder for class names (--backbone)")
        out = []
        tok = self.backbone.tokenizer
        for name in names:
            states, ids = self.backbone.encode_prompt([name])
            name_ids = list(tok(name, add_special_tokens=False).input_ids)
            pos = find_token_positions(ids[0].tolist(), name_ids) or list(range(1, 1 + len(name_ids)))
            out.append(states[0, pos].float().mean(0).cpu())
        return torch.stack(out)


def backbone_from_record(source: str | None):
    """A checkpoint's recorded backbone source → what ``load_backbone`` takes (None: embedded)."""
    return None if source in (None, EMBEDDED, RAW_PIXELS) else source


def load_feature_source(kind: str, categories, backbone_source=None, need_text=False, device="cpu") -> FeatureSource:
    if kind not in ("hypercolumns", RAW_PIXELS):
        raise DatasetdmError(f"--features must be 'hypercolumns' or '{RAW_PIXELS}', not {kind!r}")
    backbone = None
    if kind == "hypercolumns" or need_text:
        from datasetdm.backbone.loader import load_backbone

        backbone = load_backbone(backbone_source, device=device)
    return FeatureSource(kind, categories, backbone)


# -------------------------------------------------------------------------------------- cache


def _cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_views(samples, opts: TrainOptions, size) -> list[LabelledSample]:
    views = []
    for i, s in enumerate(samples):
        views.append(augment(s, None, size))
        for v in range(1, opts.views):
            rng = np.random.default_rng(sample_seed(opts.seed, i, f"view{v}"))
            views.append(augment(s, rng, size, scale=opts.scale))
    return views


def view_noise_seeds(opts: TrainOptions, n: int) -> list[int]:
    """The timestep-noise seed of each view (paper §3.3: noise to t = 1 before the UNet pass)."""
    return [sample_seed(opts.seed, i, "noise") for i in range(n)]


def cached_inputs(views, prompts: list[str], source: FeatureSource, opts, cache_file: Path | None, progress=None):
    """DecoderInput for every view (view i read with ``prompts[i]``), computed once (batched) or
    read back from ``cache_file``."""
    if cache_file is not None and cache_file.exists():
        try:
            t = load_file(cache_file)
            n = sum(1 for k in t if k.startswith("f"))
            if t["f0"].shape[0] != len(views):
                raise ValueError("cache holds other views")
            img = image_tensor([v.image for v in views])
            return DecoderInput([t[f"f{i}"] for i in range(n)], [t[f"a{i}"] for i in range(n)], img, tuple(img.shape[-2:]))
        except Exception:
            cache_file.unlink(missing_ok=True)  # stale or truncated: recompute
    parts = []
    task = progress.add_task("hypercolumns", total=len(views)) if progress else None
    seeds = view_noise_seeds(opts, len(views))
    for b in range(0, len(views), opts.extract_batch):
        chunk = views[b : b + opts.extract_batch]
        parts.append(source.extract([v.image for v in chunk], prompts[b : b + len(chunk)], seeds[b : b + len(chunk)]))
        if progress:
            progress.advance(task, len(chunk))
    inp = DecoderInput.stack(parts)
    if cache_file is not None:
        tensors = {f"f{i}": f.contiguous() for i, f in enumerate(inp.features)}
        tensors.update({f"a{i}": a.contiguous() for i, a in enumerate(inp.class_attention)})
        with atomic_path(cache_file) as tmp:
            save_file(tensors, tmp)
    return inp


# ------------------------------------------------------------------------------------ training


def _lr_at(step: int, opts: TrainOptions) -> float:
    if step < opts.warmup:
        return opts.lr * (step + 1) / opts.warmup
    p = (step - opts.warmup) / max(1, opts.iterations - opts.warmup)
    return opts.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))


def make_decoder_config(opts: TrainOptions, categories, inp: DecoderInput, source: FeatureSource, text_dim=0,
                        prompt_mode: str = "template") -> DecoderConfig:
    return DecoderConfig(
        task=opts.task,
        categories=categories,
        feature_channels=[int(f.shape[1]) for f in inp.features],
        feature_sizes=[list(f.shape[-2:]) for f in inp.features],
        image_size=list(inp.image_size),
        features=source.kind,
        attention=opts.attention and source.kind != RAW_PIXELS,
        use_image=opts.use_image,
        dim=opts.dim,
        num_queries=opts.num_queries,
        layers=opts.layers,
        text_dim=text_dim,
        held_out=list(opts.held_out),
        backbone=source.description,
        prompt=prompt_mode,
    )


class Trainer:
    """Holds the cache, model and optimizer; ``step()`` is one decoder update from cached inputs.

    Every step draws its batch from ``gen`` and seeds torch's global RNG (the Mask2Former matcher
    samples points with it) from (seed, step), so a resumed run repeats an uninterrupted one exactly.
    """

    def __init__(self, decoder: PDecoder, inp: DecoderInput, targets: list[dict], opts: TrainOptions, forward_kw=None):
        self.decoder, self.inp, self.targets, self.opts = decoder, inp, targets, opts
        self.device = torch.device(opts.device)
        self.decoder.to(self.device)
        self.forward_kw = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in (forward_kw or {}).items()}
        self.opt = torch.optim.AdamW(decoder.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
        self.gen = torch.Generator().manual_seed(opts.seed)
        self.step_no = 0

    def batch_indices(self) -> torch.Tensor:
        n = len(self.targets)
        return torch.randperm(n, generator=self.gen)[: min(self.opts.batch_size, n)]

    def step(self, inp: DecoderInput | None = None, targets=None) -> dict:
        if inp is None:
            idx = self.batch_indices()
            inp = self.inp.select(idx)
            targets = [self.targets[i] for i in idx.tolist()]
        inp = inp.to(device=self.device, dtype=torch.float32)
        if self.device.type != "cpu":
            targets = [{k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets]
        torch.manual_seed(sample_seed(self.opts.seed, self.step_no, "step"))
        for g in self.opt.param_groups:
            g["lr"] = _lr_at(self.step_no, self.opts)
        self.decoder.train()
        out = self.decoder(inp, **self.forward_kw)
        loss, parts = self.decoder.loss(out, targets)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.decoder.parameters(), 1.0)
        self.opt.step()
        self.step_no += 1
        return {"loss": float(loss.detach()), **{k: float(v) for k, v in parts.items()}}

    def state(self) -> dict:
        return {"model": self.decoder.state_dict(), "opt": self.opt.state_dict(), "step": self.step_no,
                "gen": self.gen.get_state()}

    def load_state(self, st: dict) -> None:
        self.decoder.load_state_dict(st["model"])
        self.opt.load_state_dict(st["opt"])
        self.step_no = int(st["step"])
        self.gen.set_state(st["gen"])


@dataclass
class Prepared:
    """Everything a training run needs, made by ``prepare``."""

    decoder: PDecoder
    trainer: Trainer
    info: dict  # recorded in the checkpoint's config (JSON)
    source: FeatureSource
    views: list[LabelledSample]  # view i ↔ row i of the feature cache ↔ trainer.targets[i]
    prompts: list[str]  # the prompt of each view
    noise_seeds: list[int]  # the timestep-noise seed of each view


def prepare(data_dir, opts: TrainOptions, backbone_source=None, work_dir: Path | None = None, progress=None) -> Prepared:
    """Read the folder, build the views, compute (or read back) their cached inputs, build the
    decoder and its trainer."""
    from datasetdm.formats.labelled_folder import read_labelled_folder

    check_options(opts)
    folder = read_labelled_folder(data_dir)
    check_task_data(folder, opts.task, data_dir)
    categories = folder_categories(folder)
    names = [c["name"] for c in categories]
    unknown = [h for h in opts.held_out if h not in names]
    if unknown:
        raise DatasetdmError(f"--held-out-classes: {unknown} not among the categories of {data_dir} ({names})")
    if opts.held_out and opts.task != "open-vocab":
        raise DatasetdmError("--held-out-classes only applies to --task open-vocab")
    n = min(opts.n_images, len(folder))
    samples = [folder[i] for i in range(n)]  # pixel-level checks (corrupt data, unknown ids) run here
    source = load_feature_source(opts.features, categories, backbone_source, need_text=opts.task == "open-vocab",
                                 device=opts.device)
    size = source.train_size({s.size for s in samples})
    views = build_views(samples, opts, size)
    exclude = set(opts.held_out)
    prompt_mode = resolve_prompt_mode(opts.prompt, samples, exclude, data_dir)
    prompts = [prompt_for(v, categories, exclude, prompt_mode) for v in views]
    # the pixels and prompts themselves are in the key: an image or caption edited between an
    # interrupted run and its resume gets new features
    pixels = [hashlib.sha256(np.ascontiguousarray(s.image).tobytes()).hexdigest()[:16] for s in samples]
    key = _cache_key({"fp": source.fingerprint, "ids": [s.id for s in samples], "pixels": pixels, "views": opts.views,
                      "scale": opts.scale, "seed": opts.seed, "prompts": prompts, "size": size,
                      "cats": categories, "data": str(Path(data_dir).resolve())})
    cache_root = Path(opts.cache_dir) if opts.cache_dir else work_dir
    cache_file = None if cache_root is None else cache_root / f"cache-{key}.safetensors"
    inp = cached_inputs(views, prompts, source, opts, cache_file, progress)

    kw, emb = {}, None
    if opts.task == "open-vocab":
        emb = source.text_embeddings(names)
        seen = [i for i, c in enumerate(categories) if c["name"] not in exclude]
        kw = {"text_embeddings": emb[seen], "class_index": seen}
    cfg = make_decoder_config(opts, categories, inp, source, 0 if emb is None else emb.shape[1], prompt_mode)
    torch.manual_seed(opts.seed)
    decoder = build_decoder(cfg)
    if opts.task == "open-vocab":
        decoder.head.text_embeddings.copy_(emb)  # every category's, held-out ones too, for inference
        seen_ids = [categories[i]["id"] for i in kw["class_index"]]
        targets = [decoder.targets(v, class_ids=seen_ids) for v in views]
    else:
        targets = [decoder.targets(v) for v in views]
    trainer = Trainer(decoder, inp, targets, opts, kw)
    info = {"data": str(data_dir), "n_images": n, "views": opts.views, "train_options": asdict(opts),
            "cache_key": key}
    return Prepared(decoder, trainer, info, source, views, prompts, view_noise_seeds(opts, len(views)))


def check_options(opts: TrainOptions) -> None:
    if opts.task not in TASKS:
        raise DatasetdmError(f"--task must be one of {', '.join(TASKS)}, not {opts.task!r}")
    for name in ("n_images", "iterations", "batch_size", "views"):
        if getattr(opts, name) < 1:
            raise DatasetdmError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(opts, name)}")


def check_out(out: Path, task: str) -> None:
    """``out`` may be new or a checkpoint of the same task (retraining replaces it); anything else is
    refused before any work is done, and never overwritten."""
    if not out.exists():
        return
    if not is_checkpoint(out):
        raise DatasetdmError(f"{out}: exists and is not a decoder checkpoint; not overwriting it (choose another --out)")
    have = decoder_config(out).task
    if have != task:
        raise DatasetdmError(f"{out}: is a checkpoint for task {have!r}, not {task!r}; choose another --out or remove it")


def train_decoder(data_dir, out, opts: TrainOptions, backbone_source=None, show_progress: bool = True) -> dict:
    """Train a decoder on a labelled folder and write the checkpoint directory ``out``.

    Resumable: ``{out}.work/`` holds the feature cache and a training state saved every
    ``checkpoint_every`` steps; running the same command again continues from there. The work
    folder is removed once the checkpoint is written (``keep_cache`` keeps the feature cache).
    """
    out = Path(out)
    check_options(opts)
    check_out(out, opts.task)
    work = out.parent / f"{out.name}.work"
    t0 = time.time()
    from datasetdm.progress import progress_bar

    progress = progress_bar("{task.fields[msg]}") if show_progress else None
    if progress:
        progress.start()
        progress.add_task = _with_msg(progress.add_task)  # rich needs the msg field on every task
    history: list[float] = []
    try:
        prep = prepare(data_dir, opts, backbone_source, work, progress)
        decoder, trainer, info = prep.decoder, prep.trainer, prep.info
        t_cache = time.time() - t0
        state_file = work / "state.safetensors"
        run_key = _cache_key({"cache": info["cache_key"], "opts": asdict(opts), "cfg": decoder.cfg.to_dict()})
        resumed_at = 0
        if state_file.exists():
            try:
                st = load_state(state_file)
            except DatasetdmError:  # written atomically, so only a foreign file gets here: start over
                st = {}
            if st.get("run_key") == run_key:
                trainer.load_state(st)
                resumed_at = trainer.step_no
        bar = progress.add_task("train", total=opts.iterations, completed=trainer.step_no) if progress else None
        while trainer.step_no < opts.iterations:
            logs = trainer.step()
            history.append(logs["loss"])
            if progress:
                progress.update(bar, advance=1, msg=f"loss {logs['loss']:.3f}")
            if trainer.step_no % opts.checkpoint_every == 0 and trainer.step_no < opts.iterations:
                save_state(state_file, {**trainer.state(), "run_key": run_key})
    finally:
        if progress:
            progress.stop()
    source = prep.source
    summary = {"task": opts.task, "n_images": info["n_images"], "views": opts.views, "iterations": opts.iterations,
               "resumed_at": resumed_at,
               "first_loss": float(np.mean(history[:20])) if history else None,
               "final_loss": float(np.mean(history[-20:])) if history else None,
               "cache_seconds": round(t_cache, 2), "total_seconds": round(time.time() - t0, 2),
               "backbone": source.description}
    save_decoder(decoder, out, info={**info, "summary": summary})
    if opts.keep_cache:
        (work / "state.safetensors").unlink(missing_ok=True)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return summary


def _with_msg(add_task):
    def add(description, **kw):
        kw.setdefault("msg", "")
        return add_task(description, **kw)

    return add


def train_decoders(data_dir, out_dir: Path, tasks, backbone_source, iterations: int,
                   show_progress: bool = True, log=None) -> dict[str, Path]:
    """One decoder per task on ``data_dir`` into ``out_dir/{task}``, sharing one feature cache;
    a task whose checkpoint exists is skipped (so an interrupted run continues)."""
    paths = {}
    for task in tasks:
        ckpt = Path(out_dir) / task
        if not (ckpt / "config.json").exists():
            if log is not None:
                log(f"training the {task} decoder on {data_dir}")
            opts = TrainOptions(task=task, iterations=iterations, cache_dir=str(Path(out_dir) / "features"))
            train_decoder(data_dir, ckpt, opts, backbone_source=backbone_source, show_progress=show_progress)
        paths[task] = ckpt
    return paths
