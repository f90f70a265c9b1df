"""The backbone training script: stages, resume after a stop, resume pack, export loads."""

import json

import numpy as np
import pytest
import torch

from datasetdm.embedded import model as embedded
from datasetdm.embedded import train as train_mod
from datasetdm.errors import DatasetdmError

TINY_RECIPE = train_mod.Recipe(n_images=72, vae_steps=3, vae_batch=2, unet_steps=5, unet_batch=2,
                               warmup=2, export_every=3, checkpoint_minutes=100.0)


@pytest.fixture()
def tiny_models(monkeypatch):
    """The recipe as shipped, but with the test-size VAE and UNet (same code path)."""
    monkeypatch.setattr(embedded, "build_unet", lambda size="base": _build("unet"))
    monkeypatch.setattr(embedded, "build_vae", lambda size="base": _build("vae"))


def _build(kind):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if kind == "unet":
        return UNet2DConditionModel(**embedded.unet_config("tiny"))
    return AutoencoderKL(**embedded.vae_config("tiny"))


def _log_lines(run):
    return [json.loads(line) for line in (run / "train.log").read_text().splitlines()]


def test_train_stops_resumes_and_exports(tiny_models, tmp_path):
    run = tmp_path / "run"
    train_mod.train(run, max_minutes=0.0, recipe=TINY_RECIPE)  # stops after the first UNet step
    assert train_mod.read_unet_state(run)["step"] == 1
    for name in ("data.npz", "latents.npy", "text.npy", "vae/config.json"):
        assert (run / name).exists(), name
    vae_mtime = (run / "vae" / "diffusion_pytorch_model.safetensors").stat().st_mtime

    out = train_mod.train(run, recipe=TINY_RECIPE)
    lines = _log_lines(run)
    assert {"stage": "unet", "resumed_at": 1}.items() <= next(x for x in lines if "resumed_at" in x).items()
    assert [x["exported_step"] for x in lines if "exported_step" in x] == [3, 5]
    assert (run / "vae" / "diffusion_pytorch_model.safetensors").stat().st_mtime == vae_mtime  # not retrained

    from datasetdm.backbone.loader import load_backbone

    from safetensors.torch import load_file

    saved = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in saved.values()} == {torch.float16}  # shipped weights are fp16
    bb = load_backbone(out)
    ema = train_mod.read_unet_state(run)["ema"]
    key = next(iter(ema))
    torch.testing.assert_close(bb.unet.state_dict()[key].float(), ema[key].half().float())  # export = EMA
    assert bb.vae.config.scaling_factor > 0

    with pytest.raises(DatasetdmError, match="recipe.json"):
        train_mod.train(run, recipe=train_mod.Recipe(n_images=72, vae_steps=4))


def test_resume_pack_carries_the_run_to_a_new_folder(tiny_models, tmp_path):
    run = tmp_path / "run"
    train_mod.train(run, max_minutes=0.0, recipe=TINY_RECIPE)
    state = train_mod.read_unet_state(run)
    pack = train_mod.write_resume_pack(run, tmp_path / "pack")
    assert sorted(p.name for p in pack.iterdir()) == ["recipe.json", "resume-pack.safetensors", "train.log", "vae"]

    new = tmp_path / "new"
    new.mkdir()
    import shutil

    shutil.copytree(pack, new, dirs_exist_ok=True)
    # stop again right after loading: the weights must be the packed ones (fp16-rounded)
    train_mod.train(new, max_minutes=0.0, recipe=TINY_RECIPE)
    assert any(x.get("resumed_from_pack_at") == 1 for x in _log_lines(new))
    resumed = train_mod.read_unet_state(new)
    assert resumed["step"] == 2
    key = next(iter(state["ema"]))
    assert torch.allclose(resumed["ema"][key], state["ema"][key], atol=5e-2)
    train_mod.train(new, recipe=TINY_RECIPE)
    assert any(x.get("exported_step") == 5 for x in _log_lines(new))


def test_export_records_training_and_seeds_a_new_run(tiny_models, tmp_path):
    import dataclasses

    from safetensors.torch import load_file

    run = tmp_path / "run"
    out = train_mod.train(run, recipe=TINY_RECIPE)
    info = json.loads((out / "training.json").read_text())
    assert info["step"] == 5 and info["recipe"] == dataclasses.asdict(TINY_RECIPE)
    assert (run / "train.log").read_text().startswith((out / "train.log").read_text())  # up to the export

    with pytest.raises(DatasetdmError, match="would not train it further"):
        train_mod.seed_run_from_export(out, tmp_path / "shorter", unet_steps=5)
    longer = dataclasses.replace(TINY_RECIPE, unet_steps=7)  # extend the schedule past the export
    seeded = train_mod.seed_run_from_export(out, tmp_path / "seeded", unet_steps=7)
    assert json.loads((seeded / "recipe.json").read_text()) == dataclasses.asdict(longer)
    with pytest.raises(DatasetdmError, match="not empty"):
        train_mod.seed_run_from_export(out, seeded)
    with pytest.raises(DatasetdmError, match="another recipe"):
        train_mod.train(seeded, recipe=TINY_RECIPE)  # resuming needs the same --unet-steps
    exported = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    train_mod.train(seeded, max_minutes=0.0, recipe=longer)  # one step from the export's weights
    state = train_mod.read_unet_state(seeded)
    assert state["step"] == 6
    key = next(k for k in exported if k.endswith("weight"))
    # the EMA moved by at most one 0.1% step away from the exported weights
    torch.testing.assert_close(state["ema"][key], exported[key].float(), atol=2e-3, rtol=0)
    train_mod.train(seeded, recipe=longer)
    lines = _log_lines(seeded)
    assert any(x.get("resumed_from_pack_at") == 5 for x in lines)
    assert [x["exported_step"] for x in lines if "exported_step" in x][-1] == 7


def test_render_data_is_the_same_with_worker_processes(tmp_path):
    recipe = train_mod.Recipe(n_images=600)  # two chunks of 500, the last one short
    for workers in (1, 2):
        (tmp_path / str(workers)).mkdir()
        train_mod.render_data(tmp_path / str(workers), recipe, workers=workers)
    one, two = (np.load(tmp_path / str(w) / "data.npz") for w in (1, 2))
    assert one["images"].shape == (600, embedded.IMAGE_SIZE, embedded.IMAGE_SIZE, 3)
    assert one["images"][:5].std() > 10  # rendered scenes, not the zero-filled buffer
    np.testing.assert_array_equal(one["images"], two["images"])
    assert list(one["captions"]) == list(two["captions"])
    assert len(set(one["captions"][:100])) > 50


def test_train_command_refuses_a_missing_gpu(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from datasetdm.cli import app

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = CliRunner().invoke(app, ["backbone", "train", "--run", str(tmp_path / "run"), "--device", "cuda"])
    assert isinstance(result.exception, DatasetdmError)  # `main` prints it and exits 2
    assert "--device cuda" in str(result.exception) and not (tmp_path / "run").exists()


def test_train_command_seeds_with_a_larger_batch_and_resumes_from_the_runs_recipe(tiny_models, tmp_path):
    from typer.testing import CliRunner

    from datasetdm.cli import app

    out = train_mod.train(tmp_path / "run", recipe=TINY_RECIPE)
    seeded = tmp_path / "seeded"
    args = ["backbone", "train", "--run", str(seeded), "--threads", "1"]
    res = CliRunner().invoke(app, args + ["--from-export", str(out), "--unet-steps", "7", "--unet-batch", "3",
                                          "--max-minutes", "0"])
    assert res.exit_code == 0, res.output
    recipe = json.loads((seeded / "recipe.json").read_text())
    assert (recipe["unet_batch"], recipe["unet_steps"], recipe["n_images"]) == (3, 7, TINY_RECIPE.n_images)
    assert train_mod.read_unet_state(seeded)["step"] == 6
    # no options: the run's own recipe.json (not the shipped RECIPE) says how to go on
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert [x["exported_step"] for x in _log_lines(seeded) if "exported_step" in x][-1] == 7


def test_init_from_keeps_the_latent_space_and_starts_the_unet_at_step_zero(tiny_models, tmp_path):
    """Warm start (backbone v2 from v1): the export's VAE encoder is frozen (same latents), its
    decoder fine-tuned on this world; the UNet starts from the export's weights at step 0."""
    from dataclasses import replace

    from diffusers import AutoencoderKL, UNet2DConditionModel

    first = train_mod.train(tmp_path / "v1", recipe=replace(TINY_RECIPE, world_preset="crowded"))
    recipe = replace(TINY_RECIPE, init_from=str(first), vae_finetune_steps=3, unet_steps=2)
    train_mod.train(tmp_path / "v2", max_minutes=0.0, recipe=recipe)  # stops after the first UNet step
    log = _log_lines(tmp_path / "v2")
    assert any(line.get("reused_from") == str(first) for line in log)
    assert any("initialised_from" in line for line in log)
    old = AutoencoderKL.from_pretrained(first / "vae", torch_dtype=torch.float32)
    new = AutoencoderKL.from_pretrained(tmp_path / "v2" / "vae")
    for (name, a), (_, b) in zip(old.encoder.state_dict().items(), new.encoder.state_dict().items()):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, b) for a, b in zip(old.decoder.state_dict().values(), new.decoder.state_dict().values()))
    state = train_mod.read_unet_state(tmp_path / "v2")
    assert state["step"] == 1 and state["recipe"]["init_from"] == str(first)
    # one step away from the export's weights, not from a random initialisation
    start = UNet2DConditionModel.from_pretrained(first / "unet", torch_dtype=torch.float32).state_dict()
    drift = max((state["unet"][k] - v).abs().max().item() for k, v in start.items())
    assert drift < 0.05


def test_a_state_file_resumes_its_ema_and_learning_rate(tiny_models, tmp_path):
    """A run's ``unet-state.safetensors`` (the layout of every run so far: ``ema`` = the averaged
    UNet's state dict) resumes the average where it was: one more step moves it by the decay of
    that step, (1 + s) / (10 + s), towards the trained weights."""
    run = tmp_path / "run"
    recipe = train_mod.Recipe(**{**TINY_RECIPE.__dict__, "unet_steps": 4, "export_every": 100})
    train_mod.train(run, max_minutes=0.0, recipe=recipe)
    first = train_mod.read_unet_state(run)
    assert set(first) == {"unet", "ema", "opt", "generator", "step", "rewarm_from", "recipe"}
    assert first["step"] == 1 and set(first["ema"]) == set(first["unet"])
    train_mod.train(run, max_minutes=0.0, recipe=recipe)  # one more step, from the file
    second = train_mod.read_unet_state(run)
    assert second["step"] == 2
    decay = (1 + 1) / (10 + 1)
    for key in list(first["ema"])[:20]:
        expected = first["ema"][key] + (1 - decay) * (second["unet"][key] - first["ema"][key])
        torch.testing.assert_close(second["ema"][key], expected, atol=1e-6, rtol=1e-5)
    lr = second["opt"]["param_groups"][0]["lr"]
    assert lr == pytest.approx(recipe.unet_lr * (1 + 1) / recipe.warmup)  # step 1 of a 2-step warm-up
