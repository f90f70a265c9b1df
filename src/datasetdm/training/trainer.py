"""Few-shot training of the P-Decoder (paper §3.2 "Training" stage); the diffusion model stays frozen.

The reference code ran the UNet again on every one of 50k iterations. Here each labelled image is
turned into a few augmented views (random scale, crop, flip: supplementary §1.3), each view's
hypercolumns are computed ONCE (paper §3.3: VAE encode, noise to t = 1, one UNet pass) and cached
on disk (``features.disk_inputs``: fp16 shards under ``{out}.work/``, or ``cache_dir``), so a
resumed run skips the UNet too and memory holds one batch, not the data set; ``feature_cache =
"memory"`` keeps them in RAM instead. Training then samples batches from the cache only. Views and
their targets are made when a batch needs them (``views.ViewSet``), never all at once.

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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from datasetdm.decoder.build import DecoderConfig, PDecoder, build_decoder, resolve_mask_resolution
from datasetdm.decoder.checkpoint import decoder_config, is_checkpoint, save_decoder
from datasetdm.decoder.heads import TASKS
from datasetdm.decoder.inputs import RAW_PIXELS, DecoderInput
from datasetdm.errors import DatasetdmError
from datasetdm.io import load_state, output_lock, sample_seed, save_state
from datasetdm.training.features import (
    FeatureSource,
    _cache_key,
    cached_inputs,
    disk_inputs,
    load_feature_source,
)
from datasetdm.training.schedule import set_lr, warmup_cosine
from datasetdm.training.views import (
    ViewSet,
    check_task_data,
    check_task_labels,
    folder_categories,
    resolve_prompt_mode,
    view_noise_seeds,
    view_prompts,
    view_scale,
)

FEATURE_CACHES = ("disk", "memory")

# `train`'s default iterations per task. Pose learns 17 heatmaps per person on top of the person's
# mask and goes on gaining past 1500 steps (tuning seed 3, training seeds 0 / 1: keypoint AP
# 0.509 / 0.545 → 0.550 / 0.546, person mask AP 0.406 / 0.443 → 0.480 / 0.468); semantic did not
# (0.512 at 1500, 0.508 at 3000, world v1). Instance too (world v2, 500 test scenes of seed 0, session
# 20): mask AP / AP50 0.568 / 0.729 → 0.644 / 0.765, fewer objects missed (9.9% → 6.4%) or merged.
DEFAULT_ITERATIONS = {"instance": 3000, "pose": 3000}
ITERATIONS = 1500


def default_iterations(task: str) -> int:
    return DEFAULT_ITERATIONS.get(task, ITERATIONS)


@dataclass
class TrainOptions:
    task: str = "semantic"
    n_images: int = 100
    views: int = 16  # per image: the original + (views − 1) augmented (views are cheap: one UNet pass each)
    scale: tuple[float, float] | None = None  # zoom range of augmented views (then crop back); None: views.view_scale
    iterations: int | None = None  # None: default_iterations(task)
    batch_size: int = 8
    lr: float = 1e-3  # supplementary §1.3: Adam, 1e-3
    weight_decay: float = 1e-4
    warmup: int = 50
    # > 0: the checkpoint holds an exponential moving average of the weights (diffusers' EMAModel,
    # decay min(ema_decay, (1+s)/(10+s)) at step s) instead of the last step's; 0: the last step's
    ema_decay: float = 0.0
    seed: int = 0
    features: str = "hypercolumns"  # or "raw-pixels"
    attention: bool = True
    use_image: bool = True
    dim: int = 64
    num_queries: int = 16
    layers: int = 3
    held_out: list[str] = field(default_factory=list)
    name_dropout: float = 0.5  # open-vocab (see heads.OpenVocabHead): 0 = the paper's eq. 4 alone
    checkpoint_every: int = 250
    extract_batch: int = 16
    keep_cache: bool = False
    # shared feature-cache folder (kept): decoders of several tasks on the same images reuse one
    # hypercolumn pass (the cache key does not depend on the task). None: {out}.work/, removed after.
    cache_dir: str | None = None
    # "disk": fp16 shards in the cache folder, read a batch at a time (RAM bounded by a batch);
    # "memory": every view's inputs in RAM (what benches that time the cache itself use)
    feature_cache: str = "disk"
    device: str = "auto"  # backbone and decoder (backbone.device.resolve_device); the cache stays on the CPU
    dtype: str | None = None  # fp16 | bf16 | fp32 for backbone and decoder; None: fp16 on CUDA, else fp32
    prompt: str = "auto"  # "caption", "template", or "auto": captions when every image has one
    # mask logits at 1/stride of the image and mask losses on sampled points (DecoderConfig);
    # "auto": both from 256 px up (SD-sized backbones), the dense full-resolution path below
    # (decoder.build.resolve_mask_resolution). The checkpoint records the resolved values.
    mask_stride: int | str = "auto"
    point_loss_points: int | str = "auto"
    semantic_head: str = "masks"  # "masks" | "pixels" (DecoderConfig.semantic_head)

    def __post_init__(self):
        if self.iterations is None:
            self.iterations = default_iterations(self.task)


# ------------------------------------------------------------------------------------ training


def make_decoder_config(opts: TrainOptions, categories, inp: DecoderInput, source: FeatureSource, text_dim=0,
                        prompt_mode: str = "template") -> DecoderConfig:
    stride, points = resolve_mask_resolution(opts.task, inp.image_size, opts.mask_stride, opts.point_loss_points)
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
        name_dropout=opts.name_dropout if opts.task == "open-vocab" else 0.0,
        backbone=source.description,
        prompt=prompt_mode,
        mask_stride=stride,
        point_loss_points=points,
        semantic_head=opts.semantic_head if opts.task == "semantic" else "masks",
    )


class ViewTargets(Sequence):
    """``decoder.targets(views[i])`` made when indexed: at 512 px one view's masks take megabytes."""

    def __init__(self, decoder: PDecoder, views, **kw):
        self.decoder, self.views, self.kw = decoder, views, kw

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.decoder.targets(self.views[i], **self.kw)


class Trainer:
    """Holds the cache, model and optimizer; ``step()`` is one decoder update from cached inputs.

    Every step draws its batch from ``gen`` and seeds torch's global RNG (the Mask2Former matcher
    samples points with it) from (seed, step), so a resumed run repeats an uninterrupted one exactly.
    ``inp``: a DecoderInput or a ``DiskFeatures`` (both ``select`` a batch); ``targets``: a list or
    a ``ViewTargets``. The decoder runs in ``opts.dtype`` (autocast; fp16 with loss scaling).
    """

    def __init__(self, decoder: PDecoder, inp, targets, opts: TrainOptions, forward_kw=None):
        from datasetdm.backbone.device import placement

        self.decoder, self.inp, self.targets, self.opts = decoder, inp, targets, opts
        self.device, self.precision = placement(opts.device, opts.dtype)
        self.decoder.to(self.device)
        self.decoder.precision = self.precision
        self.forward_kw = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in (forward_kw or {}).items()}
        self.opt = torch.optim.AdamW(decoder.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
        # fp16 gradients underflow without it; bf16 and fp32 need none (disabled, it is a no-op)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == torch.float16)
        self.gen = torch.Generator().manual_seed(opts.seed)
        self.step_no = 0
        self.schedule = warmup_cosine(opts.warmup, opts.iterations)  # the rate follows step_no (resume)
        self.ema = None
        if opts.ema_decay > 0:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(decoder.parameters(), decay=opts.ema_decay, foreach=True)

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
        set_lr(self.opt, self.opts.lr * self.schedule(self.step_no))
        self.decoder.train()
        out = self.decoder(inp, **self.forward_kw)
        loss, parts = self.decoder.loss(out, targets)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)  # clip the true gradients
        torch.nn.utils.clip_grad_norm_(self.decoder.parameters(), 1.0)
        self.scaler.step(self.opt)
        self.scaler.update()
        if self.ema is not None:
            self.ema.step(self.decoder.parameters())
        self.step_no += 1
        return {"loss": float(loss.detach()), **{k: float(v) for k, v in parts.items()}}

    def state(self) -> dict:
        st = {"model": self.decoder.state_dict(), "opt": self.opt.state_dict(), "step": self.step_no,
              "gen": self.gen.get_state()}
        if self.scaler.is_enabled():
            st["scaler"] = self.scaler.state_dict()
        if self.ema is not None:
            st["ema"] = {"shadow": list(self.ema.shadow_params), "step": self.ema.optimization_step}
        return st

    def load_state(self, st: dict) -> None:
        self.decoder.load_state_dict(st["model"])
        self.opt.load_state_dict(st["opt"])
        self.step_no = int(st["step"])
        self.gen.set_state(st["gen"])
        if self.scaler.is_enabled() and st.get("scaler"):
            self.scaler.load_state_dict(st["scaler"])
        if self.ema is not None:
            for shadow, saved in zip(self.ema.shadow_params, st["ema"]["shadow"], strict=True):
                shadow.copy_(saved)
            self.ema.optimization_step = int(st["ema"]["step"])

    def finish(self) -> None:
        """The weights to keep: the moving average where there is one."""
        if self.ema is not None:
            self.ema.copy_to(self.decoder.parameters())


@dataclass
class Prepared:
    """Everything a training run needs, made by ``prepare``."""

    decoder: PDecoder
    trainer: Trainer
    info: dict  # recorded in the checkpoint's config (JSON)
    source: FeatureSource
    views: ViewSet  # view i ↔ row i of the feature cache ↔ trainer.targets[i] (made when indexed)
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
    check_task_labels(samples, opts.task, data_dir)
    source = load_feature_source(opts.features, categories, backbone_source, need_text=opts.task == "open-vocab",
                                 device=opts.device, dtype=opts.dtype)
    size = source.train_size({s.size for s in samples})
    views = ViewSet(samples, opts, size)
    exclude = set(opts.held_out)
    prompt_mode = resolve_prompt_mode(opts.prompt, samples, exclude, data_dir)
    prompts = view_prompts(views, categories, exclude, prompt_mode)
    # the pixels and prompts themselves are in the key: an image or caption edited between an
    # interrupted run and its resume gets new features
    pixels = [hashlib.sha256(np.ascontiguousarray(s.image).tobytes()).hexdigest()[:16] for s in samples]
    parts = {"fp": source.fingerprint, "ids": [s.id for s in samples], "pixels": pixels, "views": opts.views,
             "scale": view_scale(opts), "seed": opts.seed, "prompts": prompts, "size": size,
             "cats": categories, "data": str(Path(data_dir).resolve())}
    if source.dtype != torch.float32:  # fp16/bf16 features differ from fp32 ones (fp32 keys stay as they were)
        from datasetdm.backbone.device import dtype_name

        parts["dtype"] = dtype_name(source.dtype)
    key = _cache_key(parts)
    cache_root = Path(opts.cache_dir) if opts.cache_dir else work_dir
    if cache_root is None or opts.feature_cache == "memory":
        inp = cached_inputs(views, prompts, source, opts, None, progress)
        probe = inp
    else:
        inp = disk_inputs(views, prompts, source, opts, cache_root / f"features-{key}", key, progress)
        probe = inp.select([0])  # the shapes the decoder is built for

    kw, emb = {}, None
    if opts.task == "open-vocab":
        emb = source.text_embeddings(names)
        seen = [i for i, c in enumerate(categories) if c["name"] not in exclude]
        kw = {"text_embeddings": emb[seen], "class_index": seen}
    cfg = make_decoder_config(opts, categories, probe, source, 0 if emb is None else emb.shape[1], prompt_mode)
    torch.manual_seed(opts.seed)
    decoder = build_decoder(cfg)
    if opts.task == "open-vocab":
        decoder.head.text_embeddings.copy_(emb)  # every category's, held-out ones too, for inference
        if cfg.name_dropout > 0:  # names never trained on are read as "unknown name" (zeros)
            decoder.head.text_embeddings[[i for i, c in enumerate(categories) if c["name"] in exclude]] = 0
        seen_ids = [categories[i]["id"] for i in kw["class_index"]]
        targets = ViewTargets(decoder, views, class_ids=seen_ids)
    else:
        targets = ViewTargets(decoder, views)
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
    if not (math.isfinite(opts.lr) and opts.lr > 0):
        raise DatasetdmError(f"--lr must be a positive finite number, got {opts.lr}")
    if not 0 <= opts.ema_decay < 1:
        raise DatasetdmError(f"--ema-decay must be in [0, 1), got {opts.ema_decay}")
    if opts.seed < 0:
        raise DatasetdmError(f"--seed must be ≥ 0, got {opts.seed}")
    if opts.feature_cache not in FEATURE_CACHES:
        raise DatasetdmError(f"feature_cache must be one of {', '.join(FEATURE_CACHES)}, not {opts.feature_cache!r}")
    from datasetdm.backbone.device import placement

    placement(opts.device, opts.dtype)  # an unknown or absent device, a bad dtype: refused before any work


def check_out(out: Path, task: str, overwrite: bool = False) -> None:
    """``out`` may be new; a decoder checkpoint there is replaced only with ``overwrite`` (the
    CLI's ``--overwrite``); anything else is refused before any work is done, and never replaced."""
    if not out.exists():
        return
    if not is_checkpoint(out):
        raise DatasetdmError(f"{out}: exists and is not a decoder checkpoint; not overwriting it (choose another --out)")
    if not overwrite:
        have = decoder_config(out).task
        raise DatasetdmError(f"{out}: already holds a decoder checkpoint (task {have!r}); pass --overwrite to "
                             "replace it, or choose another --out")


def train_decoder(data_dir, out, opts: TrainOptions, backbone_source=None, show_progress: bool = True,
                  overwrite: bool = False) -> dict:
    """Train a decoder on a labelled folder and write the checkpoint directory ``out``.

    Resumable: ``{out}.work/`` holds the feature cache (unless ``cache_dir`` names another folder,
    which is kept) and a training state saved every ``checkpoint_every`` steps; running the same
    command again continues from there, the cache's finished shards included. The work folder is
    removed once the checkpoint is written (``keep_cache`` keeps the feature cache).
    An existing checkpoint at ``out`` is replaced only with ``overwrite``. Holds ``out``'s lock
    (``io.output_lock``) while it runs: a second run on the same ``out`` would share the work folder.
    """
    out = Path(out)
    check_options(opts)
    with output_lock(out):
        check_out(out, opts.task, overwrite)
        return _train(data_dir, out, opts, backbone_source, show_progress)


def _train(data_dir, out: Path, opts: TrainOptions, backbone_source, show_progress: bool) -> dict:
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
        # the weight names too: a state saved by a decoder of another module layout starts over
        run_key = _cache_key({"cache": info["cache_key"], "opts": asdict(opts), "cfg": decoder.cfg.to_dict(),
                              "weights": sorted(decoder.state_dict())})
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
    trainer.finish()
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


def train_decoders(data_dir, out_dir: Path, tasks, backbone_source, iterations: int | None = None,
                   show_progress: bool = True, log=None, device: str = "auto", dtype: str | None = None,
                   semantic_head: str = "masks", seed: int = 0, held_out: Sequence[str] = ()) -> dict[str, Path]:
    """One decoder per task on ``data_dir`` into ``out_dir/{task}``, sharing one feature cache;
    a task whose checkpoint exists is skipped (so an interrupted run continues) unless it was
    trained for another length or with other classes held out, which is an error. ``iterations``
    None: each task's default (``default_iterations``); ``semantic_head``: the semantic decoder's
    (``TrainOptions.semantic_head``); ``seed``: ``TrainOptions.seed``; ``held_out``: the classes the
    open-vocab decoder never sees (``TrainOptions.held_out``)."""
    paths = {}
    for task in tasks:
        ckpt = Path(out_dir) / task
        task_held_out = list(held_out) if task == "open-vocab" else []
        if (ckpt / "config.json").exists():
            trained = json.loads((ckpt / "config.json").read_text()).get("info", {}).get("train_options", {})
            wanted = default_iterations(task) if iterations is None else iterations
            if trained.get("iterations", wanted) != wanted:
                raise DatasetdmError(f"{ckpt}: trained for {trained['iterations']} iterations, not {wanted}; "
                                     "use another output folder")
            if sorted(trained.get("held_out", task_held_out)) != sorted(task_held_out):
                raise DatasetdmError(f"{ckpt}: trained with {trained['held_out'] or 'no classes'} held out, not "
                                     f"{task_held_out or 'none'}; use another output folder")
        else:
            if log is not None:
                log(f"training the {task} decoder on {data_dir}"
                    + (f", holding out {', '.join(task_held_out)}" if task_held_out else ""))
            opts = TrainOptions(task=task, iterations=iterations, cache_dir=str(Path(out_dir) / "features"),
                                device=device, dtype=dtype, semantic_head=semantic_head, seed=seed,
                                held_out=task_held_out)
            train_decoder(data_dir, ckpt, opts, backbone_source=backbone_source, show_progress=show_progress)
        paths[task] = ckpt
    return paths
