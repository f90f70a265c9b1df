"""Bad input and faults against the commands, as a hostile but fair user would try them (issue 18).

Every case runs the installed command's entry point (``datasetdm.cli.main``) in this process and
checks the three promises: exit status 2, one ``error:`` line naming the path and the problem (no
traceback), and nothing half-written left behind (so a rerun needs no manual deletion). Disks
that fail are simulated by wrappers (tests/faults_support.py) because chmod does not bind for root;
a real full tmpfs is tried where the test may mount one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from datasetdm.formats.labelled_folder import read_labelled_folder
from datasetdm.formats.sample import Category, Instance, LabelledSample
from datasetdm.formats.shards import ShardWriter, read_manifest
from datasetdm.world.render import CATEGORIES, render_scene
from faults_support import (
    FullDisk,
    ReadOnlyDisk,
    assert_one_line_error,
    leftovers,
    plant_pickle,
    run_cli,
    tree_bytes,
    write_folder,
    write_shard_run,
)

FAST_TRAIN = ["--n-images", "4", "--views", "1", "--iterations", "1", "--batch-size", "2", "--no-progress"]
PERSON = 1  # the world's person category: the one with keypoints


def scenes_with_people(n: int) -> list[LabelledSample]:
    found = []
    for i in range(200):
        scene = render_scene("train", 0, i)
        if any(inst.keypoints is not None and (inst.keypoints[:, 2] > 0).any() for inst in scene.instances):
            found.append(scene)
            if len(found) == n:
                return found
    raise AssertionError("the world has too few people")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("world") / "world", scenes_with_people(4))


@pytest.fixture(scope="module")
def shard_run(tmp_path_factory) -> Path:
    """A generate run's folder: 3 shards of 2 samples."""
    return write_shard_run(tmp_path_factory.mktemp("run") / "run", 6, samples_per_shard=2)


@pytest.fixture(scope="module")
def semantic_ckpt(world, tiny_clip_path, tmp_path_factory) -> Path:
    from datasetdm.training import TrainOptions, train_decoder

    out = tmp_path_factory.mktemp("ckpt") / "semantic"
    train_decoder(world, out, TrainOptions(task="semantic", iterations=1, views=1, batch_size=2, dim=16, num_queries=4),
                  backbone_source=str(tiny_clip_path), show_progress=False)
    return out


def copy_run(shard_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(shard_run, run)
    return run


def nothing_beside(folder: Path, *allowed: str) -> None:
    """The parent of an output folder holds only ``allowed``: no output, temporary or lock file."""
    assert sorted(p.name for p in folder.iterdir()) == sorted(allowed), sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------- labels checked before training


def _no_people(s):
    s.instances = [i for i in s.instances if i.category_id != PERSON]


def _invisible(s):
    for i in s.instances:
        if i.keypoints is not None:
            i.keypoints = np.zeros_like(i.keypoints)


def _all_ignore(s):
    s.semantic = np.full_like(s.semantic, 255)


def _no_instances(s):
    s.instances = []


def _semantic_only(s):
    s.instances = s.depth = None


def _no_depth(s):
    s.depth = np.zeros_like(s.depth)


@pytest.mark.parametrize("task, damage, problem", [
    ("pose", _no_people, "--task pose needs at least one person with a visible keypoint"),
    ("pose", _invisible, "none visible"),
    ("semantic", _all_ignore, "every semantic pixel of the 4 images used is 255 (ignore)"),
    ("open-vocab", _all_ignore, "--task open-vocab needs labelled pixels"),
    ("instance", _no_instances, "--task instance needs at least one labelled instance"),
    ("instance", _semantic_only, "task 'instance' needs instances labels"),
    ("depth", _no_depth, "--task depth needs depth > 0 somewhere"),
], ids=["pose-zero-people", "pose-all-invisible", "semantic-all-255", "open-vocab-all-255",
        "instance-no-annotations", "instance-on-semantic-only-folder", "depth-all-zero"])
def test_train_refuses_data_with_nothing_to_learn(task, damage, problem, tmp_path, tiny_clip_path, capsys, monkeypatch):
    samples = scenes_with_people(4)
    for s in samples:
        damage(s)
    data = write_folder(tmp_path / "data", samples)
    out = tmp_path / "ckpt"
    code, _, err = run_cli(capsys, monkeypatch, "train", "--data", data, "--task", task, "--out", out,
                           "--backbone", tiny_clip_path, *FAST_TRAIN)
    assert_one_line_error(code, err, data, problem)
    nothing_beside(tmp_path, "data")


@pytest.mark.parametrize("edit, problem", [
    (lambda kp: kp.__setitem__(2, 7), "has visibility 7; COCO allows 0, 1 or 2"),
    (lambda kp: kp.__setitem__(0, 500.0), "at (500, "),
    (lambda kp: kp.__setitem__(1, -40.0), "lies outside the 64x64 image"),
], ids=["visibility-7", "x-outside", "y-outside"])
def test_keypoints_out_of_range_are_refused_by_the_reader(edit, problem, world, tmp_path, tiny_clip_path, capsys, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(world, data)
    coco = json.loads((data / "annotations.json").read_text())
    person = next(a for a in coco["annotations"] if a.get("keypoints") and any(a["keypoints"][2::3]))
    k = next(j for j in range(17) if person["keypoints"][3 * j + 2] > 0)
    triple = person["keypoints"][3 * k: 3 * k + 3]
    edit(triple)
    person["keypoints"][3 * k: 3 * k + 3] = triple
    (data / "annotations.json").write_text(json.dumps(coco))
    out = tmp_path / "ckpt"
    code, _, err = run_cli(capsys, monkeypatch, "train", "--data", data, "--task", "pose", "--out", out,
                           "--backbone", tiny_clip_path, *FAST_TRAIN)
    assert_one_line_error(code, err, data / "annotations.json", f"annotation {person['id']}: keypoint {k}", problem)
    nothing_beside(tmp_path, "data")


def test_train_refuses_a_nan_learning_rate_on_the_command_line(world, tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(capsys, monkeypatch, "train", "--data", world, "--task", "semantic", "--out", tmp_path / "ckpt",
                           "--lr", "nan", *FAST_TRAIN)
    assert_one_line_error(code, err, "--lr must be a positive finite number, got nan")
    nothing_beside(tmp_path)


@pytest.mark.parametrize("extra, problem", [
    (["--semantic-head", "queries"], "--semantic-head 'queries': masks or pixels"),
    (["--task", "depth", "--semantic-head", "pixels"], "--semantic-head is for semantic decoders, not --task depth"),
], ids=["unknown", "not-semantic"])
def test_train_refuses_a_bad_semantic_head(extra, problem, world, tmp_path, capsys, monkeypatch):
    args = ["train", "--data", world, "--task", "semantic", "--out", tmp_path / "ckpt", *FAST_TRAIN]
    if "--task" in extra:
        args = args[:3] + args[5:]  # the case's own --task
    code, _, err = run_cli(capsys, monkeypatch, *args, *extra)
    assert_one_line_error(code, err, problem)
    nothing_beside(tmp_path)


@pytest.mark.parametrize("command", [
    ["generate", "--labeler", "attention", "--classes", "ball", "--n", "1"],
    ["train", "--data", "DATA", "--task", "semantic"],
], ids=["generate", "train"])
def test_negative_seeds_are_usage_errors(command, world, tmp_path, capsys, monkeypatch):
    args = [str(world) if a == "DATA" else a for a in command]
    code, _, err = run_cli(capsys, monkeypatch, *args, "--seed", "-3", "--out", tmp_path / "out")
    assert code == 2 and "--seed" in err and "Traceback" not in err
    nothing_beside(tmp_path)


# --------------------------------------------------------------------- evaluate: null, not 0


def test_evaluate_reports_null_when_nothing_is_scored(semantic_ckpt, tmp_path, capsys, monkeypatch):
    samples = [render_scene("test", 0, i) for i in range(2)]
    for s in samples:
        _all_ignore(s)
    data = write_folder(tmp_path / "test", samples)
    code, out, err = run_cli(capsys, monkeypatch, "evaluate", "--decoder", semantic_ckpt, "--data", data,
                             "--out", tmp_path / "m.json", "--no-progress")
    assert code == 0, err
    assert "miou: null" in out.splitlines() and json.loads(out.splitlines()[-1]) == {"miou": None}
    assert json.loads((tmp_path / "m.json").read_text())["miou"] is None


def test_evaluate_label_scores_refused_before_any_work(semantic_ckpt, tmp_path, capsys, monkeypatch):
    data = write_folder(tmp_path / "test", [render_scene("test", 0, 0)])
    for value, message in (("0.3,x", "--label-scores: 'x' is not a number"),
                           ("0.5", "--label-scores: label errors are measured for instance decoders"),):
        code, _, err = run_cli(capsys, monkeypatch, "evaluate", "--decoder", semantic_ckpt, "--data", data,
                               "--out", tmp_path / "m.json", "--label-scores", value, "--no-progress")
        assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "m.json").exists()


def test_scores_are_null_without_ground_truth_and_zero_when_a_label_is_missed():
    from datasetdm.evaluation.evaluate import Scores

    cats = [{"id": c.id, "name": c.name, **({"keypoints": list(c.keypoints)} if c.keypoints else {})} for c in CATEGORIES]
    scene = scenes_with_people(1)[0]
    person = next(i for i in scene.instances if i.category_id == PERSON)
    empty = LabelledSample("e", scene.image, semantic=np.full_like(scene.semantic, 255), instances=[],
                           depth=np.zeros_like(scene.depth))
    figures = {}
    for task in ("semantic", "instance", "depth", "pose"):
        scores = Scores(task, cats)
        scores.add(empty, {"semantic": scene.semantic, "instances": [person], "depth": scene.depth})
        figures[task] = scores.compute()
    assert figures["semantic"]["miou"] is None and figures["instance"]["mask_ap"] is None
    assert figures["depth"]["abs_rel"] is None and figures["pose"]["keypoint_ap"] is None
    hidden = Instance(PERSON, person.mask, np.zeros_like(person.keypoints))  # a person, no labelled joint
    pose = Scores("pose", cats)
    pose.add(LabelledSample("p", scene.image, instances=[hidden]), {"instances": [person]})
    assert pose.compute()["keypoint_ap"] is None and pose.compute()["mask_ap"] is not None
    missed = Scores("instance", cats)
    missed.add(scene, {"instances": []})
    assert missed.compute()["mask_ap"] == 0.0  # something to score, nothing found: a real 0


# --------------------------------------------------------------------- prompts over the token limit


def test_a_class_named_past_the_token_limit_is_warned_about_and_never_labelled(tiny_clip_path, tmp_path, capsys,
                                                                               monkeypatch, caplog):
    from datasetdm.formats.shards import read_shards

    long_prompt = "a ball " + "and a very long description " * 16 + "next to a person"
    (tmp_path / "prompts.txt").write_text(f"{long_prompt}\na ball next to a person\n")
    out = tmp_path / "gen"
    with caplog.at_level("WARNING", logger="datasetdm"):
        code, _, err = run_cli(capsys, monkeypatch, "generate", "--labeler", "attention", "--classes", "ball,person",
                               "--prompts", tmp_path / "prompts.txt", "--backbone", tiny_clip_path, "--out", out,
                               "--n", "2", "--steps", "1", "--label-threshold", "0", "--ignore-threshold", "0")
    assert code == 0, err
    warnings = [r.getMessage() for r in caplog.records if r.name == "datasetdm"]
    assert len(warnings) == 1 and "tokens; the model reads the first 77" in warnings[0]
    assert "person named only past it: dropped from its labels" in warnings[0]
    by_prompt = {s.caption: s for s in read_shards(out)}
    cut, short = by_prompt[long_prompt], by_prompt["a ball next to a person"]
    assert 2 not in np.unique(cut.semantic) and 255 in np.unique(cut.semantic)  # person (id 2): never labelled
    assert 2 in np.unique(short.semantic)  # the same class is labelled where the model read it
    rows = {r["prompt"]: r for r in read_manifest(out).to_pylist()}
    assert rows[long_prompt]["score_agreement"] in (0.0, 1.0)  # scored on ball only


def test_every_annotator_loses_the_unread_class(tmp_path, caplog):
    """The loop drops an unread class from decoder-style outputs too: semantic pixels → 255,
    its instances removed, the agreement score computed without it."""
    from datasetdm.backbone.tokens import PromptFit
    from datasetdm.formats.shards import read_shards
    from datasetdm.generation import generate_dataset
    from datasetdm.prompts.base import Prompt, PromptList

    cats = [Category(1, "ball"), Category(2, "person")]
    semantic = np.zeros((8, 8), np.uint8)
    semantic[:, :4], semantic[:, 4:] = 1, 2

    def annotate(images, hc, prompts):
        return [LabelledSample("", im, semantic=semantic.copy(), instances=[Instance(1, semantic == 1),
                                                                            Instance(2, semantic == 2)]) for im in images]

    prompt = Prompt("a ball " + "words " * 80 + "a person", ("ball", "person"))
    with caplog.at_level("WARNING", logger="datasetdm"):
        generate_dataset(tmp_path / "out", lambda texts, seeds: (np.zeros((len(texts), 8, 8, 3), np.uint8), None),
                         {"decoder": annotate}, PromptList([prompt]), cats, n=1, progress=False,
                         read_prompt=lambda text: PromptFit(text[:20], 90, 77))
    (sample,) = read_shards(tmp_path / "out")
    assert set(np.unique(sample.semantic)) == {1, 255} and [i.category_id for i in sample.instances] == [1]
    assert read_manifest(tmp_path / "out").to_pylist()[0]["score_agreement"] == 1.0
    assert "person named only past it" in caplog.text


# --------------------------------------------------------------------- atomic outputs and --overwrite


def test_export_over_an_existing_export_needs_overwrite(shard_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "export"
    assert run_cli(capsys, monkeypatch, "export", shard_run, "--out", out)[0] == 0
    before = tree_bytes(out)
    code, _, err = run_cli(capsys, monkeypatch, "export", shard_run, "--out", out)
    assert_one_line_error(code, err, out, "already exists; pass --overwrite")
    assert tree_bytes(out) == before
    (out / "gallery").mkdir()  # what `view` adds; --overwrite replaces the folder as a whole
    code, _, err = run_cli(capsys, monkeypatch, "export", shard_run, "--out", out, "--overwrite", "--limit", "2")
    assert code == 0, err
    assert len(read_labelled_folder(out)) == 2 and not (out / "gallery").exists()
    nothing_beside(tmp_path, "export")


def test_overwrite_never_replaces_a_folder_that_is_not_a_labelled_folder(shard_run, tmp_path, capsys, monkeypatch):
    home = tmp_path / "home"
    (home / "documents").mkdir(parents=True)
    (home / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, monkeypatch, "export", shard_run, "--out", home, "--overwrite")
    assert_one_line_error(code, err, home, "is not a labelled folder; not replacing it")
    assert sorted(p.name for p in home.iterdir()) == ["documents", "notes.txt"]
    nothing_beside(tmp_path, "home")


def test_world_render_has_a_real_overwrite_flag(tmp_path, capsys, monkeypatch):
    out = tmp_path / "world"
    assert run_cli(capsys, monkeypatch, "world", "render", "--n", "2", "--out", out)[0] == 0
    code, _, err = run_cli(capsys, monkeypatch, "world", "render", "--n", "1", "--out", out)
    assert_one_line_error(code, err, out, "pass --overwrite")
    assert len(read_labelled_folder(out)) == 2
    assert run_cli(capsys, monkeypatch, "world", "render", "--n", "1", "--out", out, "--overwrite")[0] == 0
    assert len(read_labelled_folder(out)) == 1
    nothing_beside(tmp_path, "world")


def test_train_replaces_a_checkpoint_only_with_overwrite(semantic_ckpt, world, tiny_clip_path, tmp_path, capsys,
                                                         monkeypatch):
    out = tmp_path / "ckpt"
    shutil.copytree(semantic_ckpt, out)
    before = tree_bytes(out)
    args = ["train", "--data", world, "--task", "depth", "--out", out, "--backbone", tiny_clip_path, *FAST_TRAIN]
    code, _, err = run_cli(capsys, monkeypatch, *args)
    assert_one_line_error(code, err, out, "already holds a decoder checkpoint (task 'semantic'); pass --overwrite")
    assert tree_bytes(out) == before
    code, _, err = run_cli(capsys, monkeypatch, *args, "--overwrite")
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["decoder"]["task"] == "depth"
    nothing_beside(tmp_path, "ckpt")


def _fake_generate(texts, seeds):
    return np.stack([np.full((8, 8, 3), s % 256, np.uint8) for s in seeds]), None


def test_a_failed_generate_leaves_nothing_and_a_rerun_starts_cleanly(tmp_path):
    from datasetdm.errors import DatasetdmError
    from datasetdm.generation import generate_dataset
    from datasetdm.prompts.base import Prompt, PromptList

    calls = []

    def flaky(images, hc, prompts):
        calls.append(len(images))
        if len(calls) == 2:
            raise DatasetdmError("annotator failed on the second batch")
        return [LabelledSample("", im, semantic=np.ones((8, 8), np.uint8)) for im in images]

    args = (_fake_generate, {"a": flaky}, PromptList([Prompt("a ball", ("ball",))]), [Category(1, "ball")])
    with pytest.raises(DatasetdmError, match="second batch"):
        generate_dataset(tmp_path / "out", *args, n=6, batch_size=2, samples_per_shard=4, progress=False)
    nothing_beside(tmp_path)  # no run.json, no empty shards/, no .shard-*.tar.tmp, no lock file
    summary = generate_dataset(tmp_path / "out", *args, n=6, batch_size=2, samples_per_shard=4, progress=False)
    assert summary.kept == 6  # not "already holds a run; pass --resume"


def test_a_run_killed_before_its_first_shard_blocks_nothing(tmp_path):
    from datasetdm.generation import generate_dataset
    from datasetdm.prompts.base import Prompt, PromptList

    out = tmp_path / "out"
    (out / "shards").mkdir(parents=True)
    (out / "run.json").write_text(json.dumps({"format": "datasetdm-shards", "version": 1, "config": {"seed": 9}}))
    (out / "shards" / ".shard-000000.tar.tmp").write_bytes(b"half a tar")
    annotate = lambda images, hc, prompts: [LabelledSample("", im, semantic=np.ones((8, 8), np.uint8)) for im in images]  # noqa: E731
    summary = generate_dataset(out, _fake_generate, {"a": annotate}, PromptList([Prompt("a ball")]), [Category(1, "ball")],
                               n=2, progress=False)
    assert summary.kept == 2 and sorted(p.name for p in (out / "shards").iterdir()) == ["shard-000000.tar"]


# --------------------------------------------------------------------- full disk


def test_generate_on_a_full_disk(tiny_clip_path, tmp_path, capsys, monkeypatch):
    out = tmp_path / "gen"
    FullDisk(monkeypatch, tmp_path, budget=2000, only=".shard-")
    code, _, err = run_cli(capsys, monkeypatch, "generate", "--labeler", "attention", "--classes", "ball",
                           "--backbone", tiny_clip_path, "--out", out, "--n", "2", "--steps", "1")
    assert_one_line_error(code, err, out / "shards" / "shard-000000.tar", "No space left on device")
    nothing_beside(tmp_path)  # no .shard-*.tar.tmp, no run.json or empty shards/ to block a rerun


def test_export_on_a_full_disk(shard_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "export"
    with monkeypatch.context() as patch:
        FullDisk(patch, tmp_path, budget=2_500, only="images")  # room for two of the six images (0.6-1.6 kB each)
        code, _, err = run_cli(capsys, monkeypatch, "export", shard_run, "--out", out)
    line = assert_one_line_error(code, err, out / "images", "No space left on device")
    assert ".tmp" not in line  # the file's place in the output, not in the temporary folder
    nothing_beside(tmp_path)  # no images without annotations.json, no temporary sibling
    assert run_cli(capsys, monkeypatch, "export", shard_run, "--out", out)[0] == 0  # the rerun just works


def test_export_onto_a_real_full_tmpfs(shard_run, tmp_path, capsys, monkeypatch):
    small = tmp_path / "small"
    small.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(small)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs to mount a tmpfs (root in a privileged container)")
    try:
        code, _, err = run_cli(capsys, monkeypatch, "export", shard_run, "--out", small / "export")
        assert_one_line_error(code, err, small / "export", "No space left on device")
        nothing_beside(small)
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


# --------------------------------------------------------------------- truncated shards


def _cut(run: Path, fraction: float | None = None, members: int | None = None) -> Path:
    import tarfile

    shard = run / "shards" / "shard-000001.tar"
    data = shard.read_bytes()
    if members is not None:  # cut at a member boundary: a shorter tar that reads without error
        with tarfile.open(shard) as tar:
            end = tar.getmembers()[members].offset
        data = data[:end]
    else:
        data = data[: int(len(data) * fraction)]
    shard.write_bytes(data)
    return shard


def test_export_of_a_truncated_shard(shard_run, tmp_path, capsys, monkeypatch):
    shard = _cut(copy_run(shard_run, tmp_path), fraction=0.5)
    code, _, err = run_cli(capsys, monkeypatch, "export", tmp_path / "run", "--out", tmp_path / "export")
    assert_one_line_error(code, err, shard, "truncated or damaged tar shard")
    nothing_beside(tmp_path, "run")


def test_export_of_a_shard_cut_between_samples(shard_run, tmp_path, capsys, monkeypatch):
    run = copy_run(shard_run, tmp_path)
    shard = _cut(run, members=4)  # sample 2's files kept, sample 3's gone, then end-of-archive blocks added
    shard.write_bytes(shard.read_bytes() + bytes(10240))
    code, _, err = run_cli(capsys, monkeypatch, "export", run, "--out", tmp_path / "export")
    assert_one_line_error(code, err, shard, "holds 1 samples but the manifest lists 2")
    nothing_beside(tmp_path, "run")


def test_view_of_a_truncated_shard(shard_run, tmp_path, capsys, monkeypatch):
    run = copy_run(shard_run, tmp_path)
    shard = _cut(run, fraction=0.7)
    code, _, err = run_cli(capsys, monkeypatch, "view", run, "--out", tmp_path / "gallery")
    assert_one_line_error(code, err, shard, "truncated or damaged tar shard")
    nothing_beside(tmp_path, "run")
    code, _, err = run_cli(capsys, monkeypatch, "view", run)  # default: RUN/gallery
    assert code == 2 and not (run / "gallery").exists()


# --------------------------------------------------------------------- read-only output


WRITERS = {
    "world render": ["world", "render", "--n", "1", "--out", "OUT"],
    "export": ["export", "RUN", "--out", "OUT"],
    "train": ["train", "--data", "WORLD", "--task", "semantic", "--out", "OUT", "--backbone", "BACKBONE", *FAST_TRAIN],
    "generate": ["generate", "--labeler", "attention", "--classes", "ball", "--backbone", "BACKBONE", "--out", "OUT",
                 "--n", "1", "--steps", "1"],
    "demo": ["demo", "--out", "OUT", "--backbone", "BACKBONE", "--n-samples", "1", "--n-test", "1", "--iterations", "1"],
    "view": ["view", "RUN", "--out", "OUT"],
    "downstream": ["downstream", "--test-seed", "0", "--out", "OUT", "--real", "WORLD", "--synthetic", "WORLD",
                   "--n-test", "1", "--steps", "1"],
}


def _args(command, out, world, shard_run, backbone):
    names = {"OUT": out, "RUN": shard_run, "WORLD": world, "BACKBONE": backbone}
    return [str(names.get(a, a)) for a in WRITERS[command]]


@pytest.mark.parametrize("command", list(WRITERS))
def test_a_read_only_output_folder(command, world, shard_run, tiny_clip_path, tmp_path, capsys, monkeypatch):
    parent = tmp_path / "readonly"
    parent.mkdir()
    with monkeypatch.context() as patch:
        ReadOnlyDisk(patch, parent)
        code, _, err = run_cli(capsys, monkeypatch, *_args(command, parent / "out", world, shard_run, tiny_clip_path))
    assert_one_line_error(code, err, parent / "out", "Read-only file system")
    nothing_beside(parent)


@pytest.mark.skipif(os.geteuid() == 0, reason="chmod does not bind for root (the ReadOnlyDisk cases cover it)")
def test_a_chmod_read_only_parent_folder(shard_run, tmp_path, capsys, monkeypatch):
    parent = tmp_path / "readonly"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        code, _, err = run_cli(capsys, monkeypatch, "export", shard_run, "--out", parent / "out")
        assert_one_line_error(code, err, parent / "out", "Permission denied")
        nothing_beside(parent)
    finally:
        parent.chmod(0o755)


# --------------------------------------------------------------------- two runs, one folder

HOLD = """
import sys, time
from datasetdm.io import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture()
def held_lock(tmp_path):
    """Another process holding the lock on tmp_path/out: (out, its pid)."""
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield out, holder
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("command", [c for c in WRITERS if c != "view"])
def test_a_second_run_on_a_live_output_folder_is_refused(command, held_lock, world, shard_run, tiny_clip_path,
                                                         capsys, monkeypatch):
    out, holder = held_lock
    live_tmp = out / "shards" / ".shard-000000.tar.tmp"  # what a live generate is writing
    live_tmp.parent.mkdir(parents=True)
    live_tmp.write_bytes(b"in progress")
    code, _, err = run_cli(capsys, monkeypatch, *_args(command, out, world, shard_run, tiny_clip_path))
    assert_one_line_error(code, err, out, f"in use by another datasetdm run (pid {holder.pid},", "started ")
    assert live_tmp.read_bytes() == b"in progress" and sorted(p.name for p in out.iterdir()) == ["shards"]


def test_the_lock_dies_with_its_holder(held_lock):
    from datasetdm.io import lock_file, output_lock

    out, holder = held_lock
    holder.kill()  # kill -9: no cleanup runs, the lock file stays, the kernel drops the lock
    holder.wait()
    assert lock_file(out).exists()
    with output_lock(out):
        assert json.loads(lock_file(out).read_text())["pid"] == os.getpid()
    assert not lock_file(out).exists()


# --------------------------------------------------------------------- pickles where the code reads


def test_a_pickle_as_decoder_weights_is_refused_not_run(semantic_ckpt, world, tmp_path, capsys, monkeypatch):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(semantic_ckpt, ckpt)
    plant_pickle(ckpt / "model.safetensors", tmp_path / "pwned")
    code, _, err = run_cli(capsys, monkeypatch, "evaluate", "--decoder", ckpt, "--data", world, "--no-progress")
    assert_one_line_error(code, err, ckpt / "model.safetensors", "unreadable")
    assert not (tmp_path / "pwned").exists()


def test_a_pickle_as_a_feature_cache_is_recomputed_not_run(world, tmp_path):
    from datasetdm.decoder.inputs import RAW_PIXELS
    from datasetdm.training import FeatureSource, TrainOptions, cached_inputs

    views = list(read_labelled_folder(world))[:2]
    cache = tmp_path / "cache-0123.safetensors"
    plant_pickle(cache, tmp_path / "pwned")
    inp = cached_inputs(views, ["a photo"] * 2, FeatureSource(RAW_PIXELS, [{"id": 1, "name": "person"}]),
                        TrainOptions(), cache)
    assert inp.batch_size == 2 and not (tmp_path / "pwned").exists()
    from safetensors.torch import load_file

    assert set(load_file(cache)) >= {"f0", "a0"}  # the pickle was replaced by the recomputed features


@pytest.mark.parametrize("target, problem", [
    ("manifest.parquet", "not a readable Parquet file"),
    ("shards/shard-000001.tar", "not a readable tar shard"),
    ("run.json", "not valid JSON"),
], ids=["manifest", "shard", "run.json"])
def test_a_pickle_in_a_shard_run_is_refused_not_run(target, problem, shard_run, tmp_path, capsys, monkeypatch):
    run = copy_run(shard_run, tmp_path)
    plant_pickle(run / target, tmp_path / "pwned")
    code, _, err = run_cli(capsys, monkeypatch, "export", run, "--out", tmp_path / "export")
    assert_one_line_error(code, err, run / target, problem)
    assert not (tmp_path / "pwned").exists()
    nothing_beside(tmp_path, "run")


def test_a_pickle_as_annotations_json_is_refused_not_run(world, tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(world, data)
    plant_pickle(data / "annotations.json", tmp_path / "pwned")
    code, _, err = run_cli(capsys, monkeypatch, "train", "--data", data, "--task", "semantic", "--out",
                           tmp_path / "ckpt", *FAST_TRAIN)
    assert_one_line_error(code, err, data / "annotations.json", "not valid JSON")
    assert not (tmp_path / "pwned").exists()
    nothing_beside(tmp_path, "data")


# --------------------------------------------------------------------- corrupt and mismatched input


def test_a_manifest_listing_a_missing_shard(shard_run, tmp_path, capsys, monkeypatch):
    run = copy_run(shard_run, tmp_path)
    (run / "shards" / "shard-000002.tar").unlink()
    code, _, err = run_cli(capsys, monkeypatch, "export", run, "--out", tmp_path / "export")
    assert_one_line_error(code, err, run / "shards" / "shard-000002.tar", "listed in the manifest but missing")
    nothing_beside(tmp_path, "run")


def test_an_image_whose_size_disagrees_with_annotations_json(world, tmp_path, capsys, monkeypatch):
    from PIL import Image

    data = tmp_path / "data"
    shutil.copytree(world, data)
    first = sorted((data / "images").iterdir())[0]
    Image.new("RGB", (32, 32)).save(first)
    code, _, err = run_cli(capsys, monkeypatch, "train", "--data", data, "--task", "semantic", "--out",
                           tmp_path / "ckpt", *FAST_TRAIN)
    assert_one_line_error(code, err, first, "image is 32x32 but annotations.json says 64x64")
    nothing_beside(tmp_path, "data")


# --------------------------------------------------------------------- permissions


def test_outputs_are_readable_like_any_file(shard_run, semantic_ckpt, tmp_path, capsys, monkeypatch):
    """Under umask 022 every file a command writes is 0644 and every folder 0755 (the temporary
    siblings are made 0600/0700 by mkstemp/mkdtemp and must not keep that once renamed)."""
    from datasetdm.decoder.checkpoint import load_decoder, save_decoder

    old = os.umask(0o022)
    try:
        assert run_cli(capsys, monkeypatch, "export", shard_run, "--out", tmp_path / "export")[0] == 0
        assert run_cli(capsys, monkeypatch, "world", "render", "--n", "1", "--out", tmp_path / "world")[0] == 0
        assert run_cli(capsys, monkeypatch, "view", tmp_path / "export")[0] == 0
        save_decoder(load_decoder(semantic_ckpt), tmp_path / "ckpt")
        with ShardWriter(tmp_path / "run", list(CATEGORIES), {"seed": 0}) as writer:  # what generate writes
            writer.add(0, {"prompt": "a ball", "seed": 0, "scores": {}}, render_scene("val", 0, 0))
    finally:
        os.umask(old)
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in tmp_path.rglob("*")}
    wrong = {name: mode for name, mode in modes.items()
             if mode != (oct(0o755) if (tmp_path / name).is_dir() else oct(0o644))}
    assert not wrong, wrong
    assert {"export/gallery/assets", "ckpt/model.safetensors", "run/manifest.parquet", "run/shards/shard-000000.tar"} <= set(modes)
