"""The GPU fast path on the CPU (issue 19): --device/--dtype resolved in one place, PyTorch's
scaled-dot-product attention in every layer whose maps are not captured, and generation and the
decoder in reduced precision agreeing with fp32 (bf16 here: the CPU's fp16 matmuls are slow)."""

import numpy as np
import pytest
import torch

from datasetdm.errors import DatasetdmError
from faults_support import assert_one_line_error, run_cli

PROMPTS = ["a photo of a dog", "a cat and a bus", "a dog on a bus", "a photo"]
CATS = [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}, {"id": 3, "name": "bus"}]


def test_device_and_dtype_resolve_in_one_place():
    from datasetdm.backbone.device import placement, resolve_device, resolve_dtype

    cuda = torch.cuda.is_available()
    assert placement("auto", None) == ((torch.device("cuda"), torch.float16) if cuda else (torch.device("cpu"), torch.float32))
    assert placement("cpu", "bf16") == (torch.device("cpu"), torch.bfloat16)
    assert resolve_dtype("fp16", "cpu") == torch.float16 and resolve_dtype(torch.float32) == torch.float32
    for bad, fragment in (("tpu", "--device tpu"), ("gpu0", "--device gpu0")):
        with pytest.raises(DatasetdmError, match=fragment):
            resolve_device(bad)
    with pytest.raises(DatasetdmError, match="--dtype fp8"):
        resolve_dtype("fp8", "cpu")
    if not cuda:
        for spec in ("cuda", "cuda:1"):
            with pytest.raises(DatasetdmError, match="no CUDA GPU"):
                resolve_device(spec)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
@pytest.mark.parametrize("command", [["train", "--data", "x", "--task", "semantic", "--out", "o"],
                                     ["generate", "--out", "o", "--labeler", "attention", "--classes", "dog"],
                                     ["evaluate", "--decoder", "d", "--data", "x"]])
def test_commands_refuse_an_absent_gpu_in_one_line(command, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x").mkdir()
    code, _, err = run_cli(capsys, monkeypatch, *command, "--device", "cuda")
    assert_one_line_error(code, err, "--device cuda", "no CUDA GPU")
    assert not (tmp_path / "o").exists()


def test_attention_runs_sdpa_except_where_maps_are_read(tiny_clip):
    """Loaded models attend with AttnProcessor2_0 (SDPA); capture wraps the cross-attention layers
    (their maps are read) and only the self-attention layers of the sides asked for, each wrapper
    still running SDPA for the layer's output; leaving restores every processor."""
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    from datasetdm.backbone.capture import CaptureAttnProcessor, attention_level, capture_hypercolumns, level_sizes
    from datasetdm.backbone.loader import use_sdpa

    unet = tiny_clip.unet
    layers = {n: m for n, m in unet.named_modules() if isinstance(m, Attention)}
    assert {type(m.get_processor()) for m in layers.values()} == {AttnProcessor2_0}
    assert all(type(m.get_processor()) is AttnProcessor2_0 for m in tiny_clip.vae.modules() if isinstance(m, Attention))
    levels = len(unet.config.down_block_types)
    latent = tiny_clip.native_size[0] // tiny_clip.vae_scale_factor
    self_level = {n: attention_level(n, levels) for n, m in layers.items() if not m.is_cross_attention}
    level = min(self_level.values())
    side = level_sizes((latent, latent), levels)[level][0]
    for sides, want in (((), set()), ((side,), {n for n, lv in self_level.items() if lv == level})):
        with capture_hypercolumns(unet, (latent, latent), sides):
            procs = {n: m.get_processor() for n, m in layers.items()}
            for n, m in layers.items():
                if m.is_cross_attention or n in want:
                    assert isinstance(procs[n], CaptureAttnProcessor) and type(procs[n].inner) is AttnProcessor2_0, n
                else:
                    assert type(procs[n]) is AttnProcessor2_0, n  # untouched: no map materialised
        assert {type(m.get_processor()) for m in layers.values()} == {AttnProcessor2_0}
    # a model saved with diffusers' plain (map-building) processor is switched back to SDPA
    layer = next(iter(layers.values()))
    layer.set_processor(AttnProcessor())
    try:
        assert use_sdpa(unet) == 1 and type(layer.get_processor()) is AttnProcessor2_0
    finally:
        layer.set_processor(AttnProcessor2_0())


def _decoders(hc, images, task_names=("semantic", "depth")):
    from datasetdm.decoder import DecoderConfig, build_decoder

    out = {}
    for task in task_names:
        cfg = DecoderConfig(task=task, categories=CATS, feature_channels=[f.shape[1] for f in hc.features],
                            feature_sizes=[list(f.shape[-2:]) for f in hc.features], image_size=list(images.shape[1:3]),
                            dim=16, num_queries=4, layers=2, heads=2, ffn_dim=32)
        torch.manual_seed(0)
        out[task] = build_decoder(cfg).eval()
    return out


def _label(decoders, tokenizer, images, hc, precision):
    from datasetdm.labelers.decoder import decoder_annotator

    labels = {}
    for task, dec in decoders.items():
        dec.precision = precision
        labels[task] = decoder_annotator(dec, tokenizer)(images, hc, [None] * len(images))
    return labels


def test_bf16_generation_labels_agree_with_fp32(tiny_clip_path):
    from datasetdm.backbone.capture import generate
    from datasetdm.backbone.loader import load_backbone

    runs = {}
    for dtype in ("fp32", "bf16"):
        bb = load_backbone(tiny_clip_path, dtype=dtype)
        assert bb.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype] and bb.unet.dtype == bb.dtype
        runs[dtype] = (bb, *generate(bb, PROMPTS, [0, 1, 2, 3], num_inference_steps=5, guidance_scale=4.0))
    (a, ia, ha), (b, ib, hb) = runs["fp32"], runs["bf16"]
    assert ia.dtype == ib.dtype == np.uint8 and ia.shape == ib.shape
    assert np.abs(ia.astype(float) - ib.astype(float)).mean() < 3  # the same images, up to bf16 rounding
    assert [f.dtype for f in hb.features] == [torch.bfloat16] * len(hb.features)
    assert all(x.float().sum(1).sub(1).abs().max() < 1e-3 for x in hb.cross_attention)  # maps: fp32 softmax
    decoders = _decoders(ha, ia)
    la = _label(decoders, a.tokenizer, ia, ha, torch.float32)
    lb = _label(decoders, b.tokenizer, ib, hb, torch.bfloat16)
    for x, y in zip(la["semantic"], lb["semantic"]):
        assert x.semantic.dtype == y.semantic.dtype == np.uint8 and x.semantic.shape == y.semantic.shape
        assert (x.semantic == y.semantic).mean() >= 0.9
    for x, y in zip(la["depth"], lb["depth"]):
        assert x.depth.dtype == y.depth.dtype == np.float32 and x.depth.shape == y.depth.shape
        assert (np.abs(x.depth - y.depth) / x.depth).mean() < 0.05


def test_decoder_in_bf16_agrees_with_fp32_and_trains(tiny_clip, tmp_path):
    """The same decoder on the same inputs under bf16 autocast: fp32 outputs, the same labels; and
    a bf16 training step runs on the CPU (no loss scaling: bf16 has fp32's range)."""
    from datasetdm.backbone.capture import generate
    from datasetdm.decoder.inputs import hypercolumn_input, image_tensor
    from datasetdm.training import TrainOptions, Trainer

    images, hc = generate(tiny_clip, PROMPTS, [0, 1, 2, 3], num_inference_steps=2, guidance_scale=1.0)
    decoders = _decoders(hc, images, ("semantic", "depth", "instance"))
    class_tokens = [list(tiny_clip.tokenizer(c["name"], add_special_tokens=False).input_ids) for c in CATS]
    inp = hypercolumn_input(hc, class_tokens, image_tensor(images), images.shape[1:3])
    for task, dec in decoders.items():
        dec.precision = torch.float32
        ref = dec(inp)
        dec.precision = torch.bfloat16
        low = dec(inp)
        x, y = (ref["log_depth"], low["log_depth"]) if task == "depth" else (ref["mask_logits"][-1], low["mask_logits"][-1])
        assert y.dtype == torch.float32 and y.shape == x.shape
        rel = (y - x).abs().mean() / x.abs().mean()
        assert rel < 0.05, (task, float(rel))
    dec = decoders["semantic"]
    dec.precision = torch.float32
    a = dec.predict(inp)
    dec.precision = torch.bfloat16
    b = dec.predict(inp)
    assert np.mean([(x["semantic"] == y["semantic"]).mean() for x, y in zip(a, b)]) >= 0.9

    from datasetdm.formats.sample import LabelledSample

    sem = np.zeros(images.shape[1:3], np.uint8)
    sem[4:20, 6:24] = 1
    targets = [dec.targets(LabelledSample(id=str(i), image=im, semantic=sem)) for i, im in enumerate(images)]
    trainer = Trainer(dec, inp, targets, TrainOptions(device="cpu", dtype="bf16", batch_size=4, iterations=3, warmup=1))
    assert dec.precision == torch.bfloat16 and not trainer.scaler.is_enabled()
    losses = [trainer.step()["loss"] for _ in range(3)]
    assert all(np.isfinite(losses)) and all(p.dtype == torch.float32 for p in dec.parameters())


def test_train_and_generate_in_bf16(tiny_clip_path, tmp_path, capsys, monkeypatch):
    """`train --dtype bf16` caches bf16 features under their own key; `generate --dtype bf16` records
    the precision in the run's settings, so a resume in fp32 is refused rather than mixing them."""
    import json

    from datasetdm.formats.labelled_folder import LabelledFolderWriter
    from datasetdm.world.render import CATEGORIES, render_scene

    data = tmp_path / "data"
    with LabelledFolderWriter(data, list(CATEGORIES)) as w:
        for i in range(3):
            w.add(render_scene("train", 0, i))
    ckpt = tmp_path / "sem"
    code, out, err = run_cli(capsys, monkeypatch, "train", "--data", data, "--task", "semantic", "--out", ckpt,
                             "--backbone", tiny_clip_path, "--iterations", "2", "--views", "1", "--batch-size", "2",
                             "--dtype", "bf16", "--device", "auto", "--keep-cache", "--no-progress")
    assert code == 0, err
    assert json.loads(out.splitlines()[-1])["checkpoint"] == str(ckpt)
    shards = list((tmp_path / "sem.work").glob("features-*/shard-*.safetensors"))
    assert shards
    run = tmp_path / "run"
    args = ["generate", "--decoder", ckpt, "--out", run, "--n", "2", "--steps", "2", "--batch-size", "2",
            "--backbone", tiny_clip_path]
    code, _, err = run_cli(capsys, monkeypatch, *args, "--dtype", "bf16")
    assert code == 0, err
    assert json.loads((run / "run.json").read_text())["config"]["dtype"] == "bf16"
    code, _, err = run_cli(capsys, monkeypatch, *args, "--dtype", "fp32", "--resume")
    assert code == 2 and "dtype" in err, err
