"""P-Decoder: every head through one interface, inputs, checkpoints (tiny random tensors)."""

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

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


# every head: each task's, and the per-pixel semantic head beside mask classification
HEAD_SPECS = [*TASKS, "semantic:pixels"]


@pytest.mark.parametrize("spec", HEAD_SPECS)
def test_every_head_forward_loss_backward_predict(spec, samples):
    task, _, semantic_head = spec.partition(":")
    torch.manual_seed(0)
    dec = build_decoder(tiny_config(task, **({"semantic_head": semantic_head} if semantic_head else {})))
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


# ------------------------------------------------------------------ matcher and transformer decoder
def _brute_force_cost(cost: np.ndarray) -> float:
    """Least total cost of a one-to-one assignment of min(Q, N) pairs, by trying every one."""
    import itertools

    q, n = cost.shape
    if q >= n:
        return min(sum(cost[r, c] for c, r in enumerate(rows)) for rows in itertools.permutations(range(q), n))
    return min(sum(cost[r, c] for r, c in enumerate(cols)) for cols in itertools.permutations(range(n), q))


@pytest.mark.parametrize("shape", [(1, 1), (3, 3), (5, 3), (3, 5), (6, 6), (7, 2)])
def test_assignment_is_the_least_cost_one(shape):
    from datasetdm.decoder.matcher import assign

    rng = np.random.default_rng(sum(shape))
    for trial in range(20):
        cost = rng.normal(size=shape).astype(np.float32)
        if trial % 4 == 3:
            cost = np.round(cost)  # ties
        rows, cols = assign(torch.from_numpy(cost))
        assert len(rows) == len(cols) == min(shape)
        assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
        assert rows.tolist() == sorted(rows.tolist())
        assert cost[rows.numpy(), cols.numpy()].sum() == pytest.approx(_brute_force_cost(cost), abs=1e-5)


def test_assignment_takes_a_broken_cost_only_when_nothing_else_is_left():
    from datasetdm.decoder.matcher import assign

    cost = torch.tensor([[float("nan"), 5.0], [1.0, float("inf")], [2.0, 3.0]])
    rows, cols = assign(cost)
    assert dict(zip(rows.tolist(), cols.tolist())) == {1: 0, 2: 1}
    rows, cols = assign(torch.tensor([[float("nan")]]))
    assert (rows.tolist(), cols.tolist()) == ([0], [0])


def test_matcher_finds_the_least_cost_matching_of_masks_and_classes():
    from datasetdm.decoder.matcher import HungarianMatcher, match_cost

    g = torch.Generator().manual_seed(3)
    Q, C, H = 6, 5, 16
    mask_logits, class_logits = torch.randn(2, Q, H, H, generator=g) * 3, torch.randn(2, Q, C, generator=g)
    boxes = torch.zeros(4, 32, 32)
    for i, (y, x) in enumerate([(0, 0), (0, 16), (16, 0), (8, 8)]):
        boxes[i, y : y + 16, x : x + 16] = 1
    targets = [{"masks": boxes, "labels": torch.tensor([0, 3, 3, 1])},
               {"masks": torch.zeros(0, 32, 32), "labels": torch.zeros(0, dtype=torch.long)}]
    matcher = HungarianMatcher(num_points=256)
    torch.manual_seed(11)
    (rows, cols), (empty_q, empty_t) = matcher.match(mask_logits, class_logits, targets)
    assert len(empty_q) == len(empty_t) == 0  # an image without targets
    torch.manual_seed(11)  # the same points the matcher drew
    cost = match_cost(mask_logits[0], class_logits[0], targets[0]["masks"], targets[0]["labels"], torch.rand(256, 2),
                      2.0, 5.0, 5.0).numpy()
    assert sorted(cols.tolist()) == [0, 1, 2, 3]
    assert cost[rows.numpy(), cols.numpy()].sum() == pytest.approx(_brute_force_cost(cost), abs=1e-4)
    # a query that predicts a target's mask and class exactly is matched to it
    mask_logits[0, 2] = F.interpolate(targets[0]["masks"][None, 1:2], size=(H, H))[0, 0] * 40 - 20
    class_logits[0, 2] = -20
    class_logits[0, 2, 3] = 20
    rows, cols = matcher.match(mask_logits, class_logits, targets[:1])[0]
    assert dict(zip(rows.tolist(), cols.tolist()))[2] == 1


def _mask2former_reference():
    """transformers' own Mask2Former classes, when the installed version still has them (internal
    API: they are what version-1 decoder checkpoints were trained with)."""
    try:
        from transformers.models.mask2former import configuration_mask2former as conf
        from transformers.models.mask2former import modeling_mask2former as model

        return conf, model
    except ImportError:
        pytest.skip("this transformers has no Mask2Former classes to compare with")


def test_transformer_decoder_and_matcher_compute_what_mask2former_did():
    """The redesign changes no result: with the same weights (renamed by ``upgrade_legacy_keys``)
    the own decoder gives Mask2Former's states and masks, and the matcher its matches."""
    from datasetdm.decoder.matcher import HungarianMatcher
    from datasetdm.decoder.transformer import MaskedAttentionDecoder, upgrade_legacy_keys

    conf, model = _mask2former_reference()
    dim, heads, ffn, layers = 32, 4, 64, 3
    torch.manual_seed(0)
    reference = model.Mask2FormerMaskedAttentionDecoder(conf.Mask2FormerConfig(
        hidden_dim=dim, num_attention_heads=heads, dim_feedforward=ffn, decoder_layers=layers + 1,
        mask_feature_size=dim, dropout=0.0, pre_norm=False, backbone_config=None, use_pretrained_backbone=False)).eval()
    positions = model.Mask2FormerSinePositionEmbedding(num_position_features=dim // 2, normalize=True)
    ours = MaskedAttentionDecoder(dim, heads, ffn, layers).eval()
    legacy = {f"head.transformer.decoder.{k}": v for k, v in reference.state_dict().items()}
    legacy["head.transformer.level_embed.weight"] = ours.level_embed.weight.detach().clone()
    upgraded = upgrade_legacy_keys(legacy)
    ours.load_state_dict({k.removeprefix("head.transformer."): v for k, v in upgraded.items()})

    B, Q = 2, 8
    levels = [torch.randn(B, dim, s, s) for s in (4, 8, 16)]
    pixels, queries, query_pos = torch.randn(B, dim, 32, 32), torch.randn(B, Q, dim), torch.randn(B, Q, dim)
    with torch.no_grad():
        expected = reference(
            inputs_embeds=queries.transpose(0, 1),
            multi_stage_positional_embeddings=[positions(x.shape, x.device, x.dtype).flatten(2).permute(2, 0, 1)
                                               for x in levels],
            pixel_embeddings=pixels,
            encoder_hidden_states=[(x.flatten(2) + ours.level_embed.weight[i][None, :, None]).permute(2, 0, 1)
                                   for i, x in enumerate(levels)],
            query_position_embeddings=query_pos.transpose(0, 1),
            feature_size_list=[x.shape[-2:] for x in levels], return_dict=True)
        states, masks = ours(levels, pixels, queries, query_pos)
    assert len(states) == len(masks) == layers + 1
    for want, got in zip(expected.intermediate_hidden_states, states):
        torch.testing.assert_close(got, want.transpose(0, 1), atol=1e-5, rtol=1e-5)
    for want, got in zip(expected.masks_queries_logits, masks):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    targets = [{"masks": (torch.rand(3, 64, 64) > 0.5).float(), "labels": torch.tensor([0, 2, 4])},
               {"masks": (torch.rand(5, 64, 64) > 0.7).float(), "labels": torch.tensor([1, 1, 2, 3, 0])}]
    class_logits = torch.randn(B, Q, 6)
    their = model.Mask2FormerHungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=1024)
    torch.manual_seed(5)
    want = [their(masks[-1][b : b + 1], class_logits[b : b + 1], [t["masks"]], [t["labels"]])[0]
            for b, t in enumerate(targets)]
    torch.manual_seed(5)
    got = HungarianMatcher().match(masks[-1], class_logits, targets)
    assert [(q.tolist(), t.tolist()) for q, t in got] == [(q.tolist(), t.tolist()) for q, t in want]


def test_transformer_decoder_starts_from_mask2formers_initial_weights():
    """The redesign changes no result from the very start: at one seed the own decoder draws the
    initial weights version-1 decoders (transformers' classes, level embedding first) drew."""
    from torch import nn

    from datasetdm.decoder.transformer import MaskedAttentionDecoder, upgrade_legacy_keys

    conf, model = _mask2former_reference()
    dim, heads, ffn, layers = 32, 4, 64, 3
    torch.manual_seed(0)
    level_embed = nn.Embedding(3, dim)  # the version-1 wrapper made it before the decoder
    reference = model.Mask2FormerMaskedAttentionDecoder(conf.Mask2FormerConfig(
        hidden_dim=dim, num_attention_heads=heads, dim_feedforward=ffn, decoder_layers=layers + 1,
        mask_feature_size=dim, dropout=0.0, pre_norm=False, backbone_config=None, use_pretrained_backbone=False))
    legacy = {f"transformer.decoder.{k}": v for k, v in reference.state_dict().items()}
    legacy["transformer.level_embed.weight"] = level_embed.weight.detach()
    want = {k.removeprefix("transformer."): v for k, v in upgrade_legacy_keys(legacy).items()}
    torch.manual_seed(0)
    got = MaskedAttentionDecoder(dim, heads, ffn, layers).state_dict()
    assert sorted(got) == sorted(want)
    different = [k for k in got if not torch.equal(got[k], want[k])]
    assert different == []
    # and the weights are not trivially equal: two seeds give two starts
    torch.manual_seed(1)
    other = MaskedAttentionDecoder(dim, heads, ffn, layers).state_dict()
    assert not torch.equal(other["layers.0.self_attn.in_proj_weight"], got["layers.0.self_attn.in_proj_weight"])


def _legacy_names(state: dict) -> dict:
    """The inverse of ``upgrade_legacy_keys``: how a version-1 checkpoint named the same weights."""
    out = {}
    for key, value in state.items():
        m = re.match(r"^(.*\.transformer\.)(.+)$", key)
        rest = m.group(2) if m else ""
        if not m or rest.startswith("level_embed"):
            out[key] = value
            continue
        head = m.group(1) + "decoder."
        if (qkv := re.match(r"^layers\.(\d+)\.self_attn\.in_proj_(weight|bias)$", rest)):
            for name, part in zip("qkv", value.chunk(3)):
                out[f"{head}layers.{qkv[1]}.self_attn.{name}_proj.{qkv[2]}"] = part.clone()
            continue
        for new, old in ((r"^query_norm\.", "layernorm."), (r"\.cross_norm\.", ".cross_attn_layer_norm."),
                         (r"\.self_norm\.", ".self_attn_layer_norm."), (r"\.ffn\.0\.", ".fc1."),
                         (r"\.ffn\.2\.", ".fc2."), (r"\.ffn_norm\.", ".final_layer_norm.")):
            rest = re.sub(new, old, rest)
        rest = re.sub(r"^mask_embed\.(\d)\.", lambda mm: f"mask_predictor.mask_embedder.{int(mm[1]) // 2}.0.", rest)
        out[head + rest] = value
    return out


@pytest.mark.parametrize("task", ["instance", "open-vocab"])
def test_version_1_checkpoints_still_load(tmp_path, task):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    dec = build_decoder(tiny_config(task))
    inp = tiny_input()
    kw = forward_kw(task)
    ck = save_decoder(dec, tmp_path / "ck")
    old = _legacy_names(dec.state_dict())
    assert any(".transformer.decoder.layers.0.self_attn.q_proj.weight" in k for k in old)
    save_file({k: v.contiguous() for k, v in old.items()}, str(ck / "model.safetensors"))
    config = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**config, "version": 1}))
    loaded = load_decoder(ck)
    for k, v in dec.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with torch.no_grad():
        want, got = dec.eval()(inp, **kw), loaded(inp, **kw)
    for a, b in zip(want["mask_logits"], got["mask_logits"]):
        assert torch.equal(a, b)
    # a weight the old decoder never had is named, not silently dropped
    save_file({**{k: v.contiguous() for k, v in old.items()}, "head.transformer.decoder.extra.weight": torch.zeros(1)},
              str(ck / "model.safetensors"))
    with pytest.raises(DatasetdmError, match="head.transformer.decoder.extra.weight"):
        load_decoder(ck)


def test_zoomed_views_divide_depth_by_the_zoom(samples):
    """A view magnified by s reads as a camera s times closer (Eigen et al. 2014 §3.3)."""
    s = samples[0]

    class Rng:  # zoom 1.25, crop at the origin, no flip
        def uniform(self, a, b): return 1.25
        def integers(self, a, b): return 0
        def random(self): return 1.0
    v = augment(s, Rng(), (64, 64))
    from PIL import Image
    zoomed = np.asarray(Image.fromarray(s.depth.astype(np.float32)).resize((80, 80), Image.NEAREST))[:64, :64]
    assert np.allclose(v.depth, zoomed / 1.25) and (v.depth[zoomed == 0] == 0).all()


def test_view_scale_defaults_per_task():
    from datasetdm.training import TrainOptions
    from datasetdm.training.views import view_scale

    assert view_scale(TrainOptions(task="depth")) == (1.0, 1.0)
    assert view_scale(TrainOptions(task="semantic")) == view_scale(TrainOptions(task="pose")) == (1.0, 1.5)
    assert view_scale(TrainOptions(task="depth", scale=(1.0, 2.0))) == (1.0, 2.0)


def test_open_vocab_name_dropout_and_unknown_names():
    torch.manual_seed(0)
    dec = build_decoder(tiny_config("open-vocab", name_dropout=0.5, held_out=["ball"]))
    dec.head.text_embeddings.copy_(torch.randn(K, 24))
    dec.head.text_embeddings[1] = 0  # ball, held out: stored as "unknown name"
    emb = dec.head.embeddings_for(["person", "ball", "unicorn"])
    assert torch.equal(emb[0], dec.head.text_embeddings[0]) and not emb[1:].any()
    # name dropout only in training: eval outputs do not depend on the RNG, training ones do
    inp, kw = tiny_input(), forward_kw("open-vocab")
    dec.eval()
    a, b = dec(inp, **kw)["mask_logits"][-1], dec(inp, **kw)["mask_logits"][-1]
    assert torch.equal(a, b)
    dec.train()
    torch.manual_seed(1)
    c = dec(inp, **kw)["mask_logits"][-1]
    torch.manual_seed(2)
    assert not torch.equal(c, dec(inp, **kw)["mask_logits"][-1])
    # without name dropout a new name needs its text embedding
    plain = build_decoder(tiny_config("open-vocab"))
    with pytest.raises(ValueError, match="unicorn"):
        plain.head.embeddings_for(["person", "unicorn"])
    assert plain.head.embeddings_for(["unicorn"], lambda names: torch.ones(len(names), 24)).eq(1).all()


def test_open_vocab_checkpoints_from_before_the_attention_offsets_load_unchanged():
    dec = build_decoder(tiny_config("open-vocab")).eval()
    sd = {k: v for k, v in dec.state_dict().items()
          if not k.endswith(("attention_offset", "present_gain", "present_offset"))}
    old = build_decoder(tiny_config("open-vocab")).eval()
    old.load_state_dict(sd)
    assert old.head.attention_offset == 0 and old.head.present_gain == 0 and old.head.present_offset == 0
    inp, kw = tiny_input(), forward_kw("open-vocab")
    out = old(inp, **kw)
    # the old head: masks + gain · attention map, present logits from the queries alone
    dec.head.attention_offset.data.zero_(); dec.head.present_gain.data.zero_(); dec.head.present_offset.data.zero_()
    ref = dec(inp, **kw)
    assert torch.allclose(out["mask_logits"][-1], ref["mask_logits"][-1])
    assert torch.allclose(out["present_logits"][-1], ref["present_logits"][-1])


def test_a_person_is_ranked_by_its_score_times_its_joints_confidence():
    """Pose: a person's score is the instance score × the mean heatmap peak (clipped to [0, 1]),
    so of two equally sure people the one with sharper joints ranks first."""
    from datasetdm.decoder.heads import InstanceHead
    from datasetdm.decoder.losses import heatmap_peaks

    torch.manual_seed(0)
    dec = build_decoder(tiny_config("pose"))
    out = dec(tiny_input())
    head = dec.head
    hm = torch.zeros_like(out["heatmaps"])
    hm[0, 0, :, 10, 10] = 0.9  # query 0: every joint peaks at 0.9
    hm[0, 1, :8, 20, 20] = 0.6  # query 1: 8 joints at 0.6, the rest nowhere (0)
    out["heatmaps"] = hm
    mask = torch.ones(64, 64, dtype=torch.bool)
    sharp = head._instance(out, 0, 0, 0, mask, 0.8)
    vague = head._instance(out, 0, 1, 0, mask, 0.8)
    peaks = heatmap_peaks(head._heatmaps(out, 0, 1)[None])[0]
    assert sharp.score == pytest.approx(0.8 * 0.9, abs=1e-5)
    assert vague.score == pytest.approx(0.8 * float(peaks[:, 2].clamp(0, 1).mean()), abs=1e-6)
    assert vague.score < sharp.score
    assert InstanceHead._instance(head, out, 0, 1, 0, mask, 0.8).score == 0.8  # instance decoders keep theirs


def test_pixel_semantic_head_learns_a_scene_and_round_trips(tmp_path, samples):
    # per-pixel classification (DecoderConfig.semantic_head = "pixels") fits one real world scene
    # from its raw pixels, and its checkpoint reloads the same head and the same predictions
    scene = augment(samples[0], None, (64, 64))
    cfg = tiny_config("semantic", semantic_head="pixels", features="raw-pixels", attention=False)
    cfg.feature_channels, cfg.feature_sizes = [48, 192, 768, 3072], [[16, 16], [8, 8], [4, 4], [2, 2]]
    torch.manual_seed(0)
    dec = build_decoder(cfg)
    inp = DecoderInput([], [], torch.as_tensor(scene.image).permute(2, 0, 1)[None].float() / 255, (64, 64))
    target = dec.targets(scene)
    opt = torch.optim.Adam(dec.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss, parts = dec.loss(dec(inp), [target])
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert set(parts) == {"loss_ce", "loss_dice"} and float(loss) < 0.3 * first
    (pred,) = dec.predict(inp)
    assert (pred["semantic"] == scene.semantic).mean() > 0.95
    ck = save_decoder(dec, tmp_path / "pixels")
    again = load_decoder(ck)
    assert again.cfg.semantic_head == "pixels" and type(again.head).__name__ == "PixelSemanticHead"
    assert np.array_equal(again.predict(inp)[0]["semantic"], pred["semantic"])
    with pytest.raises(ValueError, match="semantic_head"):
        build_decoder(tiny_config("semantic", semantic_head="queries"))
