"""The class-prompt side branch: attention of the image queries to extra class-prompt tokens."""

import numpy as np
import pytest
import torch

from datasetdm.backbone.capture import capture_hypercolumns, capture_real, generate
from datasetdm.errors import DatasetdmError


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(n)]


def test_generate_image_identical_with_class_branch(tiny_clip):
    bb = tiny_clip
    prompts, seeds = ["a dog on grass", "a red car"], [5, 6]
    cls, _ = bb.encode_prompt(["dog car grass"])  # (1, 77, D): one class prompt for the batch
    kw = dict(num_inference_steps=3, guidance_scale=4.0, self_attention_res=(4,))
    img0, hc0 = generate(bb, prompts, seeds, **kw)
    img1, hc1 = generate(bb, prompts, seeds, class_prompt_embeds=cls, **kw)
    assert np.array_equal(img0, img1)  # the side branch does not touch the image
    assert hc0.class_attention is None  # not asked for, not computed
    for a, b in zip(hc0.features + hc0.cross_attention, hc1.features + hc1.cross_attention):
        assert torch.equal(a, b)
    assert torch.equal(hc0.self_attention[4], hc1.self_attention[4])
    assert [tuple(a.shape) for a in hc1.class_attention] == [(2, 77, h, w) for h, w in hc1.resolutions]
    for a in hc1.class_attention:
        torch.testing.assert_close(a.sum(1), torch.ones(a.shape[0], *a.shape[2:]))
    # a different token set than the prompts': its maps differ from the prompt maps
    assert not torch.allclose(hc1.class_attention[0], hc1.cross_attention[0], atol=1e-3)
    # sub-batches carry the branch along
    assert hc1.select(1).class_attention[0].shape[0] == 1 and hc1.to(dtype=torch.float64).class_attention[0].dtype == torch.float64


def test_class_branch_uses_layer_keys_on_conditional_half(tiny_bert):
    """With the prompts' own embeddings as class prompt, the branch must reproduce the prompt maps:
    same to_k, same queries (the conditional half under CFG), same averaging."""
    bb = tiny_bert
    prompts, seeds = ["a dog", "two cats on a sofa"], [1, 2]
    cond, _ = bb.encode_prompt(prompts)
    _, hc = generate(bb, prompts, seeds, num_inference_steps=2, guidance_scale=5.0, capture_step=0,
                     class_prompt_embeds=cond)
    for c, a in zip(hc.class_attention, hc.cross_attention):
        torch.testing.assert_close(c, a, atol=1e-6, rtol=1e-5)
    # swapped rows: each sample's class maps come from its own row of class_prompt_embeds
    _, hc_sw = generate(bb, prompts, seeds, num_inference_steps=2, guidance_scale=5.0, capture_step=0,
                        class_prompt_embeds=cond.flip(0))
    assert not torch.allclose(hc_sw.class_attention[0][0], hc.cross_attention[0][0], atol=1e-4)


def test_capture_real_class_branch(tiny_clip):
    bb = tiny_clip
    cls, _ = bb.encode_prompt(["a photo of a dog"])
    plain = capture_real(bb, _images(2), ["a photo of a dog", "a cat"], seeds=[0, 1])
    hc = capture_real(bb, _images(2), ["a photo of a dog", "a cat"], seeds=[0, 1], class_prompt_embeds=cls)
    for a, b in zip(plain.features + plain.cross_attention, hc.features + hc.cross_attention):
        assert torch.equal(a, b)
    # sample 0's prompt is the class prompt: its maps coincide; sample 1's do not
    for c, a in zip(hc.class_attention, hc.cross_attention):
        torch.testing.assert_close(c[0], a[0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(c.sum(1), torch.ones(2, *c.shape[2:]))
    assert not torch.allclose(hc.class_attention[0][1], hc.cross_attention[0][1], atol=1e-4)


def test_class_branch_errors(tiny_clip):
    bb = tiny_clip
    with pytest.raises(DatasetdmError, match=r"class_prompt_embeds of shape \(1, 77, 7\)"):
        generate(bb, ["a"], [0], num_inference_steps=1, class_prompt_embeds=torch.zeros(1, 77, 7))
    with pytest.raises(DatasetdmError, match=r"expected \(2 or 1, Tc"):
        capture_real(bb, _images(2), "a", class_prompt_embeds=torch.zeros(3, 4, 32))
    with pytest.raises(DatasetdmError, match="needs capture=True"):
        generate(bb, ["a"], [0], num_inference_steps=1, capture=False, class_prompt_embeds=torch.zeros(1, 4, 32))


def test_processors_restored_after_error(tiny_clip):
    unet = tiny_clip.unet
    before = unet.attn_processors
    with pytest.raises(RuntimeError):
        with capture_hypercolumns(unet, (16, 16), self_attention_res=(16,)) as rec, torch.no_grad():
            with rec.capturing():
                unet(torch.zeros(1, 4, 16, 16), 1, encoder_hidden_states=torch.zeros(1, 77, 5))  # wrong width
    after = unet.attn_processors
    assert all(after[k] is before[k] for k in before)
    assert not unet.up_blocks[0].upsamplers[0]._forward_pre_hooks


def test_generate_checks_self_attention_res_before_denoising(tiny_clip, monkeypatch):
    calls = []
    monkeypatch.setattr(tiny_clip.unet, "forward", lambda *a, **k: calls.append(1))
    with pytest.raises(DatasetdmError, match=r"self_attention_res \[3\]"):
        generate(tiny_clip, ["a"], [0], num_inference_steps=2, self_attention_res=(3,))
    assert not calls
