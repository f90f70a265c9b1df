"""Strided mask logits and point-sampled mask losses (issue 19 item 4): the defaults keep the old
decoder to the bit; the new path trains, predicts full-size labels, and its loss estimates the
dense one."""

import json
from types import SimpleNamespace

import pytest
import torch

from datasetdm.decoder import build_decoder
from datasetdm.decoder.build import resolve_mask_resolution
from datasetdm.decoder.checkpoint import load_decoder, save_decoder
from datasetdm.decoder.losses import importance_points, masked_bce_dice, point_mask_losses
from datasetdm.errors import DatasetdmError

from test_decoder import forward_kw, samples, tiny_config, tiny_input  # noqa: F401  (samples: a fixture)


def test_a_config_without_the_new_fields_loads_as_the_old_decoder(tmp_path):
    torch.manual_seed(0)
    dec = build_decoder(tiny_config("semantic")).eval()
    assert (dec.cfg.mask_stride, dec.cfg.point_loss_points) == (1, 0)
    ck = save_decoder(dec, tmp_path / "ck")
    config = json.loads((ck / "config.json").read_text())
    for key in ("mask_stride", "point_loss_points"):
        del config["decoder"][key]  # as every checkpoint written before the fields existed
    (ck / "config.json").write_text(json.dumps(config))
    loaded = load_decoder(ck)
    assert (loaded.cfg.mask_stride, loaded.cfg.point_loss_points) == (1, 0)
    assert loaded.head.criterion.num_points == 0
    inp = tiny_input()
    with torch.no_grad():
        want, got = dec(inp), loaded(inp)
    assert got["mask_logits"][-1].shape[-2:] == (64, 64)  # full resolution, as before
    for a, b in zip(want["mask_logits"], got["mask_logits"]):
        assert torch.equal(a, b)


def test_dense_losses_draw_no_random_points(samples):  # noqa: F811
    """The default loss consumes exactly the matcher's draws, as before the point losses existed."""
    torch.manual_seed(0)
    dec = build_decoder(tiny_config("semantic"))
    out = dec(tiny_input())
    targets = [dec.targets(s) for s in samples]
    torch.manual_seed(5)
    loss, _ = dec.loss(out, targets)
    after_loss = torch.rand(1)
    torch.manual_seed(5)
    for c, m in zip(out["class_logits"], out["mask_logits"]):
        dec.head.criterion.matcher.match(m, c, targets)
    assert torch.equal(after_loss, torch.rand(1))


def test_auto_rule():
    assert resolve_mask_resolution("semantic", (64, 64)) == (1, 0)  # the embedded backbone: old path
    assert resolve_mask_resolution("semantic", (255, 512)) == (1, 0)
    assert resolve_mask_resolution("semantic", (256, 256)) == (4, 4096)  # one point per logit pixel
    assert resolve_mask_resolution("instance", (512, 512)) == (4, 12544)  # Mask2Former's 112²
    assert resolve_mask_resolution("open-vocab", (512, 768)) == (4, 12544)
    assert resolve_mask_resolution("depth", (512, 512)) == (1, 0)
    assert resolve_mask_resolution("pose", (512, 512)) == (1, 12544)  # heatmaps at full resolution
    assert resolve_mask_resolution("semantic", (512, 512), 1, 0) == (1, 0)  # explicit values win
    assert resolve_mask_resolution("semantic", (64, 64), 2, "auto") == (2, 0)
    with pytest.raises(DatasetdmError, match="full resolution"):
        resolve_mask_resolution("depth", (512, 512), 4)
    with pytest.raises(DatasetdmError, match="at least 1"):
        resolve_mask_resolution("semantic", (512, 512), 0)
    with pytest.raises(DatasetdmError, match="≥ 0"):
        resolve_mask_resolution("semantic", (512, 512), 4, -1)
    with pytest.raises(ValueError, match="mask_stride"):
        build_decoder(tiny_config("pose", mask_stride=2))


def test_training_records_the_resolved_settings():
    from datasetdm.training import TrainOptions
    from datasetdm.training.trainer import make_decoder_config

    source = SimpleNamespace(kind="hypercolumns", description={"fingerprint": "fp"})
    cats = tiny_config("semantic").categories

    def cfg(size, **kw):
        inp = SimpleNamespace(features=[torch.zeros(1, 8, 4, 4)], image_size=(size, size))
        return make_decoder_config(TrainOptions(task="semantic", **kw), cats, inp, source)

    small, big = cfg(64), cfg(256)
    assert (small.mask_stride, small.point_loss_points) == (1, 0)
    assert (big.mask_stride, big.point_loss_points) == (4, 4096)
    assert big.to_dict()["mask_stride"] == 4  # written to config.json: the checkpoint describes itself
    forced = cfg(256, mask_stride=1, point_loss_points=0)
    assert (forced.mask_stride, forced.point_loss_points) == (1, 0)


def _pixel_centres(h, w):
    ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
    return torch.stack([xs, ys], -1).reshape(1, -1, 2)


def test_point_loss_at_every_pixel_centre_is_the_dense_loss():
    g = torch.Generator().manual_seed(0)
    N, H, W = 3, 8, 12
    logits = torch.randn(1, N, H, W, generator=g)
    masks = (torch.rand(N, H, W, generator=g) > 0.5).float()
    valid = (torch.rand(H, W, generator=g) > 0.2).float()  # ignore pixels stay ignored
    order = torch.tensor([2, 0, 1])
    targets = [{"masks": masks, "valid": valid}]
    points = _pixel_centres(H, W).expand(N, -1, -1)
    got = point_mask_losses(logits, [(torch.arange(N), order)], targets, 0, points=points)
    want = masked_bce_dice(logits[0], masks[order], valid[None].expand(N, -1, -1))
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5), (a, b)


def test_uniform_point_loss_estimates_the_dense_loss():
    """With constant logits the BCE is linear in the target, and a bilinear target read at uniform
    points (border padding) has the pixel mean as its expectation: point BCE → dense BCE."""
    g = torch.Generator().manual_seed(1)
    H = W = 16
    masks = (torch.rand(2, H, W, generator=g) > 0.6).float()
    logits = torch.full((1, 2, 4, 4), 0.7)  # at 1/4 of the target's resolution
    targets = [{"masks": masks, "valid": torch.ones(H, W)}]
    pairs = [(torch.arange(2), torch.arange(2))]
    torch.manual_seed(0)
    points = importance_points(logits[0], 200_000, importance=0.0)
    bce, dice = point_mask_losses(logits, pairs, targets, 0, points=points)
    dense_bce, dense_dice = masked_bce_dice(torch.full((2, H, W), 0.7), masks, torch.ones(2, H, W))
    assert abs(float(bce) - float(dense_bce)) < 0.01 * float(dense_bce)
    assert abs(float(dice) - float(dense_dice)) < 0.01 * float(dense_dice)


def test_importance_sampling_favours_uncertain_points():
    logits = torch.full((1, 32, 32), 8.0)
    logits[:, :, 16:] = -8.0
    logits[:, :, 15:17] = 0.0  # the uncertain band: 2 of 32 columns
    torch.manual_seed(0)
    pts = importance_points(logits, 1000)
    assert pts.shape == (1, 1000, 2) and bool(((pts >= 0) & (pts <= 1)).all())
    in_band = ((pts[0, :, 0] > 14.5 / 32) & (pts[0, :, 0] < 17.5 / 32)).float().mean()
    assert in_band > 0.15  # uniform points: ~0.09; the 3 × 1000 candidates hold ~280 band points


@pytest.mark.parametrize("task", ["semantic", "instance", "open-vocab"])
def test_strided_masks_with_point_losses_train_and_predict_full_size(task, samples):  # noqa: F811
    torch.manual_seed(0)
    dec = build_decoder(tiny_config(task, mask_stride=4, point_loss_points=128))
    inp, kw = tiny_input(), forward_kw(task)
    targets = [dec.targets(s) for s in samples]
    assert dec(inp, **kw)["mask_logits"][-1].shape[-2:] == (16, 16)  # 1/4 of 64 px
    opt = torch.optim.Adam(dec.parameters(), lr=1e-3)
    losses = []
    for step in range(20):
        torch.manual_seed(step)
        loss, _ = dec.loss(dec(inp, **kw), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5]), losses
    pred = dec.predict(inp, **kw)
    if task == "instance":
        assert all(i.mask.shape == (64, 64) for p in pred for i in p["instances"])
        assert any(p["instances"] for p in pred)
    else:
        assert all(p["semantic"].shape == (64, 64) for p in pred)


def test_pose_and_depth_keep_full_resolution_with_point_losses(samples):  # noqa: F811
    torch.manual_seed(0)
    for task in ("pose", "depth"):
        dec = build_decoder(tiny_config(task, point_loss_points=64 if task == "pose" else 0))
        out = dec(tiny_input())
        key = "heatmaps" if task == "pose" else "log_depth"
        assert out[key].shape[-2:] == (64, 64)
        loss, _ = dec.loss(out, [dec.targets(s) for s in samples])
        assert torch.isfinite(loss)
        loss.backward()
