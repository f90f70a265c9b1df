"""Train the embedded backbone on the world's images and captions (never its masks).

Four stages, each written atomically under the run folder and skipped when already there, so a
killed run resumes where it stopped (``datasetdm backbone train --run runs/backbone``):

1. ``data.npz``: world train-split images (seed ``RECIPE.world_seed``) and their captions.
2. ``vae.safetensors``: AutoencoderKL trained with L1 + a tiny KL term (the latent only has to be
   compact and smooth, as in SD's first stage, paper ref. Rombach et al. 2022).
3. ``latents.npy`` / ``text.npy``: every image's latent (posterior mean, scaled to unit std) and
   its caption's 77 MiniLM token states, computed once so UNet steps never run the VAE or text
   encoder.
4. UNet: v-prediction, Min-SNR-5 loss weights, 10% caption dropout for classifier-free guidance,
   AdamW with warm-up and cosine decay, EMA weights. ``unet-state.safetensors`` is written every few
   minutes (atomic) and ``export/`` (diffusers layout, EMA weights, fp16) every
   ``export_every`` steps; ``train.log`` has one JSON line per log interval.

The training utilities are the libraries': diffusers' ``EMAModel`` (decay min(ema_decay,
(1+s)/(10+s)) at step s) and ``compute_snr``, and the shared warm-up + cosine schedule
(``training.schedule``, transformers'). The state file keeps its layout (``ema`` = the averaged
UNet's state dict), so runs started before resume unchanged.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from datasetdm.embedded import model as embedded
from datasetdm.config import STRICT, load_config, read_json
from datasetdm.io import atomic_path, load_state, save_state, write_json_atomic
from datasetdm.training.schedule import set_lr, warmup_cosine

STATE_FILE = "unet-state.safetensors"  # tensors + JSON: loading it runs no code (no pickle)
LEGACY_STATE_FILE = "unet-state.pt"  # runs started before; read with torch's weights-only loader


@dataclass(frozen=True)
class Recipe:
    __pydantic_config__ = STRICT

    world_seed: int = 7  # train split; the few-shot images use seed 0 of the same split
    world_preset: str = "default"
    n_images: int = 30000
    vae_steps: int = 1500
    vae_batch: int = 16
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    # with init_from: the reused VAE's decoder is fine-tuned on this world, its encoder frozen, so
    # the latent space (and the warm-started UNet) stays valid while reconstructions improve
    vae_finetune_steps: int = 1000
    vae_finetune_lr: float = 3e-4
    unet_steps: int = 8000  # about two hours on 2 cores, cosine-decayed to the end
    unet_batch: int = 32
    unet_lr: float = 4e-4
    warmup: int = 500
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    export_every: int = 1000
    checkpoint_minutes: float = 5.0
    seed: int = 0
    # UNet forward under CPU bf16 autocast: 1.25-1.4x faster steps on an AVX512-BF16 CPU
    # (measured 0.80 vs 1.07 s per batch-32 step); weights, optimizer and loss stay fp32
    unet_bf16: bool = True
    # an exported backbone whose VAE is reused and whose UNet weights start this run at step 0 with
    # the full schedule (a warm start, e.g. from the world-v1 model); None trains both from scratch
    init_from: str | None = None


RECIPE = Recipe()


def _log(run: Path, **fields) -> None:
    line = json.dumps({"time": round(time.time(), 1), **fields})
    print(line, flush=True)
    with open(run / "train.log", "a") as f:
        f.write(line + "\n")


# ---------------------------------------------------------------- stage 1: world images + captions
def render_data(run: Path, r: Recipe, workers: int = 1) -> None:
    """Scene i depends only on (world_seed, i), so any number of worker processes gives the same file."""
    path = run / "data.npz"
    if path.exists():
        return
    from functools import partial

    from datasetdm.world.render import map_scene_chunks, render_images_and_captions

    images = np.zeros((r.n_images, embedded.IMAGE_SIZE, embedded.IMAGE_SIZE, 3), np.uint8)
    captions: list[str] = []
    t0 = time.time()
    chunks = map_scene_chunks(partial(render_images_and_captions, "train", r.world_seed, preset=r.world_preset),
                              r.n_images, workers)
    for start, stop, (chunk_images, chunk_captions) in chunks:
        images[start:stop] = chunk_images
        captions.extend(chunk_captions)
        if stop % 5000 == 0 or stop == r.n_images:
            _log(run, stage="data", rendered=stop, seconds=round(time.time() - t0, 1))
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, images=images, captions=np.array(captions))


def _load_images(run: Path) -> tuple[np.ndarray, list[str]]:
    data = np.load(run / "data.npz")
    return data["images"], [str(c) for c in data["captions"]]


def _to_unit(images_u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images_u8).permute(0, 3, 1, 2).float() / 127.5 - 1


# ---------------------------------------------------------------- stage 2: VAE
def train_vae(run: Path, r: Recipe) -> None:
    final = run / "vae"
    if (final / "config.json").exists():
        return
    if r.init_from is not None:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(Path(r.init_from) / "vae", torch_dtype=torch.float32)
        images, _ = _load_images(run)
        _log(run, stage="vae", reused_from=r.init_from, held_out_psnr=vae_psnr(vae, images[-64:]))
        _finetune_vae_decoder(run, r, vae, images)
        shutil.rmtree(run / "vae.tmp", ignore_errors=True)
        vae.save_pretrained(run / "vae.tmp", safe_serialization=True)
        (run / "vae.tmp").rename(final)
        return
    images, _ = _load_images(run)
    g = torch.Generator().manual_seed(r.seed)
    vae = embedded.build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=r.vae_lr, weight_decay=0.0)
    schedule = warmup_cosine(r.warmup, r.vae_steps, r.min_lr_ratio)
    train_n = len(images) - 64  # the last 64 are held out for the PSNR
    t0 = time.time()
    for step in range(r.vae_steps):
        set_lr(opt, r.vae_lr * schedule(step))
        idx = torch.randint(0, train_n, (r.vae_batch,), generator=g).numpy()
        x = _to_unit(images[idx])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=g)).sample
        loss = (recon - x).abs().mean() + r.vae_kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == r.vae_steps - 1:
            _log(run, stage="vae", step=step, loss=round(loss.item(), 5), seconds=round(time.time() - t0, 1))
    vae.eval()
    _log(run, stage="vae", held_out_psnr=vae_psnr(vae, images[-64:]))
    tmp = run / "vae.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp, safe_serialization=True)
    tmp.rename(final)


def _finetune_vae_decoder(run: Path, r: Recipe, vae, images: np.ndarray) -> None:
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=r.vae_finetune_lr, weight_decay=0.0)
    schedule = warmup_cosine(100, r.vae_finetune_steps, r.min_lr_ratio)  # a short warm-up: the decoder is trained
    g = torch.Generator().manual_seed(r.seed)
    train_n = len(images) - 64
    t0 = time.time()
    vae.train()
    for step in range(r.vae_finetune_steps):
        set_lr(opt, r.vae_finetune_lr * schedule(step))
        x = _to_unit(images[torch.randint(0, train_n, (r.vae_batch,), generator=g).numpy()])
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mode()
        loss = (vae.decode(z).sample - x).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == r.vae_finetune_steps - 1:
            _log(run, stage="vae-finetune", step=step, loss=round(loss.item(), 5), seconds=round(time.time() - t0, 1))
    _log(run, stage="vae-finetune", held_out_psnr=vae_psnr(vae, images[-64:]))
    vae.requires_grad_(True)


@torch.no_grad()
def vae_psnr(vae, images_u8: np.ndarray) -> float:
    """Reconstruction PSNR (dB) of the posterior mean on ``images_u8`` (N, H, W, 3)."""
    vae.eval()
    x = _to_unit(images_u8)
    recon = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    mse = F.mse_loss((recon + 1) / 2, (x + 1) / 2).item()
    return round(10 * math.log10(1 / mse), 2)


# ---------------------------------------------------------------- stage 3: latents and text states
@torch.no_grad()
def cache_inputs(run: Path, r: Recipe, device: str = "cpu") -> None:
    if (run / "latents.npy").exists() and (run / "text.npy").exists():
        return
    from diffusers import AutoencoderKL

    images, captions = _load_images(run)
    vae = AutoencoderKL.from_pretrained(run / "vae").eval().to(device)
    means = []
    for i in range(0, len(images), 256):
        means.append(vae.encode(_to_unit(images[i : i + 256]).to(device)).latent_dist.mode().cpu())
    latents = torch.cat(means)
    scale = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scale)
    vae.cpu().save_pretrained(run / "vae", safe_serialization=True)
    _log(run, stage="cache", latent_std=round(float(latents.std()), 4), scaling_factor=round(scale, 4))

    tokenizer, encoder = embedded.load_text_encoder()
    encoder.to(device)
    text = np.lib.format.open_memmap(
        run / "text.tmp.npy", mode="w+", dtype=np.float16, shape=(len(captions), embedded.MAX_TOKENS, embedded.TEXT_DIM)
    )
    for i in range(0, len(captions), 256):
        text[i : i + 256] = embedded.encode_captions(tokenizer, encoder, captions[i : i + 256]).cpu().numpy()
    text.flush()
    del text
    (run / "text.tmp.npy").rename(run / "text.npy")
    np.save(run / "empty_text.npy", embedded.encode_captions(tokenizer, encoder, [""]).cpu().numpy().astype(np.float16))
    with atomic_path(run / "latents.npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, (latents * scale).numpy().astype(np.float32))


# ---------------------------------------------------------------- stage 4: UNet
def _min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023) in their v-prediction form, min(SNR, γ) / (SNR + 1)."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    return torch.clamp(snr, max=gamma) / (snr + 1)


def _ema_tracker(averaged, decay: float, step: int):
    """diffusers' EMAModel starting from the weights of ``averaged`` (a UNet holding the running
    average: a copy of the UNet, or the saved EMA), at ``step``: its decay warm-up
    min(decay, (1+s)/(10+s)) goes on from there, as an unbroken run's would."""
    from diffusers.training_utils import EMAModel

    ema = EMAModel(averaged.parameters(), decay=decay, foreach=True)  # foreach: one fused update per step
    ema.optimization_step = step
    return ema


def _export(run: Path, ema, vae, step: int, r: Recipe) -> None:
    """EMA weights in the diffusers layout, plus ``training.json`` (step, recipe, machine) and a
    copy of ``train.log``: what is committed records how it was made, and can seed a new run
    (``seed_run_from_export``)."""
    import platform

    device = next(ema.parameters()).device
    machine = f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus".strip()
    if device.type == "cuda":
        machine += f", {torch.cuda.get_device_name(device)}"
    tmp = run / "export.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    embedded.save_embedded(tmp, ema, vae)
    write_json_atomic(tmp / "training.json", {
        "step": step, "recipe": asdict(r), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": machine, "device": device.type,
    })
    shutil.copy(run / "train.log", tmp / "train.log")
    old = run / "export.old"
    shutil.rmtree(old, ignore_errors=True)
    if (run / "export").exists():
        (run / "export").rename(old)
    tmp.rename(run / "export")
    shutil.rmtree(old, ignore_errors=True)


def read_unet_state(run: Path) -> dict:
    if (run / STATE_FILE).exists():
        return load_state(run / STATE_FILE)
    # weights_only: the restricted unpickler (tensors, dicts, numbers), never arbitrary objects
    return torch.load(run / LEGACY_STATE_FILE, weights_only=True, map_location="cpu")


def train_unet(run: Path, r: Recipe, max_minutes: float | None = None, device: str = "cpu") -> None:
    from diffusers import AutoencoderKL

    dev = torch.device(device)
    latents = torch.from_numpy(np.load(run / "latents.npy")).to(dev)
    if dev.type == "cuda":  # 1.8 GB of fp16 text states: gather rows on the GPU, not from disk
        text = torch.from_numpy(np.load(run / "text.npy")).to(dev)
    else:
        text = np.load(run / "text.npy", mmap_mode="r")
    empty = torch.from_numpy(np.load(run / "empty_text.npy")).float().to(dev)
    vae = AutoencoderKL.from_pretrained(run / "vae").eval()
    scheduler = embedded.build_train_scheduler()

    unet = embedded.build_unet()
    ema_unet = copy.deepcopy(unet).requires_grad_(False)  # the averaged weights as a model: loaded, exported, saved
    g = torch.Generator().manual_seed(r.seed + 1)  # on the CPU: same batches and noise on any device
    step = 0
    rewarm_from = None
    state_path = run / STATE_FILE
    pack = run / "resume-pack.safetensors"
    state = None
    has_state = state_path.exists() or (run / LEGACY_STATE_FILE).exists()
    if not has_state and not pack.exists() and r.init_from is not None:
        from safetensors.torch import load_file

        weights = load_file(Path(r.init_from) / "unet" / "diffusion_pytorch_model.safetensors")
        unet.load_state_dict({k: v.float() for k, v in weights.items()})
        ema_unet.load_state_dict(unet.state_dict())
        _log(run, stage="unet", initialised_from=r.init_from)
    if not has_state and pack.exists():
        # weights only (fp16, see `write_resume_pack`): fresh optimizer, short re-warm-up
        from safetensors.torch import load_file

        tensors = load_file(pack)
        unet.load_state_dict({k[5:]: v.float() for k, v in tensors.items() if k.startswith("unet.")})
        ema_unet.load_state_dict({k[4:]: v.float() for k, v in tensors.items() if k.startswith("ema.")})
        step = rewarm_from = int(tensors["step"])
        g.manual_seed(r.seed + 1 + step)  # fresh batches and noise, not a replay of the first run's
        _log(run, stage="unet", resumed_from_pack_at=step)
    if has_state:
        state = read_unet_state(run)
        unet.load_state_dict(state["unet"])
        ema_unet.load_state_dict(state["ema"])
        g.set_state(state["generator"])
        step = state["step"]
        rewarm_from = state.get("rewarm_from")  # a seeded run killed during its re-warm-up goes on with it
    unet.to(dev)
    ema_unet.to(dev)
    ema = _ema_tracker(ema_unet, r.ema_decay, step)
    opt = torch.optim.AdamW(unet.parameters(), lr=r.unet_lr, weight_decay=r.weight_decay)
    schedule = warmup_cosine(r.warmup, r.unet_steps, r.min_lr_ratio)
    if state is not None:
        opt.load_state_dict(state["opt"])  # after .to(dev): the moments follow the parameters
        _log(run, stage="unet", resumed_at=step)
        del state

    def averaged():
        ema.copy_to(ema_unet.parameters())
        return ema_unet

    def checkpoint() -> None:
        save_state(state_path, {"unet": unet.state_dict(), "ema": averaged().state_dict(), "opt": opt.state_dict(),
                                "generator": g.get_state(), "step": step, "rewarm_from": rewarm_from,
                                "recipe": asdict(r)})

    def text_rows(idx: torch.Tensor) -> torch.Tensor:
        if isinstance(text, torch.Tensor):
            return text[idx.to(dev)].float()
        rows = torch.from_numpy(np.ascontiguousarray(text[np.sort(idx.numpy())])).float()
        return rows[torch.argsort(torch.argsort(idx))]  # back to idx order (mmap reads want sorted rows)

    t_start = t_session = time.time()
    last_ckpt = time.time()
    losses: list[torch.Tensor] = []
    unet.train()
    unet_params = list(unet.parameters())
    while step < r.unet_steps:
        lr = r.unet_lr * schedule(step)
        if rewarm_from is not None and step - rewarm_from < r.warmup:
            lr *= (step - rewarm_from + 1) / r.warmup  # a seeded run's fresh optimizer warms up again
        set_lr(opt, lr)
        idx = torch.randint(0, len(latents), (r.unet_batch,), generator=g)
        x0 = latents[idx.to(dev)]
        cond = text_rows(idx)
        drop = torch.rand(r.unet_batch, generator=g) < r.caption_dropout
        cond[drop.to(dev)] = empty
        noise = torch.randn(x0.shape, generator=g).to(dev)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (r.unet_batch,), generator=g).to(dev)
        noisy = scheduler.add_noise(x0, noise, t)
        target = scheduler.get_velocity(x0, noise, t)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=r.unet_bf16):
            pred = unet(noisy, t, cond).sample.float()
        per_sample = (pred - target).pow(2).mean(dim=(1, 2, 3))
        loss = (per_sample * _min_snr_weights(scheduler, t, r.min_snr_gamma)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet_params, 1.0)
        opt.step()
        ema.step(unet_params)  # decay (1+step)/(10+step) up to ema_decay: early exports are usable
        step += 1
        losses.append(loss.detach())  # no .item() per step: on a GPU that would wait for every step
        if step % 50 == 0:
            _log(run, stage="unet", step=step, loss=round(torch.stack(losses).mean().item(), 5),
                 lr=round(opt.param_groups[0]["lr"], 7), s_per_step=round((time.time() - t_start) / len(losses), 3))
            losses, t_start = [], time.time()
        if step % r.export_every == 0 or step == r.unet_steps:
            checkpoint()
            last_ckpt = time.time()
            _export(run, averaged(), vae, step, r)
            _log(run, stage="unet", exported_step=step)
        elif time.time() - last_ckpt > r.checkpoint_minutes * 60:
            checkpoint()
            last_ckpt = time.time()
        if max_minutes is not None and time.time() - t_session > max_minutes * 60:
            checkpoint()
            break


def train(run: str | Path, max_minutes: float | None = None, recipe: Recipe = RECIPE, device: str = "cpu",
          workers: int = 1) -> Path:
    """Run (or resume) every stage in ``run``. ``device`` runs the VAE encoding, text encoding and
    UNet stage there (e.g. "cuda"; the VAE stage stays on the CPU); ``workers`` processes render
    the world images."""
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    recipe_path = run / "recipe.json"
    if recipe_path.exists():
        stored = read_json(recipe_path)
        load_config(Recipe, stored, str(recipe_path))  # a key this version lacks, or a bad value, is named
        if stored != asdict(recipe):  # every key as written: a default that changed since is another recipe
            from datasetdm.errors import DatasetdmError

            raise DatasetdmError(f"{recipe_path}: this run was started with another recipe; use a new --run folder")
    write_json_atomic(recipe_path, asdict(recipe))
    torch.manual_seed(recipe.seed)
    render_data(run, recipe, workers)
    train_vae(run, recipe)
    cache_inputs(run, recipe, device)
    train_unet(run, recipe, max_minutes, device)
    return run / "export"


def _save_pack(path: Path, unet_state: dict, ema_state: dict, step: int) -> None:
    """The weights-only resume file ``train_unet`` reads: ``unet.*`` and ``ema.*`` in fp16 + ``step``."""
    from safetensors.torch import save_file

    # clone: safetensors refuses tensors that share memory (unet and ema may be the same weights)
    tensors = {f"unet.{k}": v.half().clone() for k, v in unet_state.items()}
    tensors.update({f"ema.{k}": v.half().clone() for k, v in ema_state.items()})
    tensors["step"] = torch.tensor(int(step))
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


def write_resume_pack(run: str | Path, out: str | Path) -> Path:
    """Carry a run across machines: VAE (fp32) + UNet and EMA weights (fp16) + step, ~65 MB.

    ``datasetdm backbone train --run NEW`` after copying ``out/*`` into NEW resumes from it (the
    world data and caches are recomputed deterministically; the optimizer restarts with a short
    warm-up). Never commit a pack: it is a training checkpoint, not a shipped weight.
    """
    run, out = Path(run), Path(out)
    state = read_unet_state(run)
    out.mkdir(parents=True, exist_ok=True)
    _save_pack(out / "resume-pack.safetensors", state["unet"], state["ema"], state["step"])
    shutil.copytree(run / "vae", out / "vae", dirs_exist_ok=True)
    shutil.copy(run / "recipe.json", out / "recipe.json")
    shutil.copy(run / "train.log", out / "train.log")
    return out


def seed_run_from_export(export: str | Path, run: str | Path, unet_steps: int | None = None,
                         unet_batch: int | None = None) -> Path:
    """Start ``run`` from an exported backbone (e.g. the committed one) to train it further.

    The export's ``training.json`` gives the recipe and step; its UNet weights (EMA, fp16) seed
    both the trained UNet and its EMA, its VAE is reused (the VAE stage is skipped), and the
    optimizer restarts with a short warm-up (see ``train_unet``). World data and the latent cache
    are recomputed deterministically. Then ``train(run)`` continues to ``recipe.unet_steps``.

    ``unet_steps`` extends the schedule past the export's: the cosine is stretched to the new end,
    so training resumes (after the re-warm-up) at the learning rate a run of that length would
    have had at the export's step.
    """
    from safetensors.torch import load_file

    export, run = Path(export), Path(run)
    info_path = export / "training.json"
    if not info_path.exists():
        from datasetdm.errors import DatasetdmError

        raise DatasetdmError(f"{info_path}: missing; only a training export records its step and recipe")
    if run.exists() and any(run.iterdir()):
        from datasetdm.errors import DatasetdmError

        raise DatasetdmError(f"{run}: exists and is not empty; seed a new run folder")
    info = read_json(info_path)
    if not isinstance(info, dict) or not isinstance(info.get("step"), int) or not isinstance(info.get("recipe"), dict):
        from datasetdm.errors import DatasetdmError

        raise DatasetdmError(f"{info_path}: not a training record (expected an object with 'step' and 'recipe')")
    load_config(Recipe, info["recipe"], f"{info_path}: recipe")  # refuse a recipe this version cannot train
    if unet_steps is not None:
        if unet_steps <= int(info["step"]):
            from datasetdm.errors import DatasetdmError

            raise DatasetdmError(f"{info_path}: exported at step {info['step']}; --unet-steps {unet_steps} "
                                 "would not train it further")
        info["recipe"]["unet_steps"] = unet_steps
    if unet_batch is not None:  # e.g. a GPU takes a larger batch for the same step time
        info["recipe"]["unet_batch"] = unet_batch
    run.mkdir(parents=True, exist_ok=True)
    weights = load_file(export / "unet" / "diffusion_pytorch_model.safetensors")
    _save_pack(run / "resume-pack.safetensors", weights, weights, int(info["step"]))
    from diffusers import AutoencoderKL

    AutoencoderKL.from_pretrained(export / "vae", torch_dtype=torch.float32).save_pretrained(
        run / "vae", safe_serialization=True)
    write_json_atomic(run / "recipe.json", info["recipe"])
    if (export / "train.log").exists():
        shutil.copy(export / "train.log", run / "train.log")
    _log(run, stage="seed", from_export=str(export), step=int(info["step"]))
    return run
