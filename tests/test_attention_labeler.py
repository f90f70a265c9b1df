"""The training-free attention labeler (Dataset Diffusion) on tiny random backbones."""

import numpy as np
import pytest
import torch

from datasetdm.backbone.capture import generate
from datasetdm.backbone.hypercolumns import Hypercolumns
from datasetdm.formats.sample import IGNORE_INDEX, Category
from datasetdm.labelers.attention import (
    AttentionLabeler,
    AttentionLabelerConfig,
    appended_prompt,
    attention_side,
)

CATS = [Category(1, "box"), Category(2, "ball"), Category(3, "traffic light")]
PROMPTS = ["a red box and a ball on grass", "a traffic light next to two boxes"]


def test_class_prompt_appending():
    assert appended_prompt("a dog on a sofa", ["dog", "sofa"]) == "a dog on a sofa; dog sofa"
    assert appended_prompt("an empty street", []) == "an empty street"


def test_thresholds_and_uncertainty_band(tiny_clip):
    labeler = AttentionLabeler(tiny_clip, CATS)
    # two classes on a 4x4 grid; after min-max each is in [0, 1]
    box = torch.tensor([[1.0, 0.9, 0.55, 0.0]] * 4)
    ball = torch.tensor([[0.0, 0.2, 0.52, 1.0]] * 4)
    semantic, certain = labeler.labels(torch.stack([box, ball]), ["box", "ball"], (4, 4))
    # columns: box 1.0 -> box; box 0.9 -> box; max 0.55 -> uncertain; ball 1.0 -> ball
    assert semantic[0].tolist() == [1, 1, IGNORE_INDEX, 2]
    assert certain == pytest.approx(0.75)
    low = AttentionLabeler(tiny_clip, CATS, AttentionLabelerConfig(label_threshold=0.5, ignore_threshold=0.5))
    assert IGNORE_INDEX not in low.labels(torch.stack([box, ball]), ["box", "ball"], (4, 4))[0]
    with pytest.raises(ValueError):
        AttentionLabelerConfig(label_threshold=0.4, ignore_threshold=0.5)


def test_self_attention_exponentiation_spreads_within_regions(tiny_clip):
    side = attention_side(tiny_clip.unet)
    labeler = AttentionLabeler(tiny_clip, CATS, AttentionLabelerConfig(tau=4, cross_attention_sides=(side,)))
    hw = side * side
    # self-attention: the left half of the image attends uniformly within itself, the right half too
    left = (torch.arange(hw) % side) < side // 2
    block = (left[:, None] == left[None, :]).float()
    self_attn = (block / block.sum(1, keepdim=True))[None]
    tokens = 77
    cross = torch.full((1, tokens, side, side), 1.0 / tokens)
    # class prompt "box": [CLS/BOS]=0, "box"=1; its attention peaks at one left pixel only
    cross[0, 1] = 0.0
    cross[0, 1, 0, 0] = 0.5
    hc = Hypercolumns(features=[torch.zeros(1, 1, side, side)], cross_attention=[cross],
                      self_attention={side: self_attn}, class_attention=[cross])
    (maps,) = labeler.class_maps(hc, [("box",)])
    m = maps[0].flatten()
    assert torch.allclose(m[left], m[left][0]) and torch.allclose(m[~left], torch.zeros(()))
    semantic, _ = labeler.labels(maps, ["box"], (side, side))
    assert (semantic.reshape(-1)[left.numpy()] == 1).all() and (semantic.reshape(-1)[~left.numpy()] == 0).all()


def test_multi_token_class_names_are_averaged(tiny_clip):
    labeler = AttentionLabeler(tiny_clip, CATS, AttentionLabelerConfig(tau=0))
    side = attention_side(tiny_clip.unet)
    ids = tiny_clip.tokenizer("traffic light", add_special_tokens=False).input_ids
    assert len(ids) == 2  # BPE: two tokens, whose maps are averaged
    cross = torch.zeros(1, 77, side, side)
    cross[0, 1, 0, 0] = 1.0  # "traffic"
    cross[0, 2, 0, 1] = 1.0  # "light"
    hc = Hypercolumns(features=[torch.zeros(1, 1, side, side)], cross_attention=[cross],
                      self_attention={side: torch.eye(side * side)[None]}, class_attention=[cross])
    (maps,) = labeler.class_maps(hc, [("traffic light",)])
    assert maps[0, 0, 0] == pytest.approx(0.5) and maps[0, 0, 1] == pytest.approx(0.5)


@pytest.mark.parametrize("name", ["tiny_clip", "tiny_bert"])
def test_labels_from_generation_are_batch_independent(name, request):
    bb = request.getfixturevalue(name)
    labeler = AttentionLabeler(bb, CATS)
    run = labeler.generate_fn(num_inference_steps=2, guidance_scale=2.0)
    images, hc = run(PROMPTS, [11, 12])
    assert hc.class_attention is not None and set(hc.self_attention) == {labeler.side}
    labels = labeler.annotate(images, hc, PROMPTS)
    h, w = images.shape[1:3]
    for label, prompt in zip(labels, PROMPTS):
        assert label.semantic.shape == (h, w) and label.semantic.dtype == np.uint8
        named = {c.id for c in CATS if c.name in labeler.classes_of(prompt)}
        assert set(np.unique(label.semantic)) <= named | {0, IGNORE_INDEX}
        # min-max normalisation: every named class reaches 1 somewhere, so it is labelled
        assert named <= set(np.unique(label.semantic))
        assert 0 <= label.meta["confidence"] <= 1
    alone_images, alone_hc = run(PROMPTS[1:], [12])
    assert np.array_equal(alone_images[0], images[1])
    # the class maps agree to float precision (a random model's maps are nearly flat, so the
    # min-max-normalised labels would amplify 1e-9 BLAS differences; a trained model's are not)
    batched = labeler.class_maps(hc, [labeler.classes_of(p) for p in PROMPTS])[1]
    alone = labeler.class_maps(alone_hc, [labeler.classes_of(PROMPTS[1])])[0]
    assert torch.allclose(batched, alone, rtol=1e-5, atol=0)
    # the side branch does not change the image: the appended prompt alone gives the same pixels
    plain, _ = generate(bb, [appended_prompt(PROMPTS[1], labeler.classes_of(PROMPTS[1]))], [12],
                        num_inference_steps=2, guidance_scale=2.0, capture=False)
    assert np.array_equal(plain[0], images[1])


def test_attention_labels_through_shards_export_and_reader(tiny_clip, tmp_path):
    from datasetdm.formats.export import export_shards
    from datasetdm.formats.labelled_folder import read_labelled_folder
    from datasetdm.generation import generate_dataset
    from datasetdm.prompts import TemplatePrompts

    labeler = AttentionLabeler(tiny_clip, CATS)
    summary = generate_dataset(
        tmp_path / "shards", labeler.generate_fn(num_inference_steps=2, guidance_scale=1.0),
        {"attention": labeler.annotator}, TemplatePrompts([c.name for c in CATS], seed=0), CATS,
        n=4, batch_size=2, progress=False,
    )
    assert summary.kept == 4
    assert export_shards(tmp_path / "shards", tmp_path / "folder") == 4
    folder = read_labelled_folder(tmp_path / "folder")
    folder.validate()
    assert "semantic" in folder.tasks and len(folder) == 4
    values = set()
    for sample in folder:
        values |= set(np.unique(sample.semantic).tolist())
    assert values <= {0, 1, 2, 3, IGNORE_INDEX} and len(values - {0, IGNORE_INDEX}) >= 1


def test_generate_command_with_attention_labeler(tiny_clip_path, tmp_path):
    from typer.testing import CliRunner

    from datasetdm.cli import app
    from datasetdm.errors import DatasetdmError
    from datasetdm.formats.labelled_folder import read_labelled_folder

    runner = CliRunner()
    out = tmp_path / "shards"
    args = ["generate", "--labeler", "attention", "--classes", "box,ball", "--n", "2", "--steps", "2",
            "--backbone", str(tiny_clip_path), "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["export", str(out), "--out", str(tmp_path / "folder")])
    assert result.exit_code == 0, result.output
    folder = read_labelled_folder(tmp_path / "folder")
    assert [c.name for c in folder.categories] == ["box", "ball"] and len(folder) == 2
    # no classes: a clear error, nothing written
    result = runner.invoke(app, ["generate", "--labeler", "attention", "--out", str(tmp_path / "x"),
                                 "--backbone", str(tiny_clip_path)])
    assert isinstance(result.exception, DatasetdmError) and "--classes" in str(result.exception)
    assert not (tmp_path / "x").exists()
    # a decoder-only option: refused, nothing written
    result = runner.invoke(app, args[:-1] + [str(tmp_path / "y"), "--min-pixel-confidence", "0.8"])
    assert isinstance(result.exception, DatasetdmError) and "--min-pixel-confidence" in str(result.exception)
    assert not (tmp_path / "y").exists()
