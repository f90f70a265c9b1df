"""Editing with labels (issue 22, paper Fig. 4): prompt-to-prompt attention control and the
`datasetdm edit` command."""

import json

import numpy as np
import pytest
import torch

from datasetdm.backbone.capture import generate
from datasetdm.backbone.p2p import EditControl, prompt_to_prompt, token_alignment
from datasetdm.errors import DatasetdmError
from datasetdm.generation.edit import parse_swaps, semantic_agreement, swap_words

SOURCE = "a photo of a red ball on grass"
TARGET = "a photo of a blue ball on grass"


def test_tokens_align_around_a_swapped_word(tiny_clip):
    mapping, changed = token_alignment(tiny_clip.tokenizer, SOURCE, TARGET, tiny_clip.max_tokens)
    assert len(mapping) == tiny_clip.max_tokens
    assert mapping == list(range(len(mapping)))  # one word for one word: every token keeps its place
    ids = tiny_clip.tokenizer(TARGET).input_ids
    blue = tiny_clip.tokenizer("blue", add_special_tokens=False).input_ids
    assert [ids[j] for j in changed] == blue
    # a longer insertion: the tokens after it map to their source positions, the new ones to none
    mapping, changed = token_alignment(tiny_clip.tokenizer, SOURCE, "a photo of a big shiny red ball on grass",
                                       tiny_clip.max_tokens)
    assert len(changed) >= 2 and all(mapping[j] == -1 for j in changed)
    after = changed[-1] + 1
    assert mapping[after] == after - len(changed)


def test_swaps_are_parsed_and_applied_as_words():
    assert parse_swaps(["red=blue", " ball = box "]) == [("red", "blue"), ("ball", "box")]
    assert swap_words("a red ball and a red box; redwood", [("red", "blue")]) == "a blue ball and a blue box; redwood"
    for bad in ("red", "=blue", "red=", "a=b=c"):
        with pytest.raises(DatasetdmError, match="OLD=NEW"):
            parse_swaps([bad])
    with pytest.raises(DatasetdmError, match="no word 'green'"):
        swap_words(SOURCE, [("green", "blue")])


def test_semantic_agreement_leaves_out_ignore():
    a = np.array([[1, 1], [0, 255]], np.uint8)
    b = np.array([[1, 2], [0, 0]], np.uint8)
    assert semantic_agreement(a, b) == pytest.approx(2 / 3)
    assert semantic_agreement(a, None) is None


def _pair(bb, control, guidance, steps=3):
    with prompt_to_prompt(bb.unet, control):
        return generate(bb, [SOURCE, TARGET], [5, 5], num_inference_steps=steps, guidance_scale=guidance,
                        capture=False)[0]


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_control_without_injection_changes_nothing(tiny_clip, guidance):
    plain = generate(tiny_clip, [SOURCE, TARGET], [5, 5], num_inference_steps=3, guidance_scale=guidance,
                     capture=False)[0]
    mapping = list(range(tiny_clip.max_tokens))
    assert np.array_equal(_pair(tiny_clip, EditControl(mapping, 0, 0), guidance), plain)
    # the processors and the step counter are gone afterwards
    from diffusers.models.attention_processor import Attention

    procs = {type(m.get_processor()).__name__ for m in tiny_clip.unet.modules() if isinstance(m, Attention)}
    assert not any("Edit" in p for p in procs) and not tiny_clip.unet._forward_pre_hooks


def test_injected_attention_is_computed_like_diffusers(tiny_clip):
    """Injecting the source's maps into an identical prompt is a no-op: the explicit attention the
    control computes matches the layer's own processor (to float rounding)."""
    plain = generate(tiny_clip, [SOURCE, SOURCE], [5, 5], num_inference_steps=3, guidance_scale=3.0, capture=False)[0]
    with prompt_to_prompt(tiny_clip.unet, EditControl(list(range(tiny_clip.max_tokens)), 3, 3)):
        edited = generate(tiny_clip, [SOURCE, SOURCE], [5, 5], num_inference_steps=3, guidance_scale=3.0,
                          capture=False)[0]
    assert np.abs(edited.astype(int) - plain.astype(int)).max() <= 1


def test_injection_pulls_the_edit_towards_the_source(tiny_clip):
    """With the source's attention injected at every step the edited image stays closer to the
    source image than the same seed and edited prompt without control."""
    mapping, _ = token_alignment(tiny_clip.tokenizer, SOURCE, TARGET, tiny_clip.max_tokens)
    free = _pair(tiny_clip, EditControl(mapping, 0, 0), 3.0, steps=4).astype(float)
    held = _pair(tiny_clip, EditControl(mapping, 4, 4), 3.0, steps=4).astype(float)
    assert np.abs(held[1] - held[0]).mean() < np.abs(free[1] - free[0]).mean()
    # the source row itself is what it is without control
    assert np.abs(held[0] - free[0]).max() <= 1


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_clip_path):
    """A decoder-labelled run of 2 samples on the tiny backbone (semantic + depth decoders)."""
    from datasetdm.generation.setup import generate_labelled
    from datasetdm.training import TrainOptions, train_decoder
    from datasetdm.world.folders import render_world_folder

    root = tmp_path_factory.mktemp("edit")
    world = render_world_folder(root / "world", "train", 0, 4)
    decoders = []
    for task in ("semantic", "depth"):
        train_decoder(world, root / task, TrainOptions(task=task, iterations=1, views=1, batch_size=2, dim=16,
                                                       num_queries=4), backbone_source=str(tiny_clip_path),
                      show_progress=False)
        decoders.append(root / task)
    prompts = root / "prompts.txt"
    prompts.write_text("a red ball on grass\na blue box and a red cone on a street\n")
    generate_labelled(root / "run", backbone=str(tiny_clip_path), n=2, seed=0, steps=3, guidance=3.0, batch_size=2,
                      prompts=prompts, decoders=decoders, show_progress=False)
    return root, decoders


def test_edit_command_writes_before_and_after_with_labels(tiny_run, tiny_clip_path, tmp_path):
    from typer.testing import CliRunner

    from datasetdm.cli import app
    from datasetdm.formats.labelled_folder import read_labelled_folder
    from datasetdm.formats.shards import read_manifest

    root, decoders = tiny_run
    rows = read_manifest(root / "run").to_pylist()
    sample = next(r["id"] for r in rows if "red" in r["prompt"].split())
    args = ["edit", str(root / "run"), "--sample", str(sample), "--swap", "red=blue", "--out", str(tmp_path / "e"),
            "--backbone", str(tiny_clip_path)] + [a for d in decoders for a in ("--decoder", str(d))]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    line = json.loads(result.output.strip().splitlines()[-1])
    assert "blue" in line["edited_prompt"].split() and "red" not in line["edited_prompt"].split()
    assert 0.0 <= line["semantic_agreement"] <= 1.0
    # the run's sample came back: same seed, same prompt, the same decoders
    assert line["source_image_mean_abs_diff"] < 2.0
    folder = read_labelled_folder(tmp_path / "e" / "samples")
    before, after = folder[0], folder[1]
    assert before.id.endswith("-before") and after.id.endswith("-after")
    assert after.semantic is not None and after.depth is not None and before.semantic is not None
    record = json.loads((tmp_path / "e" / "edit.json").read_text())
    assert record["swaps"] == ["red=blue"] and record["cross_steps"] == round(0.8 * 3)
    page = (tmp_path / "e" / "gallery" / "index.html").read_text()
    assert page.count('class="sample"') == 2 and "blue" in page and "classes" in page
    # an existing output is kept unless --overwrite
    again = CliRunner().invoke(app, args)
    assert again.exit_code != 0 and "--overwrite" in str(again.exception or again.output)


def test_edit_refuses_what_it_cannot_do(tiny_run, tiny_clip_path, tmp_path):
    from datasetdm.generation.edit import edit_sample

    root, decoders = tiny_run
    with pytest.raises(DatasetdmError, match="other decoders"):
        edit_sample(root / "run", 0, [("red", "blue")], decoders[:1], backbone=str(tiny_clip_path))
    with pytest.raises(DatasetdmError, match="no sample 7"):
        edit_sample(root / "run", 7, [("red", "blue")], decoders, backbone=str(tiny_clip_path))
    with pytest.raises(DatasetdmError, match="no word 'purple'"):
        edit_sample(root / "run", 0, [("purple", "blue")], decoders, backbone=str(tiny_clip_path))


@pytest.mark.slow
def test_colour_swap_keeps_the_layout_on_the_embedded_backbone(tmp_path):
    """Issue 22's bar: on the shipped backbone, a colour swap leaves the semantic labels' agreement
    with the original at 0.8 or more."""
    from datasetdm.generation.edit import edit_sample
    from datasetdm.generation.setup import generate_labelled
    from datasetdm.training import train_decoders
    from datasetdm.world.folders import render_world_folder

    world = render_world_folder(tmp_path / "world", "train", 0, 40)
    (decoder,) = train_decoders(world, tmp_path / "decoders", ["semantic"], None, 300, show_progress=False).values()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball on grass on a sunny day\na red car on a street on a sunny day\n")
    generate_labelled(tmp_path / "run", backbone=None, n=2, seed=0, steps=15, guidance=4.0, batch_size=2,
                      prompts=prompts, decoders=[decoder], show_progress=False)
    for sample in (0, 1):
        result = edit_sample(tmp_path / "run", sample, [("red", "blue")], [decoder])
        assert result.record["semantic_agreement"] >= 0.8, result.record
        # the colour did change where the object is
        obj = result.before.semantic > 0
        if obj.any():
            shift = lambda im: (im[obj][:, 2].astype(float) - im[obj][:, 0].astype(float)).mean()  # noqa: E731
            assert shift(result.after.image) > shift(result.before.image), result.record


def test_edits_share_a_loaded_backbone(tiny_run, tiny_clip_path):
    """Many edits (bench/edit_agreement.py) load the backbone once: an edit through a loaded
    backbone equals one that loads its own, also when the backbone served an edit before."""
    from datasetdm.backbone.loader import load_backbone
    from datasetdm.formats.shards import read_manifest
    from datasetdm.generation.edit import edit_sample

    root, decoders = tiny_run
    rows = read_manifest(root / "run").to_pylist()
    sample = next(r["id"] for r in rows if "red" in r["prompt"].split())
    own = edit_sample(root / "run", sample, [("red", "blue")], decoders, backbone=str(tiny_clip_path))
    bb = load_backbone(str(tiny_clip_path))
    edit_sample(root / "run", sample, [("red", "green")], decoders, backbone=bb)
    shared = edit_sample(root / "run", sample, [("red", "blue")], decoders, backbone=bb)
    np.testing.assert_array_equal(shared.after.image, own.after.image)
    np.testing.assert_array_equal(shared.after.semantic, own.after.semantic)
    assert shared.record["semantic_agreement"] == own.record["semantic_agreement"]
