"""The backbone quality gates (embedded/gates.py): targets, fidelity counting, probe, plumbing."""

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from datasetdm.embedded import gates
from datasetdm.embedded.sheet import render_sheet
from datasetdm.text import plural
from datasetdm.world.render import CATEGORIES, COLOURS, render_scene

FLAT = {"ball", "cone", "star"}  # one flat colour over the whole silhouette


def test_colour_target_matches_painted_colours():
    """Every object pixel carries its instance's colour id, background 0, and for flat-coloured
    objects in plain daylight that id is the palette colour nearest to the pixels actually drawn."""
    palette = np.array([COLOURS[n] for n in gates.COLOUR_NAMES], float)
    checked = 0
    for i in range(60):
        s = render_scene("train", 3, i)
        target = gates.colour_target(s)
        assert target.dtype == np.uint8 and target.shape == s.semantic.shape
        np.testing.assert_array_equal(target != 0, s.semantic != 0)
        for inst, colour in zip(s.instances, s.meta["instance_colours"]):
            assert (target[inst.mask] == gates.COLOUR_IDS[colour]).all()
            name = CATEGORIES[inst.category_id - 1].name
            if name in FLAT and s.meta["lighting"] == "sunny" and inst.mask.sum() >= 12:
                rgb = np.median(s.image[inst.mask].astype(float), axis=0)
                nearest = int(np.abs(palette - rgb).sum(1).argmin()) + 1
                assert nearest == gates.COLOUR_IDS[colour], (s.id, name, colour, rgb)
                checked += 1
    assert checked >= 10


def test_render_set_prompted_sets_are_named_in_captions():
    data = gates.render_set("test", 0, 40, skip_empty=True)
    assert len(data) == 40 and data.images.shape == (40, 64, 64, 3)
    assert len(set(data.indices)) == 40
    for cap, cats, cols, pairs, sem, col in zip(data.captions, data.categories, data.colours, data.pairs,
                                                data.semantic, data.colour):
        assert cats and cols
        for c in cats:
            name = CATEGORIES[c - 1].name
            assert name in cap or plural(name) in cap
            assert (sem == c).sum() >= 6
        for k in cols:
            assert gates.COLOUR_NAMES[k - 1] in cap
        assert {c for c, _ in pairs} == set(cats) and {k for _, k in pairs} == set(cols)
        for c, k in pairs:
            assert ((sem == c) & (col == k)).any()


def test_fidelity_counts_missing_categories_and_colours():
    data = gates.render_set("test", 0, 10, skip_empty=True)
    perfect = gates.fidelity(data.semantic, data.colour, data, min_pixels=4)
    assert perfect == {"category_fidelity": 1.0, "colour_fidelity": 1.0, "pair_fidelity": 1.0}
    sem, col = data.semantic.copy(), data.colour.copy()
    c = data.categories[0][0]
    sem[0][sem[0] == c] = 0  # the first sample loses a category (and its colour pixels lose their object)
    col[1] = 0  # the second sample loses every colour
    f = gates.fidelity(sem, col, data, min_pixels=4)
    assert f["category_fidelity"] == pytest.approx(0.9)
    assert f["colour_fidelity"] <= 0.9 and f["pair_fidelity"] == pytest.approx(0.8)
    # the pixel threshold: a category found on fewer than min_pixels pixels does not count
    big = max(int((data.semantic[i] == data.categories[i][0]).sum()) for i in range(len(data)))
    assert gates.fidelity(data.semantic, data.colour, data, min_pixels=big + 1)["category_fidelity"] < 1.0
    with pytest.raises(ValueError):
        gates.fidelity(data.semantic[:3], data.colour[:3], data)


def test_category_recall_is_per_prompted_category():
    data = gates.render_set("test", 0, 20, skip_empty=True)
    names = {c.id: c.name for c in gates.CATEGORIES}
    prompted = {c for cats in data.categories for c in cats}
    assert gates.category_recall(data.semantic, data, min_pixels=4) == {names[c]: 1.0 for c in sorted(prompted)}
    c = data.categories[0][0]
    sem = data.semantic.copy()
    sem[sem == c] = 0  # that category is found nowhere; the others everywhere they are prompted
    recall = gates.category_recall(sem, data, min_pixels=4)
    assert recall[names[c]] == 0.0
    assert all(v == 1.0 for name, v in recall.items() if name != names[c])
    with pytest.raises(ValueError):
        gates.category_recall(data.semantic[:3], data)


def test_probe_is_a_1x1_conv_on_the_upsampled_hypercolumn():
    torch.manual_seed(0)
    feats = [torch.randn(3, c, s, s) for c, s in ((5, 16), (6, 8), (7, 4), (8, 2))]
    probe = gates.HypercolumnProbe([5, 6, 7, 8], num_classes=4, size=64)
    probe.set_statistics(feats)
    for conv in probe.convs:
        torch.nn.init.normal_(conv.weight)
    torch.nn.init.normal_(probe.convs[0].bias)
    # reference: standardize, upsample every level to 64x64, concatenate, one 1x1 conv
    cols = [F.interpolate((f - f.mean((0, 2, 3), keepdim=True)) / f.std((0, 2, 3), keepdim=True), size=(64, 64),
                          mode="bilinear", align_corners=False) for f in feats]
    weight = torch.cat([conv.weight for conv in probe.convs], dim=1)
    ref = F.conv2d(torch.cat(cols, 1), weight, probe.convs[0].bias)
    torch.testing.assert_close(probe(feats), ref, atol=1e-4, rtol=1e-4)


def test_category_attention_gathers_each_category_word(tiny_bert):
    tok = tiny_bert.tokenizer
    ids = gates.category_token_ids(tok)
    assert all(len(v) == 2 for v in ids.values())  # name and plural are single WordPiece tokens
    prompts = ["two red balls and a person in a blue shirt on grass", "a car on a street at night"]
    input_ids = tok(prompts, padding="max_length", max_length=16, return_tensors="pt").input_ids
    b, t = input_ids.shape
    attn = torch.rand(b, t, 4, 4)
    maps = gates.category_attention([attn], input_ids, ids)
    assert maps[0].shape == (2, 9, 4, 4)
    names = [c.name for c in CATEGORIES]
    pos = lambda i, word: (input_ids[i] == tok.convert_tokens_to_ids(word)).nonzero()[0, 0]  # noqa: E731
    torch.testing.assert_close(maps[0][0, names.index("ball")], attn[0, pos(0, "balls")])
    torch.testing.assert_close(maps[0][0, names.index("person")], attn[0, pos(0, "person")])
    torch.testing.assert_close(maps[0][1, names.index("car")], attn[1, pos(1, "car")])
    assert maps[0][0, names.index("car")].abs().sum() == 0 and maps[0][1, names.index("ball")].abs().sum() == 0


def test_train_probe_learns_a_separable_labelling():
    """Labels that are a linear function of the features: the probe must reach them."""
    torch.manual_seed(0)
    feats = [torch.randn(8, 3, 32, 32), torch.randn(8, 4, 8, 8)]
    labels = feats[0][:, :2].argmax(1).numpy().astype(np.uint8)  # class 0/1 from two channels
    labels[:, :2] = 255  # ignored rows
    probe = gates.train_probe(feats, labels, num_classes=2, steps=60, batch_size=4, lr=0.05)
    assert probe.size == 32
    assert gates.miou(gates.probe_predict(probe, feats), labels, 2) > 0.9


TINY = gates.CheckConfig(
    samples=3, test_images=6, probe_train=5, steps=2, probe_steps=5, batch_size=2,
    reference=gates.ReferenceConfig(n_train=16, steps=2, base=4, batch_size=4),
)


@pytest.fixture(scope="module")
def tiny_backbone_64(tmp_path_factory):
    from datasetdm.testing import make_tiny_backbone

    return make_tiny_backbone(tmp_path_factory.mktemp("tiny64"), text_encoder="bert", sample_size=64)


def test_run_checks_on_a_tiny_backbone(tiny_backbone_64, tmp_path):
    logs = []
    result = gates.run_checks(tiny_backbone_64, TINY, cache_dir=tmp_path / "ref", log=logs.append)
    assert set(result["gates"]) == {"reference_miou", "category_fidelity", "colour_fidelity", "probe_miou"}
    for name, g in result["gates"].items():
        assert 0.0 <= g["value"] <= 1.0 and g["gate"] == gates.GATES[name]
        assert g["passed"] == (g["value"] >= g["gate"])
    assert result["passed"] == all(g["passed"] for g in result["gates"].values())
    assert result["passed"] is False  # a random backbone and a 2-step segmenter pass nothing
    for key in ("category_fidelity", "colour_fidelity", "pair_fidelity", "real_category_fidelity",
                "reference_miou_colour", "probe_train_miou"):
        assert 0.0 <= result["figures"][key] <= 1.0
    # the tiny UNet's four levels + 9 category-attention channels per level
    assert result["settings"]["probe_channels"] == 8 + 16 + 16 + 32 + 4 * 9
    assert 0.0 <= result["figures"]["probe_features_only_miou"] <= 1.0
    # per-category recall: every prompted category, generated and real
    recall = result["per_category"]
    assert set(recall) == {"category_recall", "real_category_recall"}
    assert recall["category_recall"] and set(recall["category_recall"]) == set(recall["real_category_recall"])
    assert all(0.0 <= v <= 1.0 for v in recall["category_recall"].values())
    json.dumps(result)
    cached = list((tmp_path / "ref").glob("segmenter-*.safetensors"))
    assert [p.name for p in cached] == [f"segmenter-{TINY.reference.key()}.safetensors"]
    # a second run loads the cached segmenter instead of training again, with the same figures
    logs2 = []
    again = gates.run_checks(tiny_backbone_64, TINY, cache_dir=tmp_path / "ref", log=logs2.append)
    assert any("loaded" in m for m in logs2) and not any("loaded" in m for m in logs)
    assert again["figures"] == result["figures"]
    # probe only: no segmenter, no generation; the same probe figure, and never "passed"
    probe = gates.run_checks(tiny_backbone_64, TINY, cache_dir=tmp_path / "none", probe_only=True)
    assert set(probe["gates"]) == {"probe_miou"} and probe["passed"] is False
    assert probe["skipped"] == ["reference_miou", "category_fidelity", "colour_fidelity"]
    assert probe["per_category"] == {}
    assert probe["figures"]["probe_miou"] == result["figures"]["probe_miou"]
    assert not (tmp_path / "none").exists()


def test_check_command_writes_json(tiny_backbone_64, tmp_path, monkeypatch):
    from datasetdm.cli import app

    # --quick with TINY's probe sizes (the real quick run captures 100 images, trains 600 steps)
    monkeypatch.setattr(gates.CheckConfig, "quick", staticmethod(lambda **o: dataclasses.replace(TINY, **o)))
    out = tmp_path / "gates.json"
    args = ["backbone", "check", "--backbone", str(tiny_backbone_64), "--out", str(out), "--quick",
            "--samples", "2", "--test-images", "4", "--steps", "2", "--cache", str(tmp_path / "ref"),
            "--reference-images", "8", "--reference-steps", "1"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1, res.output  # gates fail on a random backbone
    last = json.loads(res.stdout.strip().splitlines()[-1])
    assert last == json.loads(out.read_text())
    assert last["quick"] is True and last["settings"]["samples"] == 2
    assert last["settings"]["reference"]["steps"] == 1


def test_render_sheet_layout():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    prompts = ["a red ball on grass on a sunny day"] * 4 + ["two blue boxes, a person in a white shirt and "
                                                            "a black car on a street at night"]
    sheet = render_sheet(images, prompts, columns=3, title="t")
    assert sheet.width == 3 * (192 + 8) + 8
    a = np.asarray(sheet)
    # the first tile is the first image at 3x, nearest neighbour
    np.testing.assert_array_equal(a[26 : 26 + 192 : 3, 8 : 8 + 192 : 3], images[0])
    # text is drawn under it
    assert (a[26 + 192 : 26 + 192 + 15, 8 : 8 + 192] < 128).any()
    with pytest.raises(ValueError):
        render_sheet(images, prompts[:2])


def test_packaged_reference_is_loaded_when_not_cached(tmp_path):
    config = gates.ReferenceConfig(n_train=8, steps=2, base=4, batch_size=4)
    trained = gates.reference_segmenter(config, tmp_path / "cache")
    path = gates.package_reference(trained, config, tmp_path / "assets")
    assert path.name == f"segmenter-{config.key()}.safetensors"
    logs = []
    loaded = gates.reference_segmenter(config, tmp_path / "empty", log=logs.append, packaged_dir=tmp_path / "assets")
    assert logs == [f"reference segmenter: loaded {path}"] and not (tmp_path / "empty").exists()
    images = gates.render_set("test", 0, 4).images
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        a, b = trained.eval()(x), loaded(x)
    for head in a:  # fp16 storage: logits agree to fp16 precision
        torch.testing.assert_close(a[head], b[head], atol=2e-2, rtol=1e-2)
    # another config is another file: not in the package, so it is trained (and cached), not loaded
    other = gates.ReferenceConfig(n_train=8, steps=1, base=4, batch_size=4)
    logs = []
    gates.reference_segmenter(other, tmp_path / "empty", log=logs.append, packaged_dir=tmp_path / "assets")
    assert not any("loaded" in m for m in logs) and any("trained" in m for m in logs)
    assert (tmp_path / "empty" / f"segmenter-{other.key()}.safetensors").exists()
    # retrain: trained again although both a cached and a packaged copy exist
    logs = []
    gates.reference_segmenter(config, tmp_path / "cache", log=logs.append, packaged_dir=tmp_path / "assets",
                              retrain=True)
    assert not any("loaded" in m for m in logs) and any("trained" in m for m in logs)


def test_reference_command_scores_and_packages(tmp_path, monkeypatch):
    from datasetdm.cli import app

    monkeypatch.setattr(gates, "PACKAGED_REFERENCE_DIR", tmp_path / "assets")
    args = ["backbone", "reference", "--cache", str(tmp_path / "ref"), "--reference-images", "8",
            "--reference-steps", "1", "--test-images", "4", "--package", "--threads", "1"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1, res.output  # one training step is far below the 0.95 bar
    last = json.loads(res.stdout.strip().splitlines()[-1])
    assert last["passed"] is False and 0.0 <= last["reference_miou_semantic"] < gates.GATES["reference_miou"]
    packaged = tmp_path / "assets" / f"segmenter-{last['reference_key']}.safetensors"
    assert last["packaged"] == str(packaged) and packaged.exists()
    from safetensors import safe_open

    with safe_open(str(packaged), "pt") as f:
        assert json.loads(f.metadata()["scores"])["reference_miou_semantic"] == last["reference_miou_semantic"]
