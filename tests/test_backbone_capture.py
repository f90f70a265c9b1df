import copy

import numpy as np
import pytest
import torch
from diffusers import EulerAncestralDiscreteScheduler
from diffusers.models.attention_processor import AttnProcessor
from PIL import Image

from datasetdm.backbone.capture import capture_hypercolumns, capture_real, generate, preprocess_images
from datasetdm.errors import DatasetdmError


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(n)]


def _plain_feature_hooks(unet, store):
    """Reference: the same block points, read with plain forward hooks and no custom processors."""
    hooks = []
    for j, block in enumerate(unet.up_blocks):
        if block.upsamplers:
            hooks.append(block.upsamplers[0].register_forward_pre_hook(lambda m, a, j=j: store.__setitem__(j, a[0].clone())))
        else:
            hooks.append(block.register_forward_hook(lambda m, a, o, j=j: store.__setitem__(j, o.clone())))
    return hooks


class _RefProcessor(AttnProcessor):
    """diffusers' classic processor, keeping the probabilities it computes via get_attention_scores."""

    def __init__(self, store):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        cross = encoder_hidden_states is not None
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states if cross else hidden_states))
        probs = attn.get_attention_scores(q, k)  # (B*heads, hw, T or hw)
        key = ("cross" if cross else "self", probs.shape[1])
        self.store.setdefault(key, []).append(probs.view(-1, attn.heads, *probs.shape[1:]).mean(1))
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def test_shapes_at_four_resolutions(tiny_backbone):
    bb = tiny_backbone
    hc = capture_real(bb, _images(2), ["a photo of a dog", "a cat"], seeds=[0, 1])
    assert hc.resolutions == [(16, 16), (8, 8), (4, 4), (2, 2)]  # highest first
    assert [f.shape[1] for f in hc.features] == [8, 16, 16, 32]
    for a, (h, w) in zip(hc.cross_attention, hc.resolutions):
        assert a.shape == (2, 77, h, w)
        torch.testing.assert_close(a.sum(1), torch.ones(2, h, w))
    assert hc.self_attention == {}  # not requested, not materialised
    assert hc.input_ids.shape == (2, 77) and hc.prompts == ["a photo of a dog", "a cat"]
    assert hc.timestep == 1


def test_self_attention_only_where_requested(tiny_clip):
    hc = capture_real(tiny_clip, _images(1), "a dog", self_attention_res=(8,))
    assert set(hc.self_attention) == {8}
    s = hc.self_attention[8]
    assert s.shape == (1, 64, 64)
    torch.testing.assert_close(s.sum(-1), torch.ones(1, 64))


def test_features_and_output_equal_plain_run(tiny_clip):
    unet = tiny_clip.unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ctx, _ = tiny_clip.encode_prompt(["a dog", "a red car"])
    t = torch.tensor([10, 10])
    plain, capt = {}, {}
    hooks = _plain_feature_hooks(unet, plain)
    with torch.no_grad():
        out_plain = unet(x, t, encoder_hidden_states=ctx).sample
    for h in hooks:
        h.remove()
    before = unet.attn_processors
    with capture_hypercolumns(unet, (16, 16), self_attention_res=(16,)) as rec, torch.no_grad():
        rec.active = True
        out_capt = unet(x, t, encoder_hidden_states=ctx).sample
        hc = rec.hypercolumns(None, [], 10)
    # the wrappers leave the UNet's output untouched, and the originals come back afterwards
    torch.testing.assert_close(out_capt, out_plain, rtol=0, atol=0)
    after = unet.attn_processors
    assert all(after[k] is before[k] for k in before)
    assert [tuple(f.shape) for f in hc.features] == [tuple(plain[j].shape) for j in (3, 2, 1, 0)]
    for f, j in zip(hc.features, (3, 2, 1, 0)):
        torch.testing.assert_close(f, plain[j], rtol=0, atol=0)


def test_capture_real_features_are_the_unet_features(tiny_bert):
    plain = {}
    hooks = _plain_feature_hooks(tiny_bert.unet, plain)
    try:
        hc = capture_real(tiny_bert, _images(2), ["a dog", "a cat"], seeds=[3, 4])
    finally:
        for h in hooks:
            h.remove()
    for f, j in zip(hc.features, (3, 2, 1, 0)):
        torch.testing.assert_close(f, plain[j], rtol=0, atol=0)


def test_attention_equals_reference_average(tiny_clip):
    """Maps equal diffusers' own get_attention_scores, averaged over heads and layers per resolution."""
    unet = tiny_clip.unet
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    ctx, _ = tiny_clip.encode_prompt(["a photo of a dog"])
    t = torch.tensor([5])
    store = {}
    originals = dict(unet.attn_processors)
    unet.set_attn_processor(_RefProcessor(store))
    try:
        with torch.no_grad():
            unet(x, t, encoder_hidden_states=ctx)
    finally:
        unet.set_attn_processor(dict(originals))
    with capture_hypercolumns(unet, (16, 16), self_attention_res=(8, 4)) as rec, torch.no_grad():
        rec.active = True
        unet(x, t, encoder_hidden_states=ctx)
        hc = rec.hypercolumns(None, [], 5)
    # SD layout: per resolution 1 down + 2 up layers here (SD: 2 + 3), the lowest only the mid block's
    assert {hw: len(v) for (kind, hw), v in store.items() if kind == "cross"} == {256: 3, 64: 3, 16: 3, 4: 1}
    for a, (h, w) in zip(hc.cross_attention, hc.resolutions):
        ref = torch.stack(store["cross", h * w]).mean(0)  # (1, hw, T)
        torch.testing.assert_close(a, ref.transpose(1, 2).reshape(1, 77, h, w), atol=1e-6, rtol=1e-5)
    assert set(hc.self_attention) == {8, 4}
    for side, s in hc.self_attention.items():
        torch.testing.assert_close(s, torch.stack(store["self", side * side]).mean(0), atol=1e-6, rtol=1e-5)


def test_capture_real_batch_independent(tiny_bert):
    imgs, prompts, seeds = _images(3, seed=5), ["a dog", "a red car on a road", "two cats"], [11, 12, 13]
    batch = capture_real(tiny_bert, imgs, prompts, seeds=seeds, self_attention_res=(4,))
    alone = capture_real(tiny_bert, [imgs[1]], [prompts[1]], seeds=[seeds[1]], self_attention_res=(4,))
    one = batch.select(1)
    for a, b in zip(one.features + one.cross_attention, alone.features + alone.cross_attention):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(one.self_attention[4], alone.self_attention[4], atol=1e-5, rtol=1e-4)
    # and the seed matters: another seed gives other features
    other = capture_real(tiny_bert, [imgs[1]], [prompts[1]], seeds=[99], t=500)
    same_t = capture_real(tiny_bert, [imgs[1]], [prompts[1]], seeds=[seeds[1]], t=500)
    assert not torch.allclose(other.features[0], same_t.features[0])


def test_generate_batch_independent_with_stochastic_scheduler(tiny_clip):
    bb = copy.copy(tiny_clip)  # shallow: same modules, own scheduler
    bb.scheduler = EulerAncestralDiscreteScheduler.from_config(tiny_clip.scheduler.config)
    prompts, seeds = ["a dog", "a red car", "two cats"], [7, 8, 9]
    imgs, hc = generate(bb, prompts, seeds, num_inference_steps=3, guidance_scale=3.0)
    img1, hc1 = generate(bb, [prompts[2]], [seeds[2]], num_inference_steps=3, guidance_scale=3.0)
    assert imgs.shape == (3, 32, 32, 3) and imgs.dtype == np.uint8
    assert np.abs(imgs[2].astype(int) - img1[0].astype(int)).max() <= 1
    for a, b in zip(hc.select(2).features + hc.select(2).cross_attention, hc1.features + hc1.cross_attention):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # different seeds, different images
    assert np.abs(imgs[0].astype(int) - imgs[1].astype(int)).max() > 10


def test_generate_captures_conditional_half_at_chosen_step(tiny_bert):
    bb = tiny_bert
    seeds, prompts = [21, 22], ["a dog", "a cat"]
    _, hc = generate(bb, prompts, seeds, num_inference_steps=4, guidance_scale=5.0, capture_step=0)
    _, hc_plain = generate(bb, prompts, seeds, num_inference_steps=4, guidance_scale=5.0, capture=False)
    assert hc_plain is None
    # reproduce step 0 by hand: initial noise from each seed, conditional context only
    sched = type(bb.scheduler).from_config(bb.scheduler.config)
    sched.set_timesteps(4)
    t0 = sched.timesteps[0]
    assert hc.timestep == int(t0)
    x = torch.cat([torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(s)) for s in seeds])
    x = sched.scale_model_input(x * sched.init_noise_sigma, t0)
    cond, _ = bb.encode_prompt(prompts)
    uncond, _ = bb.encode_prompt(["", ""])
    feats = {}
    for name, ctx in (("cond", cond), ("uncond", uncond)):
        store = {}
        hooks = _plain_feature_hooks(bb.unet, store)
        with torch.no_grad():
            bb.unet(x, t0, encoder_hidden_states=ctx)
        for h in hooks:
            h.remove()
        feats[name] = store[3]
    torch.testing.assert_close(hc.features[0], feats["cond"], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(hc.features[0], feats["uncond"], atol=1e-3)


def test_generate_without_guidance_and_last_step(tiny_clip):
    imgs, hc = generate(tiny_clip, ["a dog"], [1], num_inference_steps=2, guidance_scale=1.0)
    sched = type(tiny_clip.scheduler).from_config(tiny_clip.scheduler.config)
    sched.set_timesteps(2)
    assert hc.timestep == int(sched.timesteps[-1])
    assert hc.batch_size == 1 and imgs.shape == (1, 32, 32, 3)


def test_real_images_odd_sizes_gray_rgba_16bit(tiny_clip, tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    gray = Image.fromarray(rng.integers(0, 256, (61, 19), dtype=np.uint8), mode="L")
    rgba = np.concatenate([rgb, np.zeros((37, 53, 1), np.uint8)], axis=-1)  # fully transparent
    sixteen = (rng.integers(0, 65536, (45, 45), dtype=np.uint16))
    Image.fromarray(sixteen).save(tmp_path / "d.png")
    png16 = Image.open(tmp_path / "d.png")
    assert png16.mode.startswith("I")
    tensor = torch.rand(3, 70, 33)
    hc = capture_real(tiny_clip, [rgb, gray, Image.fromarray(rgba), png16, tensor], "a photo", seeds=[0] * 5)
    assert hc.batch_size == 5 and hc.resolutions[0] == (16, 16)

    px = preprocess_images([gray, Image.fromarray(rgba), png16, sixteen], (32, 32))
    assert px.shape == (4, 3, 32, 32) and px.min() >= -1 and px.max() <= 1
    assert torch.equal(px[0, 0], px[0, 1]) and torch.equal(px[0, 0], px[0, 2])  # gray -> 3 equal channels
    torch.testing.assert_close(px[1], torch.ones(3, 32, 32))  # transparent -> white
    torch.testing.assert_close(px[2], px[3])  # the 16-bit file keeps its 16-bit values
    # 16-bit precision survives: the low byte changes the result
    low = preprocess_images([sixteen & 0xFF00], (45, 45))
    full = preprocess_images([sixteen], (45, 45))
    assert 0 < (full - low).abs().max() < 2 * 256 / 65535 + 1e-6


def test_only_requested_self_attention_layers_are_wrapped(tiny_clip):
    unet = tiny_clip.unet
    with capture_hypercolumns(unet, (16, 16), self_attention_res=(8,)):
        procs = unet.attn_processors
    wrapped = {n for n, p in procs.items() if type(p).__name__ == "CaptureAttnProcessor"}
    cross = {n for n in procs if n.endswith("attn2.processor")}
    # self-attention at side 8 = level 1: down_blocks.1 and up_blocks.2 (of 4); every cross layer
    self_wrapped = sorted(n for n in wrapped - cross)
    assert self_wrapped and all(n.startswith(("down_blocks.1.", "up_blocks.2.")) for n in self_wrapped)
    assert cross <= wrapped
    with pytest.raises(DatasetdmError, match=r"self_attention_res \[7\]"):
        capture_hypercolumns(unet, (16, 16), self_attention_res=(7,))


def test_input_errors(tiny_clip):
    with pytest.raises(DatasetdmError, match="multiples of 16"):
        capture_real(tiny_clip, _images(1), "a", size=(40, 40))
    with pytest.raises(DatasetdmError, match="2 seeds for 1 prompts"):
        capture_real(tiny_clip, _images(1), "a", seeds=[1, 2])
    with pytest.raises(DatasetdmError, match="5 channels"):
        capture_real(tiny_clip, [torch.rand(5, 8, 8)], "a")
    with pytest.raises(DatasetdmError, match="capture_step=5"):
        generate(tiny_clip, ["a"], [0], num_inference_steps=3, capture_step=5)
    with pytest.raises(DatasetdmError, match="timestep t=1000"):
        capture_real(tiny_clip, _images(1), "a", t=1000)


def test_png_files_palette_la_rgba_16bit(tiny_bert, tmp_path):
    """Files as users have them: read back from PNG, every mode ends up as RGB in [-1, 1]."""
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (27, 41, 3), dtype=np.uint8)
    alpha = np.full((27, 41, 1), 255, np.uint8)
    alpha[:, :20] = 0  # left part transparent -> white
    Image.fromarray(np.concatenate([rgb, alpha], -1), mode="RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=8).save(tmp_path / "p.png")
    gray = rng.integers(0, 256, (27, 41), dtype=np.uint8)
    Image.fromarray(np.stack([gray, np.full_like(gray, 255)], -1), mode="LA").save(tmp_path / "la.png")
    Image.fromarray((gray.astype(np.uint16) * 257)).save(tmp_path / "g16.png")  # 16-bit, same values
    files = [Image.open(tmp_path / f) for f in ("rgba.png", "p.png", "la.png", "g16.png")]
    assert [f.mode for f in files][:3] == ["RGBA", "P", "LA"] and files[3].mode.startswith("I")
    px = preprocess_images(files, (27, 41))
    assert px.shape == (4, 3, 27, 41)
    torch.testing.assert_close(px[0, :, :, :20], torch.ones(3, 27, 20))
    torch.testing.assert_close(px[0, :, :, 20:], torch.from_numpy(rgb[:, 20:]).permute(2, 0, 1).float() / 127.5 - 1)
    # a palette image is expanded to its colours, not read as indices
    pal_rgb = np.array(files[1].convert("RGB"))
    torch.testing.assert_close(px[1], torch.from_numpy(pal_rgb).permute(2, 0, 1).float() / 127.5 - 1)
    torch.testing.assert_close(px[2], px[3])  # 8-bit LA and its 16-bit twin agree
    hc = capture_real(tiny_bert, files, "a photo", seeds=[0, 1, 2, 3])
    assert hc.batch_size == 4 and all(torch.isfinite(f).all() for f in hc.features)
