"""Faults and hostile input (issue 18): no pickle is ever executed, state files round-trip without
pickle, outputs are readable like any file."""

import os
import pickle
import stat

import pytest
import torch

from datasetdm.errors import DatasetdmError
from datasetdm.io import atomic_path, load_state, save_state, write_json_atomic
from faults_support import plant_pickle, write_folder


def test_state_round_trip_without_pickle(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    gen = torch.Generator().manual_seed(5)
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(), "step": 7,
             "rewarm_from": None, "recipe": {"lr": 1e-3, "name": "x", "flag": True}}
    save_state(tmp_path / "s.safetensors", state)
    back = load_state(tmp_path / "s.safetensors")
    assert back["step"] == 7 and back["rewarm_from"] is None and back["recipe"] == state["recipe"]
    assert all(torch.equal(back["model"][k], v) for k, v in state["model"].items())
    assert list(back["opt"]["state"]) == [0, 1]  # parameter indices stay ints
    assert back["opt"]["param_groups"][0]["betas"] == (0.9, 0.99)
    fresh = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=1e-3)
    fresh.load_state_dict(back["opt"])  # loads like the original
    assert torch.equal(torch.Generator().set_state(back["gen"]).get_state(), gen.get_state())


def test_pickle_at_a_state_path_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    plant_pickle(tmp_path / "state.safetensors", marker)
    with pytest.raises(DatasetdmError, match="state.safetensors: not a datasetdm training state"):
        load_state(tmp_path / "state.safetensors")
    assert not marker.exists()


def test_pickle_in_a_legacy_backbone_state_is_refused_not_run(tmp_path):
    from datasetdm.embedded.train import read_unet_state

    marker = tmp_path / "pwned"
    plant_pickle(tmp_path / "unet-state.pt", marker)
    with pytest.raises(pickle.UnpicklingError):
        read_unet_state(tmp_path)
    assert not marker.exists()


def test_pickle_in_the_reference_cache_is_refused_not_run(tmp_path):
    from datasetdm.embedded import gates

    config = gates.ReferenceConfig(n_train=8, steps=1, base=4, depth=2, batch_size=2)
    marker = tmp_path / "pwned"
    plant_pickle(tmp_path / f"segmenter-{config.key()}.pt", marker)
    with pytest.raises(pickle.UnpicklingError):
        gates.reference_segmenter(config, cache_dir=tmp_path, packaged_dir=tmp_path / "none")
    assert not marker.exists()


def test_decoder_training_ignores_a_planted_state(tmp_path, tiny_clip_path):
    """A pickle where `train` keeps its resume state is never loaded: training starts over."""
    from datasetdm.training import TrainOptions, train_decoder
    from datasetdm.world.render import render_scene

    data = write_folder(tmp_path / "data", [render_scene("train", 0, i) for i in range(4)])
    marker = tmp_path / "pwned"
    plant_pickle(tmp_path / "ckpt.work" / "state.safetensors", marker)
    summary = train_decoder(data, tmp_path / "ckpt", TrainOptions(task="semantic", iterations=2, views=1, batch_size=2,
                                                                  dim=16, num_queries=4),
                            backbone_source=str(tiny_clip_path), show_progress=False)
    assert summary["resumed_at"] == 0 and (tmp_path / "ckpt" / "config.json").is_file()
    assert not marker.exists()


def test_outputs_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "a.json", {"x": 1})
        with atomic_path(tmp_path / "b.bin") as tmp:
            tmp.write_bytes(b"x")
    finally:
        os.umask(old)
    for name in ("a.json", "b.bin"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_configs_from_files_reject_unknown_and_ill_typed_keys(tmp_path):
    import json
    from dataclasses import asdict

    from datasetdm.config import load_config
    from datasetdm.decoder.build import DecoderConfig
    from datasetdm.embedded.train import RECIPE, Recipe

    assert load_config(Recipe, json.loads(json.dumps(asdict(RECIPE))), "recipe.json") == RECIPE
    with pytest.raises(DatasetdmError, match=r"runs/x/recipe.json: unet_stepz: Unexpected keyword argument"):
        load_config(Recipe, {**asdict(RECIPE), "unet_stepz": 3}, "runs/x/recipe.json")
    with pytest.raises(DatasetdmError, match=r"recipe.json: unet_steps: Input should be a valid integer"):
        load_config(Recipe, {**asdict(RECIPE), "unet_steps": "many"}, "recipe.json")
    with pytest.raises(DatasetdmError, match=r"recipe.json: expected a JSON object"):
        load_config(Recipe, [1, 2], "recipe.json")
    good = {"task": "semantic", "categories": [{"id": 1, "name": "dog"}], "feature_channels": [4],
            "feature_sizes": [[2, 2]], "image_size": [8, 8]}
    assert DecoderConfig.from_dict(good).task == "semantic"
    with pytest.raises(DatasetdmError, match=r"ckpt/config.json: num_querys: Unexpected keyword argument"):
        DecoderConfig.from_dict({**good, "num_querys": 8}, "ckpt/config.json")
    with pytest.raises(DatasetdmError, match=r"ckpt/config.json: image_size"):
        DecoderConfig.from_dict({**good, "image_size": "big"}, "ckpt/config.json")


def test_config_files_are_read_and_validated_naming_file_and_key(tmp_path):
    """JSON configs on disk: the run's recipe.json, a component's package.json."""
    import json
    from dataclasses import asdict

    from datasetdm.backbone.loader import _component_dir
    from datasetdm.config import read_config
    from datasetdm.embedded.train import RECIPE, Recipe, train

    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(asdict(RECIPE)))
    assert read_config(Recipe, recipe) == RECIPE
    recipe.write_text("{not json")
    with pytest.raises(DatasetdmError, match=f"{recipe}: not valid JSON"):
        read_config(Recipe, recipe)
    with pytest.raises(DatasetdmError, match=f"{tmp_path / 'none.json'}: missing"):
        read_config(Recipe, tmp_path / "none.json")
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.json").write_text(json.dumps({**asdict(RECIPE), "ema_decy": 0.9}))
    with pytest.raises(DatasetdmError, match=r"run/recipe.json: ema_decy: Unexpected keyword argument"):
        train(run, recipe=RECIPE)  # named before any stage runs
    assert sorted(p.name for p in run.iterdir()) == ["recipe.json"]

    component = tmp_path / "model" / "text_encoder"
    component.mkdir(parents=True)
    ref = component / "package.json"
    for bad, problem in (({"packag": "x"}, "package: Field required"), ({"package": 5}, "package: Input should be a valid string"),
                         ({"package": "datasetdm", "sub": "x"}, "sub: Unexpected keyword argument")):
        ref.write_text(json.dumps(bad))
        with pytest.raises(DatasetdmError, match=f"{ref}: .*{problem}"):
            _component_dir(tmp_path / "model", "text_encoder")
    ref.write_text(json.dumps({"package": "datasetdm", "subfolder": "assets"}))
    assert _component_dir(tmp_path / "model", "text_encoder").name == "assets"


def _run(*args, tmp_path=None):
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("DATASETDM_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "datasetdm.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.mark.parametrize("args, message", [
    (("world", "render", "--seed", "-5", "--n", "1"), "--seed"),
    (("downstream", "--test-seed", "-1"), "--test-seed"),
    (("downstream", "--test-seed", "0", "--models", "joint,teacher"), "--models joint,teacher: choose among"),
    (("world", "render", "--preset", "huge", "--n", "1"), "unknown preset 'huge'"),
])
def test_out_of_range_numbers_are_usage_errors(tmp_path, args, message):
    result = _run(*args, "--out", tmp_path / "out")
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_unwritable_output_is_one_line_naming_the_path(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    result = _run("world", "render", "--n", "1", "--out", tmp_path / "a-file" / "world")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"error: {tmp_path / 'a-file' / 'world'}: Not a directory" in result.stderr


def test_train_refuses_a_nan_learning_rate(tmp_path):
    from datasetdm.training import TrainOptions
    from datasetdm.training.trainer import check_options

    for lr in (float("nan"), 0.0, -1e-3, float("inf")):
        with pytest.raises(DatasetdmError, match="--lr must be a positive finite number"):
            check_options(TrainOptions(lr=lr))


@pytest.mark.parametrize("resume", [False, True])
def test_generate_never_writes_into_a_folder_that_is_not_its_run(tmp_path, resume):
    from datasetdm.formats.sample import Category
    from datasetdm.formats.shards import ShardWriter

    export = tmp_path / "export"
    (export / "images").mkdir(parents=True)
    (export / "annotations.json").write_text("{}")
    with pytest.raises(DatasetdmError, match="holds other files .*annotations.json.* and no run.json"):
        ShardWriter(export, [Category(1, "dog")], {}, resume=resume)
    assert sorted(p.name for p in export.iterdir()) == ["annotations.json", "images"]
    ShardWriter(tmp_path / "new", [Category(1, "dog")], {}, resume=resume).close()  # empty or new: a fresh run
    assert (tmp_path / "new" / "run.json").is_file()
