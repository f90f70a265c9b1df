"""P-Decoder: every head through one interface, inputs, checkpoints (tiny random tensors)."""

import json
import re

import numpy as np
import pytest
import torch

from datasetdm.backbone.hypercolumns import Hypercolumns
from datasetdm.decoder import TASKS, DecoderConfig, DecoderInput, PDecoder, build_decoder
from datasetdm.decoder.checkpoint import load_decoder, save_decoder
from datasetdm.decoder.heads import FLIP_PAIRS
from datasetdm.decoder.inputs import class_attention_maps, raw_pixel_input
from datasetdm.decoder.losses import gaussian_heatmaps, heatmap_peaks
from datasetdm.errors import DatasetdmError
from datasetdm.formats.sample import Instance, LabelledSample
from datasetdm.training import augment
from datasetdm.world.render import CATEGORIES, render_scene

CATS = [{"id": c.id, "name": c.name, **({"keypoints": list(c.keypoints)} if c.keypoints else {})} for c in CATEGORIES]
CHS, SIZES, K = [8, 16, 16, 32], [16, 8, 4, 2], len(CATS)


def tiny_config(task, **kw):
    return DecoderConfig(task=task, categories=CATS, feature_channels=CHS, feature_sizes=[[s, s] for s in SIZES],
                         image_size=[64, 64], dim=32, num_queries=8, layers=3, ffn_dim=64,
                         text_dim=24 if task == "open-vocab" else 0, backbone={"fingerprint": "fp-a"}, **kw)


def tiny_input(B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return DecoderInput([torch.randn(B, c, s, s, generator=g) for c, s in zip(CHS, SIZES)],
                        [torch.rand(B, K, s, s, generator=g) for s in SIZES], torch.rand(B, 3, 64, 64, generator=g), (64, 64))


def forward_kw(task):
    if task != "open-vocab":
        return {}
    return {"text_embeddings": torch.randn(K, 24, generator=torch.Generator().manual_seed(1)),
            "class_index": list(range(K))}


def first_scene(accept, split="train", seed=0, limit=200):
    """The first world scene (by index) that ``accept`` takes: a deterministic search, so the tests
    keep their subject (people, several objects) if the renderer's random draws change."""
    for i in range(limit):
        s = render_scene(split, seed, i)
        if accept(s):
            return s
    raise AssertionError(f"no {split} scene in the first {limit} passes the filter")


def people(s):
    return [i for i in s.instances if i.keypoints is not None and (i.keypoints[:, 2] > 0).sum() >= 10]


@pytest.fixture(scope="module")
def samples():
    # [0]: a person among other objects; [1]: two people (pose with several people per image)
    mixed = first_scene(lambda s: len(people(s)) == 1 and len(s.instances) >= 3)
    crowd = first_scene(lambda s: len(people(s)) >= 2)
    return [mixed, crowd]


@pytest.mark.parametrize("task", TASKS)
def test_every_head_forward_loss_backward_predict(task, samples):
    torch.manual_seed(0)
    dec = build_decoder(tiny_config(task))
    inp, kw = tiny_input(), forward_kw(task)
    out = dec(inp, **kw)
    targets = [dec.targets(s) for s in samples]
    loss, parts = dec.loss(out, targets)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    assert parts and all(torch.isfinite(v) for v in parts.values())
    loss.backward()
    grads = [p.grad for p in dec.parameters() if p.requires_grad]
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads) > 0.8 * len(grads)
    # the fusion conv sees the features: their gradient must be non-zero
    assert dec.fusion.convs[0][0].weight.grad.abs().sum() > 0
    preds = dec.predict(inp, **kw)
    assert len(preds) == 2
    for p in preds:
        if task in ("semantic", "open-vocab"):
            assert p["semantic"].shape == (64, 64) and p["semantic"].dtype == np.uint8
            assert set(np.unique(p["semantic"])) <= {0} | {c["id"] for c in CATS}
            if task == "semantic":  # the winning share of K + 1 classes: from 1 / (K + 1) to 1
                assert 1 / (K + 1) <= p["confidence"] <= 1
        elif task == "depth":
            assert p["depth"].shape == (64, 64) and p["depth"].dtype == np.float32 and (p["depth"] > 0).all()
        else:
            for inst in p["instances"]:
                assert isinstance(inst, Instance) and inst.mask.shape == (64, 64) and inst.mask.dtype == bool
                assert 0 <= inst.score <= 1
                if task == "pose":
                    assert inst.category_id == 1 and inst.keypoints.shape == (17, 3)
                # predictions fit the shared sample type
                LabelledSample(id="x", image=np.zeros((64, 64, 3), np.uint8), instances=[inst])


def test_open_vocab_accepts_unseen_class_names(samples):
    dec = build_decoder(tiny_config("open-vocab"))
    inp = tiny_input()
    # three classes asked for, one an arbitrary new name: any number of classes works
    emb = torch.randn(3, 24)
    (p, _) = dec.predict(inp, text_embeddings=emb, class_index=[0, 1, 2], class_ids=[1, 2, 42])
    assert set(np.unique(p["semantic"])) <= {0, 1, 2, 42}


def test_image_path_is_optional_and_changes_resolution():
    with_img = build_decoder(tiny_config("depth"))
    without = build_decoder(tiny_config("depth", use_image=False))
    assert len(with_img.pixel_decoder.image_stems) == 2  # 16 → 32 → 64
    assert len(without.pixel_decoder.image_stems) == 0
    assert without(tiny_input())["log_depth"].shape == (2, 64, 64)


def test_class_attention_maps_pick_class_tokens():
    # prompt tokens: [bos, a, photo, of, a, CAT(7), DOG(8, 9), eos]; T = 8
    ids = torch.tensor([[0, 1, 2, 3, 1, 7, 8, 9]])
    att = torch.zeros(1, 8, 2, 2)
    att[0, 5, 0, 0] = 0.4  # cat's token attends to top-left
    att[0, 6, 1, 1] = 0.2  # dog's two tokens to bottom-right
    att[0, 7, 1, 1] = 0.4
    hc = Hypercolumns(features=[torch.zeros(1, 1, 2, 2)], cross_attention=[att], input_ids=ids)
    (maps,) = class_attention_maps(hc, [[7], [8, 9], [5]])
    assert maps.shape == (1, 3, 2, 2)
    assert maps[0, 0, 0, 0] == 1 and maps[0, 0].sum() == 1  # rescaled to max 1
    assert maps[0, 1, 1, 1] == 1 and maps[0, 1, 0, 0] == 0
    assert maps[0, 2].abs().sum() == 0  # class not in the prompt → zero map


def test_raw_pixel_input_is_lossless_pyramid():
    img = torch.rand(1, 3, 64, 64)
    inp = raw_pixel_input(img, num_classes=4)
    assert [tuple(f.shape[-2:]) for f in inp.features] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert inp.features[0].shape[1] == 48 and inp.class_attention[0].shape == (1, 4, 16, 16)
    assert torch.equal(torch.nn.functional.pixel_shuffle(inp.features[0], 4), img)


def test_heatmap_peaks_recover_subpixel_keypoints():
    kp = torch.tensor([[[10.0, 20.0, 2], [30.3, 5.6, 1], [0, 0, 0]] + [[40.0, 40.0, 2]] * 14])
    hm = gaussian_heatmaps(kp, (64, 64))
    assert hm.shape == (1, 17, 64, 64) and hm[0, 2].sum() == 0  # unlabelled joint: empty map
    assert hm[0, 0, 20, 10] == 1  # integer pixel-centre convention
    peaks = heatmap_peaks(hm)
    assert torch.allclose(peaks[0, [0, 1], :2], kp[0, [0, 1], :2], atol=0.15)


def test_augment_moves_labels_with_the_image(samples):
    s = samples[0]
    person = people(s)[0]
    found_flip = False
    for seed in range(6):
        v = augment(s, np.random.default_rng(seed), (64, 64))
        assert v.image.shape == (64, 64, 3) and v.semantic.shape == (64, 64) and v.depth.shape == (64, 64)
        for inst in v.instances:
            assert inst.mask.any()
            # masks stay consistent with the semantic map
            assert (v.semantic[inst.mask] == inst.category_id).mean() > 0.9
            if inst.keypoints is not None:
                vis = inst.keypoints[:, 2] == 2
                xy = np.round(inst.keypoints[vis, :2]).astype(int)
                ok = inst.mask[np.clip(xy[:, 1], 0, 63), np.clip(xy[:, 0], 0, 63)]
                assert ok.mean() > 0.7  # visible joints lie on their person
                # left/right swapped under flips: left shoulder keeps its side relative to nose? check via flip test below
    # exact flip: scale 1, a flip → mirrored image and keypoints
    class Rng:
        def uniform(self, a, b): return 1.0
        def integers(self, a, b): return 0
        def random(self): return 0.0
    v = augment(s, Rng(), (64, 64))
    assert np.array_equal(v.image, s.image[:, ::-1])
    assert np.array_equal(v.semantic, s.semantic[:, ::-1]) and np.array_equal(v.depth, s.depth[:, ::-1])
    (p2,) = people(v)
    assert np.array_equal(p2.mask, person.mask[:, ::-1])
    k, k2 = person.keypoints, p2.keypoints
    swap = dict(FLIP_PAIRS + tuple((b, a) for a, b in FLIP_PAIRS))
    for j in range(17):  # joint j lands, mirrored, in its left/right partner's slot (nose stays 0)
        m = swap.get(j, j)
        assert k2[m, 2] == k[j, 2]
        if k[j, 2] > 0:
            assert abs(k2[m, 0] - (63 - k[j, 0])) < 1e-4 and abs(k2[m, 1] - k[j, 1]) < 1e-4


def test_checkpoint_round_trip_and_refusals(tmp_path):
    torch.manual_seed(0)
    dec = build_decoder(tiny_config("open-vocab"))
    dec.head.text_embeddings.normal_()  # what training stores: every category's name embedding
    inp = tiny_input()
    before = dec.predict(inp)[0]["semantic"]
    ck = save_decoder(dec, tmp_path / "ck", info={"note": 1})
    assert sorted(p.name for p in ck.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((ck / "config.json").read_text())
    assert config["decoder"]["task"] == "open-vocab" and config["decoder"]["categories"] == CATS
    assert config["decoder"]["backbone"] == {"fingerprint": "fp-a"} and config["info"] == {"note": 1}
    loaded = load_decoder(ck, task="open-vocab", backbone="fp-a")
    assert isinstance(loaded, PDecoder) and not loaded.training
    assert loaded.cfg.task == "open-vocab" and loaded.cfg.categories == CATS and loaded.checkpoint_path == ck
    assert torch.equal(loaded.head.text_embeddings, dec.head.text_embeddings)
    # without text embeddings, an open-vocab decoder labels its own categories with the stored ones
    assert np.array_equal(loaded.predict(inp)[0]["semantic"], before)
    with pytest.raises(DatasetdmError, match=f"{re.escape(str(ck))}: decoder was trained for task 'open-vocab', not 'depth'"):
        load_decoder(ck, task="depth")
    with pytest.raises(DatasetdmError, match=f"{re.escape(str(ck))}: .*fingerprint fp-a.*fingerprint fp-b"):
        load_decoder(ck, backbone="fp-b")
    with pytest.raises(DatasetdmError, match=f"{re.escape(str(ck))}: .*fingerprint fp-a.*fingerprint fp-b"):
        loaded.check_backbone("fp-b")
    with pytest.raises(DatasetdmError, match="not a decoder checkpoint"):
        load_decoder(tmp_path / "nothing")
    # features of another shape (another backbone) are refused by name, not with a conv error
    bad = DecoderInput([f[:, :1] for f in inp.features], inp.class_attention, inp.image, inp.image_size)
    with pytest.raises(DatasetdmError, match=f"{re.escape(str(ck))}: features have channels \\[1, 1, 1, 1\\]"):
        loaded.predict(bad)
    (ck / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(DatasetdmError, match="model.safetensors"):
        load_decoder(ck)
    # overwriting replaces the directory as a whole and leaves no temporary siblings
    save_decoder(dec, ck)
    assert load_decoder(ck) is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    # anything that is not a checkpoint is never overwritten
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("x")
    with pytest.raises(DatasetdmError, match="exists and is not a decoder checkpoint"):
        save_decoder(dec, tmp_path / "data")
    assert (tmp_path / "data" / "keep.txt").read_text() == "x"


def test_raw_pixel_decoder_reads_the_image_whatever_it_is_given():
    cfg = DecoderConfig(task="semantic", categories=CATS, feature_channels=[48, 192, 768, 3072],
                        feature_sizes=[[16, 16], [8, 8], [4, 4], [2, 2]], image_size=[64, 64], features="raw-pixels",
                        attention=False, dim=32, num_queries=8, layers=3, ffn_dim=64)
    torch.manual_seed(0)
    dec = build_decoder(cfg)
    hyper = tiny_input()  # hypercolumn-shaped input (what generation passes): only its image is read
    raw = raw_pixel_input(hyper.image)
    assert np.array_equal(dec.predict(hyper)[0]["semantic"], dec.predict(raw)[0]["semantic"])


def test_semantic_confidence_and_uncertain_pixels():
    # Two queries, classes background/first/second: query 0 covers the left half with class 1 at
    # probability 0.9, query 1 the right half split 0.5 / 0.5 between classes 1 and 2. Each
    # pixel's winning share is then 0.9 / (0.9 + 0.05) on the left, 0.5 on the right.
    head = build_decoder(tiny_config("semantic")).head
    probs = torch.tensor([[0.05, 0.9, 0.0], [0.0, 0.5, 0.5]])
    logits = torch.log(torch.cat([probs, torch.full((2, 1), 0.05)], 1).clamp_min(1e-9))[None]
    masks = torch.full((1, 2, 4, 4), -30.0)
    masks[0, 0, :, :2] = 30.0
    masks[0, 1, :, 2:] = 30.0
    out = {"class_logits": [logits], "mask_logits": [masks], "image_size": (4, 4)}
    first, second = CATS[0]["id"], CATS[1]["id"]

    (plain,) = head.predict(out)
    left = 0.9 / 0.95
    assert plain["confidence"] == pytest.approx((left + 0.5) / 2, abs=1e-4)
    assert (plain["semantic"][:, :2] == first).all() and set(np.unique(plain["semantic"][:, 2:])) <= {first, second}

    (strict,) = head.predict(out, min_pixel_confidence=0.6)
    assert (strict["semantic"][:, :2] == first).all() and (strict["semantic"][:, 2:] == 255).all()
    assert strict["confidence"] == plain["confidence"]
