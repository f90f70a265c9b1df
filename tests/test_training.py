"""`datasetdm train` / `datasetdm evaluate` end to end on a tiny random SD-shaped backbone and world
images written as a labelled folder: every task, checkpoints, resume, bad input."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from datasetdm.decoder import load_decoder
from datasetdm.decoder.cli import main
from datasetdm.formats.labelled_folder import LabelledFolderWriter, read_labelled_folder
from datasetdm.world.render import CATEGORIES, render_scene

TASKS = ("semantic", "instance", "open-vocab", "depth", "pose")
HEADLINE = {
    "semantic": {"miou"},
    "open-vocab": {"miou"},
    "instance": {"mask_ap", "mask_ap50"},
    "depth": {"abs_rel", "rmse", "delta1"},
    "pose": {"keypoint_ap", "mask_ap", "mask_ap50"},
}
FAST = ["--iterations", "4", "--views", "2", "--batch-size", "4", "--no-progress"]


def write_world(path, split, n):
    with LabelledFolderWriter(path, list(CATEGORIES)) as w:
        for i in range(n):
            w.add(render_scene(split, 0, i))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    train = write_world(root / "train", "train", 8)
    test = write_world(root / "test", "test", 4)
    assert any(i.keypoints is not None for s in read_labelled_folder(train) for i in s.instances)  # pose has people
    return train, test


def cli(capsys, *args):
    """Run the decoder CLI as `datasetdm` runs it → (exit code, stdout lines, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exit_info.value.code, out.strip().splitlines(), err


@pytest.fixture(scope="module")
def semantic_ckpt(world, tiny_clip_path, tmp_path_factory):
    from datasetdm.training import TrainOptions, train_decoder

    out = tmp_path_factory.mktemp("ckpts") / "semantic"
    train_decoder(world[0], out, TrainOptions(task="semantic", iterations=2, views=1, batch_size=4, dim=16, num_queries=4),
                  backbone_source=str(tiny_clip_path), show_progress=False)
    return out


@pytest.mark.parametrize("spec", [*TASKS, "semantic:pixels"])  # semantic twice: mask and per-pixel heads
def test_train_and_evaluate_every_task(spec, world, tiny_clip_path, tiny_clip, tmp_path, capsys):
    task, _, semantic_head = spec.partition(":")
    train, test = world
    ck = tmp_path / f"{task}.ckpt"
    held = ["--held-out-classes", "ball"] if task == "open-vocab" else []
    head = ["--semantic-head", semantic_head] if semantic_head else []
    code, out, err = cli(capsys, "train", "--data", train, "--task", task, "--out", ck, "--n-images", 6,
                         "--backbone", tiny_clip_path, *held, *head, *FAST)
    assert code == 0, err
    summary = json.loads(out[-1])
    assert summary["task"] == task and summary["n_images"] == 6 and summary["iterations"] == 4
    assert summary["backbone"]["fingerprint"] == tiny_clip.fingerprint
    assert np.isfinite(summary["final_loss"])
    # the checkpoint: safetensors + config naming task, classes and backbone; no work files left
    assert sorted(p.name for p in ck.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [ck.name]
    config = json.loads((ck / "config.json").read_text())
    assert config["decoder"]["task"] == task and config["decoder"]["backbone"]["fingerprint"] == tiny_clip.fingerprint
    folder = read_labelled_folder(train)
    dec = load_decoder(ck, task=task, backbone=tiny_clip)
    assert dec.cfg.task == task and dec.cfg.semantic_head == (semantic_head or "masks")
    assert [(c["id"], c["name"]) for c in dec.cfg.categories] == [(c.id, c.name) for c in folder.categories]
    if task == "open-vocab":
        # name dropout (the default): the held-out name is stored as the zero "unknown name" embedding
        names = [c["name"] for c in dec.cfg.categories]
        assert dec.cfg.held_out == ["ball"] and dec.cfg.name_dropout == 0.5
        assert dec.head.text_embeddings.abs().sum(1).gt(0).tolist() == [n != "ball" for n in names]

    code, out, err = cli(capsys, "evaluate", "--decoder", ck, "--data", test, "--no-progress")
    assert code == 0, err
    figures = json.loads(out[-1])  # the last line: the headline figures
    assert set(figures) == HEADLINE[task]
    for k, v in figures.items():
        assert v is None or (np.isfinite(v) and (k in ("abs_rel", "rmse") or 0 <= v <= 1))
    written = json.loads((tmp_path / f"{ck.name}.eval-test.json").read_text())
    assert {k: written[k] for k in figures} == figures and written["task"] == task and written["n_images"] == 4

    # generation's annotator: the loaded decoder labels hypercolumns captured from a backbone
    from datasetdm.backbone.capture import capture_real
    from datasetdm.labelers.decoder import decoder_annotator
    from datasetdm.prompts.base import Prompt

    sample = read_labelled_folder(test)[0]
    hc = capture_real(tiny_clip, [sample.image], ["a photo of a person, car"], size=sample.size)
    (label,) = decoder_annotator(dec, tiny_clip.tokenizer)(sample.image[None], hc, [Prompt("a photo of a person, car")])
    ids = {c.id for c in CATEGORIES}
    (direct,) = dec.predict_hypercolumns(hc, sample.image[None], tiny_clip.tokenizer)  # the same, as one call
    if task in ("semantic", "open-vocab"):
        assert label.semantic.shape == sample.size and set(np.unique(label.semantic)) <= ids | {0}
        assert np.array_equal(direct["semantic"], label.semantic)
    elif task == "depth":
        assert label.depth.shape == sample.size and (label.depth > 0).all()
    else:
        for inst in label.instances:
            assert inst.mask.shape == sample.size and inst.category_id in ids and 0 <= inst.score <= 1
            assert (inst.keypoints is not None) == (task == "pose")


def test_decoder_learns_from_few_images(world, tiny_clip_path, tmp_path):
    """Even on a random backbone (plus the image path) the decoder fits its few images: depth, the
    cheapest head to train, against the same decoder after one step."""
    from datasetdm.evaluation.evaluate import evaluate_decoder
    from datasetdm.training import TrainOptions, train_decoder

    train = world[0]
    scores = {}
    for it in (1, 30):
        opts = TrainOptions(task="depth", iterations=it, views=2, batch_size=4, dim=16, lr=3e-3, warmup=5)
        summary = train_decoder(train, tmp_path / f"ck{it}", opts, backbone_source=str(tiny_clip_path), show_progress=False)
        scores[it] = evaluate_decoder(tmp_path / f"ck{it}", train)
    assert summary["final_loss"] < 0.75 * summary["first_loss"]
    assert scores[30]["abs_rel"] < 0.5 * scores[1]["abs_rel"], scores
    assert scores[30]["delta1"] > scores[1]["delta1"] + 0.3, scores


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_training_resumes_where_it_stopped(world, tiny_clip_path, tmp_path, monkeypatch, ema_decay):
    """An interrupted run keeps its feature cache and last saved state (the weights' moving average
    too); the rerun skips the UNet, continues from that step and ends with exactly the weights of
    an uninterrupted run."""
    import datasetdm.backbone.capture as capture
    from datasetdm import training
    from datasetdm.training import TrainOptions, train_decoder

    opts = TrainOptions(task="instance", iterations=8, views=2, batch_size=4, dim=16, num_queries=4, checkpoint_every=3,
                        ema_decay=ema_decay)
    bb = str(tiny_clip_path)
    train_decoder(world[0], tmp_path / "straight", opts, backbone_source=bb, show_progress=False)

    step = training.Trainer.step

    def interrupted(self, *a, **k):
        if self.step_no == 5:
            raise KeyboardInterrupt
        return step(self, *a, **k)

    monkeypatch.setattr(training.Trainer, "step", interrupted)
    ck = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        train_decoder(world[0], ck, opts, backbone_source=bb, show_progress=False)
    assert not ck.exists()  # no checkpoint until training is done
    work = tmp_path / "resumed.work"
    assert (work / "state.safetensors").is_file()
    (cache,) = work.glob("features-*")  # the feature cache on disk: its shards and cache.json
    assert json.loads((cache / "cache.json").read_text())["complete"] and list(cache.glob("shard-*.safetensors"))

    monkeypatch.setattr(training.Trainer, "step", step)

    def no_unet(*a, **k):
        raise AssertionError("the UNet ran again: the feature cache was not reused")

    monkeypatch.setattr(capture, "capture_real", no_unet)
    summary = train_decoder(world[0], ck, opts, backbone_source=bb, show_progress=False)
    assert summary["resumed_at"] == 3
    assert not work.exists()
    a, b = load_decoder(tmp_path / "straight").state_dict(), load_decoder(ck).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ema_checkpoint_holds_the_moving_average_of_the_weights(world, tiny_clip_path, tmp_path, monkeypatch):
    """With --ema-decay the checkpoint is the average of the steps' weights that diffusers' EMAModel
    keeps (the first update copies, then decay min(d, (1+s)/(10+s))), not the last step's weights."""
    from datasetdm import training
    from datasetdm.training import TrainOptions, train_decoder

    seen = []
    step = training.Trainer.step

    def recording(self, *a, **k):
        logs = step(self, *a, **k)
        seen.append({n: p.detach().clone() for n, p in self.decoder.named_parameters()})
        return logs

    monkeypatch.setattr(training.Trainer, "step", recording)
    opts = TrainOptions(task="semantic", iterations=5, views=2, batch_size=4, dim=16, num_queries=4, ema_decay=0.6)
    train_decoder(world[0], tmp_path / "ema", opts, backbone_source=str(tiny_clip_path), show_progress=False)
    saved = load_decoder(tmp_path / "ema").state_dict()
    average = dict(seen[0])
    for s, weights in enumerate(seen[1:], start=1):
        decay = min(0.6, (1 + s) / (10 + s))
        average = {n: decay * average[n] + (1 - decay) * w for n, w in weights.items()}
    for n, w in average.items():
        assert torch.allclose(saved[n], w, atol=1e-6), n
    assert any(not torch.allclose(saved[n], seen[-1][n]) for n in average)  # not the last step's weights


def _break(case, data, ckpt):
    """Damage a copy of the world folder; return the file the error must name."""
    ann = data / "annotations.json"
    first = sorted((data / "images").iterdir())[0]
    sem = data / "semantic" / first.name
    if case == "mask-size":
        Image.fromarray(np.zeros((32, 32), np.uint8), mode="L").save(sem)
        return sem
    if case == "unknown-id-in-mask":
        a = np.array(Image.open(sem))
        a[0, 0] = 42
        Image.fromarray(a, mode="L").save(sem)
        return sem
    if case == "unknown-id-in-json":
        coco = json.loads(ann.read_text())
        coco["annotations"][0]["category_id"] = 99
        ann.write_text(json.dumps(coco))
        return ann
    if case == "empty-folder":
        shutil.rmtree(data)
        (data / "images").mkdir(parents=True)
        return data / "images"
    if case == "corrupt-image":
        first.write_bytes(first.read_bytes()[:200])
        return first
    if case == "wrong-task-checkpoint":
        return ckpt
    raise ValueError(case)


@pytest.mark.parametrize("case", ["mask-size", "unknown-id-in-mask", "unknown-id-in-json", "empty-folder",
                                  "corrupt-image", "wrong-task-checkpoint"])
def test_bad_input_is_refused_naming_the_file(case, world, semantic_ckpt, tiny_clip_path, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(world[0], data)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(semantic_ckpt, ckpt)
    named = _break(case, data, ckpt)
    out = ckpt if case == "wrong-task-checkpoint" else tmp_path / "out"
    task = "depth" if case == "wrong-task-checkpoint" else "semantic"
    before = (ckpt / "model.safetensors").read_bytes()
    code, _, err = cli(capsys, "train", "--data", data, "--task", task, "--out", out, "--backbone", tiny_clip_path, *FAST)
    assert code == 2
    assert re.search(re.escape(str(named)) + r"\b", err), err
    # nothing half-written: no new checkpoint, no work folder, the old checkpoint intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "data"]
    assert (ckpt / "model.safetensors").read_bytes() == before
    if case in ("mask-size", "unknown-id-in-mask", "corrupt-image"):
        # evaluate reads the same folder: the same error, and no metrics file
        code, _, err = cli(capsys, "evaluate", "--decoder", ckpt, "--data", data, "--no-progress")
        assert code == 2 and str(named) in err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "data"]


def test_evaluate_refuses_another_backbone_and_missing_labels(world, semantic_ckpt, tiny_bert_path, tmp_path, capsys):
    code, _, err = cli(capsys, "evaluate", "--decoder", semantic_ckpt, "--data", world[1], "--backbone", tiny_bert_path,
                       "--no-progress")
    assert code == 2 and f"{semantic_ckpt}: decoder was trained on backbone" in err
    # a folder without the labels the checkpoint's task needs
    data = tmp_path / "depth-only"
    with LabelledFolderWriter(data, list(CATEGORIES)) as w:
        s = render_scene("test", 0, 0)
        s.semantic = s.instances = None
        w.add(s)
    code, _, err = cli(capsys, "evaluate", "--decoder", semantic_ckpt, "--data", data, "--no-progress")
    assert code == 2 and f"{data}: task 'semantic' needs semantic labels" in err
    code, _, err = cli(capsys, "evaluate", "--decoder", data, "--data", world[1], "--no-progress")
    assert code == 2 and f"{data}: not a decoder checkpoint" in err


def test_recorded_backbone_reloads(tiny_clip, tiny_clip_path, monkeypatch):
    """A checkpoint records its backbone so that `evaluate` can load it again from anywhere: the
    embedded one by name, a folder by absolute path."""
    import copy

    from datasetdm.training import FeatureSource, backbone_from_record

    assert backbone_from_record("embedded") is None and backbone_from_record("raw-pixels") is None
    assert backbone_from_record(str(tiny_clip_path)) == str(tiny_clip_path)
    monkeypatch.chdir(tiny_clip_path.parent)
    relative = copy.copy(tiny_clip)
    relative.source = tiny_clip_path.name  # as typed on the command line
    assert FeatureSource("hypercolumns", [], relative).description["source"] == str(tiny_clip_path.resolve())


def test_prompt_modes(world, tiny_clip_path, tmp_path, monkeypatch):
    """auto reads each image's caption when all have one; template names the classes present;
    held-out classes (open-vocab) force the template; --prompt caption without captions is refused."""
    from datasetdm.errors import DatasetdmError
    from datasetdm.training import TrainOptions, prepare, resolve_prompt_mode

    train = world[0]
    folder = read_labelled_folder(train)
    opts = dict(iterations=1, views=1, batch_size=2, dim=16, num_queries=4, n_images=3)
    auto = prepare(train, TrainOptions(task="semantic", **opts), str(tiny_clip_path))
    assert auto.decoder.cfg.prompt == "caption"
    assert auto.prompts == [folder[i].caption for i in range(3)] and all(auto.prompts)
    tmpl = prepare(train, TrainOptions(task="semantic", prompt="template", **opts), str(tiny_clip_path))
    assert tmpl.decoder.cfg.prompt == "template"
    assert all(p.startswith("a photo of a ") for p in tmpl.prompts) and tmpl.prompts != auto.prompts
    # different prompts → different cross-attention maps, hence a different cache
    assert not torch.equal(auto.trainer.inp.class_attention[0], tmpl.trainer.inp.class_attention[0])
    ov = prepare(train, TrainOptions(task="open-vocab", held_out=["ball"], **opts), str(tiny_clip_path))
    assert ov.decoder.cfg.prompt == "template" and not any("ball" in p for p in ov.prompts)

    # a checkpoint records the mode and evaluate reads the test images with the same kind of prompt
    from datasetdm.evaluation.evaluate import evaluate_decoder
    from datasetdm.decoder.predictor import Predictor
    from datasetdm.training import train_decoder

    ck = tmp_path / "caption.ckpt"
    train_decoder(train, ck, TrainOptions(task="semantic", **opts), str(tiny_clip_path), show_progress=False)
    seen = []
    set_images = Predictor.set_images
    monkeypatch.setattr(Predictor, "set_images", lambda self, images, prompts, *a, **k: (
        seen.extend(prompts), set_images(self, images, prompts, *a, **k))[1])
    evaluate_decoder(ck, world[1], n_images=2)
    test = read_labelled_folder(world[1])
    assert seen == [test[0].caption, test[1].caption]

    bare = tmp_path / "bare"
    with LabelledFolderWriter(bare, list(CATEGORIES)) as w:
        for i in range(3):
            s = render_scene("train", 0, i)
            s.caption = None
            w.add(s)
    samples = [read_labelled_folder(bare)[i] for i in range(3)]
    assert resolve_prompt_mode("auto", samples, set(), bare) == "template"
    with pytest.raises(DatasetdmError, match=r"bare.*--prompt caption.*no caption"):
        resolve_prompt_mode("caption", samples, set(), bare)
    with pytest.raises(DatasetdmError, match="--prompt must be one of"):
        resolve_prompt_mode("captions", samples, set(), bare)


def test_instance_and_pose_train_twice_as_long_by_default():
    """`train` without --iterations: 3000 for instance and pose (both keep improving past 1500),
    1500 for the others; an explicit count always wins."""
    from datasetdm.training import TrainOptions

    assert TrainOptions(task="pose").iterations == TrainOptions(task="instance").iterations == 3000
    assert {TrainOptions(task=t).iterations for t in TASKS if t not in ("instance", "pose")} == {1500}
    assert TrainOptions(task="pose", iterations=7).iterations == 7


def test_train_decoders_reuses_a_checkpoint_only_of_the_asked_length(tmp_path):
    """A folder's finished decoder is reused (an interrupted run continues) but never in place of one
    of another training length (e.g. downstream --decoder-iterations into an old --out) or, for
    open-vocab, trained with other classes held out."""
    from datasetdm.errors import DatasetdmError
    from datasetdm.training import train_decoders

    ckpt = tmp_path / "decoders" / "semantic"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text(json.dumps({"info": {"train_options": {"iterations": 3000}}}))
    assert train_decoders(tmp_path / "no-data", tmp_path / "decoders", ["semantic"], None, 3000) == {"semantic": ckpt}
    for asked, trained in ((None, "1500"), (1500, "1500")):
        with pytest.raises(DatasetdmError, match="semantic: trained for 3000 iterations, not " + trained):
            train_decoders(tmp_path / "no-data", tmp_path / "decoders", ["semantic"], None, asked)
    # the open-vocab decoder (downstream --zero-shot, the gates): also never of other held-out classes
    vocab = tmp_path / "decoders" / "open-vocab"
    vocab.mkdir()
    (vocab / "config.json").write_text(json.dumps({"info": {"train_options": {"iterations": 1500,
                                                                               "held_out": ["car", "ball"]}}}))
    assert train_decoders(tmp_path / "no-data", tmp_path / "decoders", ["open-vocab"], None,
                          held_out=("ball", "car")) == {"open-vocab": vocab}
    with pytest.raises(DatasetdmError, match=r"open-vocab: trained with \['car', 'ball'\] held out, not \['person'\]"):
        train_decoders(tmp_path / "no-data", tmp_path / "decoders", ["open-vocab"], None, held_out=("person",))
