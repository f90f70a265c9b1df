"""`datasetdm train` and `datasetdm evaluate`: plain functions the main app mounts with
``app.command("train")(train)`` / ``app.command("evaluate")(evaluate)`` (or ``register(app)``).

``python -m datasetdm.decoder.cli`` runs them standalone, with the main CLI's error handling.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from datasetdm.backbone.device import DEVICE_HELP, DTYPE_HELP
from datasetdm.decoder.heads import SEMANTIC_HEADS, TASKS
from datasetdm.errors import DatasetdmError


def train(
    data: Path = typer.Option(..., "--data", help="labelled folder (images/, semantic/, depth/, annotations.json), "
                              "or a data set as it ships with --format"),
    task: str = typer.Option(..., "--task", help=f"one of: {', '.join(TASKS)}"),
    out: Path = typer.Option(..., "--out", help="checkpoint directory to write (atomically)"),
    n_images: int = typer.Option(100, "--n-images", help="labelled images to train on (the first N; with --format, "
                                 "N drawn by --seed unless --per-class)"),
    data_format: str = typer.Option("folder", "--format", help="folder, or voc | coco | cityscapes | ade20k | nyu: "
                                    "import --data on the fly (as `datasetdm data import`), cached in {out}.data/"),
    split: str = typer.Option("train", "--split", help="with --format: the split to import"),
    per_class: Optional[int] = typer.Option(None, "--per-class", min=1,
                                            help="with --format: train on K images per class (VOC 5 -> 100)"),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="diffusers folder or hub id; default: embedded"),
    held_out_classes: Optional[str] = typer.Option(None, "--held-out-classes", help="open-vocab: a,b kept out of training"),
    features: str = typer.Option("hypercolumns", "--features", help="hypercolumns | raw-pixels (paper's baseline)"),
    iterations: Optional[int] = typer.Option(None, "--iterations", help="default: 3000 for instance and pose, "
                                             "1500 for the other tasks"),
    batch_size: int = typer.Option(8, "--batch-size"),
    views: int = typer.Option(16, "--views", help="cached views per image: original + augmented"),
    prompt: str = typer.Option("auto", "--prompt", help="auto | caption | template: what the backbone reads with "
                               "each image (auto: captions when every image has one)"),
    lr: float = typer.Option(1e-3, "--lr"),
    ema_decay: float = typer.Option(0.0, "--ema-decay", help="keep a moving average of the "
                                    "weights with this decay (e.g. 0.995) and save it; 0: the last step's weights"),
    attention: bool = typer.Option(True, "--attention/--no-attention", help="fuse cross-attention maps"),
    use_image: bool = typer.Option(True, "--image/--no-image", help="image path in the pixel decoder"),
    seed: int = typer.Option(0, "--seed", min=0),
    keep_cache: bool = typer.Option(False, "--keep-cache", help="keep {out}.work/ (feature cache) afterwards"),
    feature_cache: Optional[str] = typer.Option(
        None, "--feature-cache", help="folder of the on-disk feature cache (fp16 shards, reused by any run on the "
        "same images, views and backbone; kept); default {out}.work/, removed after training unless --keep-cache; "
        "'memory' keeps the features in RAM instead"),
    mask_stride: str = typer.Option("auto", "--mask-stride", help="mask logits of semantic/instance/open-vocab "
                                    "at 1/N of the image (auto: 4 from 256 px up, else 1)"),
    point_loss_points: str = typer.Option("auto", "--point-loss-points", help="mask losses on N sampled points "
                                          "per mask, 0: every pixel (auto: from 256 px up, else 0)"),
    semantic_head: str = typer.Option("masks", "--semantic-head", help="semantic decoders: masks (mask "
                                      "classification, the paper's) | pixels (a per-pixel classifier)"),
    checkpoint_every: int = typer.Option(250, "--checkpoint-every", min=1,
                                         help="save the resumable training state every N iterations"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a decoder checkpoint already in --out"),
    device: str = typer.Option("auto", "--device", help=f"backbone and decoder: {DEVICE_HELP}"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help=f"backbone and decoder precision: {DTYPE_HELP}"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Train a P-Decoder on a few labelled images; the diffusion model stays frozen.

    Hypercolumns of each image and a few augmented views are computed once and cached on disk
    (--feature-cache, default {out}.work/); an interrupted run continues from there when run again."""
    from datasetdm.training import TrainOptions, train_decoder

    if data_format != "folder":
        from datasetdm.formats.layouts import ImportOptions, cached_import

        # the import draws the few-shot set (seeded); training then uses all of it
        options = ImportOptions(split=split, per_class=per_class, n_images=None if per_class else n_images, seed=seed)
        data = cached_import(data_format, data, out.parent / f"{out.name}.data", options, show_progress=progress)
        n_images = json.loads((data / "import.json").read_text())["samples"]
    elif per_class is not None:
        raise DatasetdmError("--per-class: selects from a data set imported with --format; "
                             "for a labelled folder use `datasetdm data import` or --n-images")
    held = [h.strip() for h in held_out_classes.split(",") if h.strip()] if held_out_classes else []
    if semantic_head not in SEMANTIC_HEADS:
        raise DatasetdmError(f"--semantic-head {semantic_head!r}: {' or '.join(SEMANTIC_HEADS)}")
    if semantic_head != "masks" and task != "semantic":
        raise DatasetdmError(f"--semantic-head is for semantic decoders, not --task {task}")
    opts = TrainOptions(task=task, n_images=n_images, views=views, iterations=iterations, batch_size=batch_size,
                        lr=lr, ema_decay=ema_decay, seed=seed, features=features, attention=attention,
                        use_image=use_image,
                        held_out=held, keep_cache=keep_cache, device=device, dtype=dtype, prompt=prompt,
                        checkpoint_every=checkpoint_every, mask_stride=_auto_int(mask_stride, "--mask-stride"),
                        point_loss_points=_auto_int(point_loss_points, "--point-loss-points"),
                        semantic_head=semantic_head)
    if feature_cache == "memory":
        opts.feature_cache = "memory"
    elif feature_cache:
        opts.cache_dir = feature_cache
    summary = train_decoder(data, out, opts, backbone_source=backbone, show_progress=progress, overwrite=overwrite)
    typer.echo(json.dumps({"checkpoint": str(out), **summary}))


def _auto_int(value: str, flag: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise DatasetdmError(f"{flag}: 'auto' or a whole number, not {value!r}") from None


def evaluate(
    decoder: Path = typer.Option(..., "--decoder", help="checkpoint directory from `datasetdm train`"),
    data: Path = typer.Option(..., "--data", help="labelled folder of held-out images"),
    out: Optional[Path] = typer.Option(None, "--out", help="metrics JSON to write (default: beside the checkpoint, "
                                       "{decoder}.eval-{data folder name}.json)"),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="default: the one the decoder was trained on"),
    n_images: Optional[int] = typer.Option(None, "--n-images", help="score the first N images only"),
    device: str = typer.Option("auto", "--device", help=f"backbone and decoder: {DEVICE_HELP}"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help=f"backbone and decoder precision: {DTYPE_HELP}"),
    label_scores: Optional[str] = typer.Option(
        None, "--label-scores", help="instance decoders: comma-separated score thresholds at which to report "
        "label errors too (found, merged, missed, ...), to choose generate's --min-instance-score"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Score a decoder: mIoU, mask AP/AP50, depth AbsRel/RMSE/δ1, keypoint AP (those that apply).

    The last line printed is one JSON object with the headline figures."""
    from datasetdm.evaluation.evaluate import default_metrics_path, evaluate_decoder, headline

    out = out or default_metrics_path(decoder, data)
    scores = []
    for t in filter(None, (label_scores or "").split(",")):
        try:
            scores.append(float(t))
        except ValueError:
            raise DatasetdmError(f"--label-scores: {t!r} is not a number") from None
    metrics = evaluate_decoder(decoder, data, out=out, backbone_source=backbone, n_images=n_images,
                               show_progress=progress, device=device, dtype=dtype, label_scores=scores)
    for k, v in metrics.items():
        typer.echo(f"{k}: {json.dumps(v)}")
    typer.echo(f"wrote {out}")
    typer.echo(json.dumps(headline(metrics)))


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("evaluate")(evaluate)


app = typer.Typer(help="Few-shot P-Decoder training and evaluation.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
register(app)


def main(argv: list[str] | None = None) -> None:
    """Run ``app`` like ``datasetdm.cli.main`` does: a DatasetdmError or an OSError (named by its
    path) prints as one line and exits 2."""
    try:
        app(args=argv)
    except (DatasetdmError, OSError) as err:
        message = str(err) if isinstance(err, DatasetdmError) else f"{err.filename or 'datasetdm'}: {err.strerror or err}"
        typer.secho(f"error: {' '.join(message.split())}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
