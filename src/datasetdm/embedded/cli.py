"""`datasetdm backbone …`: train the embedded backbone (see embedded/train.py for the recipe)."""

from __future__ import annotations

from pathlib import Path

import typer

from datasetdm.backbone.device import DEVICE_HELP, DTYPE_HELP

backbone_app = typer.Typer(help="Train and check the embedded backbone.", no_args_is_help=True)


@backbone_app.command("train")
def train_command(
    run: Path = typer.Option(Path("runs/backbone"), help="Run folder: data, checkpoints, log, export/."),
    max_minutes: float = typer.Option(None, help="Stop the UNet stage after this long (resume later)."),
    threads: int = typer.Option(2, help="CPU threads for torch; also the processes that render the world."),
    from_export: Path = typer.Option(None, help="Seed a new RUN from an exported backbone (its training.json "
                                     "gives step and recipe), e.g. the committed one, and train it further."),
    unet_steps: int = typer.Option(None, help="Total UNet steps, overriding the recipe's (to train an export "
                                   "further; give the same value when resuming that run)."),
    unet_batch: int = typer.Option(None, help="UNet batch size, overriding the recipe's (with --from-export)."),
    device: str = typer.Option("cpu", help="Where the encoders and the UNet stage run: cpu or cuda."),
    init_from: Path = typer.Option(None, help="Start a new RUN from an export's VAE and UNet weights with a fresh "
                                   "schedule from step 0 (a warm start on a changed world)."),
) -> None:
    """Train VAE then UNet on world images and captions; resumes from RUN if it exists."""
    import torch

    from dataclasses import replace

    from datasetdm.config import read_config
    from datasetdm.embedded.train import RECIPE, Recipe, seed_run_from_export, train
    from datasetdm.errors import DatasetdmError

    if device != "cpu" and not (device.startswith("cuda") and torch.cuda.is_available()):
        raise DatasetdmError(f"--device {device}: not available here (torch sees no CUDA GPU)")
    torch.set_num_threads(threads)
    if from_export is not None:
        seed_run_from_export(from_export, run, unet_steps=unet_steps, unet_batch=unet_batch)
    # a seeded or started run keeps its own recipe; options only change what they name
    recipe_path = run / "recipe.json"
    recipe = read_config(Recipe, recipe_path) if recipe_path.exists() else RECIPE
    if init_from is not None:
        if not (init_from / "unet").is_dir() or not (init_from / "vae").is_dir():
            raise DatasetdmError(f"{init_from}: not an exported backbone (no unet/ and vae/)")
        if recipe_path.exists() and recipe.init_from != str(init_from):
            raise DatasetdmError(f"{recipe_path}: this run was started without --init-from {init_from}; use a new --run")
    overrides = {k: v for k, v in {"unet_steps": unet_steps, "unet_batch": unet_batch,
                                   "init_from": str(init_from) if init_from else None}.items() if v is not None}
    out = train(run, max_minutes=max_minutes, recipe=replace(recipe, **overrides), device=device, workers=threads)
    typer.echo(f"exported: {out}")


@backbone_app.command("check")
def check_command(
    backbone: Path = typer.Option(..., help="Backbone folder (diffusers layout), e.g. runs/backbone/export."),
    out: Path = typer.Option(None, help="Also write the figures to this JSON file."),
    quick: bool = typer.Option(False, help="Plumbing run: 32 generated samples and 100 test images."),
    samples: int = typer.Option(None, help="Generated samples for prompt fidelity (default 200, quick 32)."),
    test_images: int = typer.Option(None, help="Held-out test images (default 500, quick 100)."),
    steps: int = typer.Option(25, help="DDIM steps."),
    guidance: float = typer.Option(4.0, help="Classifier-free guidance scale."),
    min_pixels: int = typer.Option(16, help="Pixels a prompted category/colour needs to count as found."),
    cache: Path = typer.Option(Path("runs/reference"), help="Where the reference segmenter is cached."),
    reference_images: int = typer.Option(None, help="Reference segmenter training images (default 12000)."),
    reference_steps: int = typer.Option(None, help="Reference segmenter training steps (default 4000)."),
    threads: int = typer.Option(1, help="CPU threads for torch."),
    probe_only: bool = typer.Option(False, help="Only the hypercolumn probe gate (minutes; no reference segmenter)."),
    decoders: bool = typer.Option(False, help="Also the decoder gates: every task trained with `train`'s defaults "
                                  "on the 100 few-shot scenes and scored on --decoder-test-images test scenes "
                                  "(about 25 min on 2 cores; resumable in --work)."),
    decoder_test_seed: int = typer.Option(7, min=0, help="Test-split seed the decoder gates are scored on."),
    decoder_test_images: int = typer.Option(200, min=1, help="Test scenes the decoder gates are scored on."),
    work: Path = typer.Option(Path("runs/check"), help="Where the decoder gates keep their data and checkpoints."),
    device: str = typer.Option("auto", help=f"Backbone and decoders: {DEVICE_HELP}."),
    dtype: str = typer.Option(None, help=f"Backbone and decoder precision: {DTYPE_HELP}."),
) -> None:
    """Measure the backbone's quality gates: reference segmenter mIoU, prompt fidelity,
    hypercolumn probe. Progress goes to stderr; the last stdout line is the figures as JSON.
    Exit status 1 when a gate fails."""
    import json

    import torch

    from datasetdm.embedded.gates import CheckConfig, ReferenceConfig, run_checks
    from datasetdm.io import write_json_atomic

    torch.set_num_threads(threads)
    overrides = {k: v for k, v in dict(samples=samples, test_images=test_images).items() if v is not None}
    overrides.update(steps=steps, guidance=guidance, min_pixels=min_pixels)
    ref = {k: v for k, v in dict(n_train=reference_images, steps=reference_steps).items() if v is not None}
    if ref:  # another config is another cache entry (its hash names the file)
        overrides["reference"] = ReferenceConfig(**ref)
    config = CheckConfig.quick(**overrides) if quick else CheckConfig(**overrides)
    log = lambda m: typer.echo(m, err=True)  # noqa: E731
    result = run_checks(backbone, config, cache_dir=cache, log=log, probe_only=probe_only, device=device, dtype=dtype)
    if decoders:
        from datasetdm.embedded.gates import decoder_gates

        result.update(decoder_gates(backbone, work, decoder_test_seed, decoder_test_images, log=log,
                                    device=device, dtype=dtype))
        result["passed"] = result["passed"] and all(g["passed"] for g in result["decoder_gates"].values())
    result["quick"] = quick
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out, result)
    typer.echo(json.dumps(result))
    if not result["passed"]:
        raise typer.Exit(1)


@backbone_app.command("reference")
def reference_command(
    cache: Path = typer.Option(Path("runs/reference"), help="Where the reference segmenter is cached."),
    reference_images: int = typer.Option(None, help="Training images (default 12000)."),
    reference_steps: int = typer.Option(None, help="Training steps (default 4000)."),
    base: int = typer.Option(None, help="U-Net base width (default 16)."),
    depth: int = typer.Option(None, help="U-Net depth, resolutions (default 5)."),
    batch_size: int = typer.Option(None, help="Training batch (default 32)."),
    test_images: int = typer.Option(500, help="Held-out test images it is scored on."),
    package: bool = typer.Option(False, help="Also write it into the package (assets/reference, fp16, with its "
                                 "scores), so checks on a fresh clone need not train it."),
    retrain: bool = typer.Option(False, help="Train it even if a cached or packaged copy exists."),
    device: str = typer.Option("cpu", help="Where to train it: cpu or cuda (the default recipe takes "
                               "about half an hour on 2 cores)."),
    threads: int = typer.Option(2, help="CPU threads for torch."),
) -> None:
    """Train (or load) the gates' reference segmenter and score it on held-out world images.
    The last stdout line is its figures as JSON; exit status 1 when below its gate."""
    import json

    import torch

    from datasetdm.embedded import gates

    torch.set_num_threads(threads)
    ref = {k: v for k, v in dict(n_train=reference_images, steps=reference_steps, base=base, depth=depth,
                                 batch_size=batch_size).items() if v is not None}
    config = gates.ReferenceConfig(**ref)
    log = lambda m: typer.echo(m, err=True)  # noqa: E731
    held_out = gates.render_set("test", gates.TEST_SEED, test_images)
    model = gates.reference_segmenter(config, cache, log=log, held_out=held_out, eval_every=1000,
                                      retrain=retrain, device=device)
    scores = gates.segmenter_miou(model, held_out)
    passed = scores["semantic"] >= gates.GATES["reference_miou"]
    result = {"reference_miou_semantic": round(scores["semantic"], 4), "reference_miou_colour": round(scores["colour"], 4),
              "gate": gates.GATES["reference_miou"], "passed": passed, "test_images": test_images,
              "reference": gates.asdict(config), "reference_key": config.key()}
    if package:  # its score travels with it; every check still reports it against the gate
        result["packaged"] = str(gates.package_reference(model, config, scores=result))
    typer.echo(json.dumps(result))
    if not passed:
        raise typer.Exit(1)


@backbone_app.command("sheet")
def sheet_command(
    backbone: Path = typer.Option(..., help="Backbone folder (diffusers layout)."),
    out: Path = typer.Option(Path("docs/backbone-samples.png"), help="PNG to write."),
    n: int = typer.Option(16, help="Number of samples (captions of the first test-split scenes)."),
    columns: int = typer.Option(4, help="Tiles per row."),
    steps: int = typer.Option(25, help="DDIM steps."),
    guidance: float = typer.Option(4.0, help="Classifier-free guidance scale."),
    seed: int = typer.Option(0, min=0, help="Generation seed (per-sample seeds derive from it)."),
    threads: int = typer.Option(1, help="CPU threads for torch."),
) -> None:
    """A contact sheet of generated samples with their prompts written under them."""
    import torch

    from datasetdm.embedded.sheet import contact_sheet

    torch.set_num_threads(threads)
    path = contact_sheet(backbone, out, n=n, columns=columns, steps=steps, guidance=guidance, seed=seed,
                         log=lambda m: typer.echo(m, err=True))
    typer.echo(f"wrote {path}")


@backbone_app.command("pack")
def pack_command(
    run: Path = typer.Option(Path("runs/backbone"), help="Run folder with its UNet training state."),
    out: Path = typer.Option(..., help="Folder for the pack (copy its files into a new --run to resume there)."),
) -> None:
    """Write a small resume pack (VAE + fp16 UNet/EMA weights + step) to carry a run to another machine."""
    from datasetdm.embedded.train import write_resume_pack

    typer.echo(f"wrote {write_resume_pack(run, out)}")
