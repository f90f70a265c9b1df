"""What every command that generates with P-Decoders sets up the same way (`generate`, `demo`,
`downstream`): the checkpoints, their categories, the run's config record and the loop call."""

from __future__ import annotations

import hashlib
from pathlib import Path

from datasetdm.errors import DatasetdmError
from datasetdm.formats.sample import Category
from datasetdm.generation.loop import Filters, GenerationSummary, generate_dataset


def load_decoder_checkpoint(path: Path):
    from datasetdm.decoder import load_decoder

    if not Path(path).exists():
        raise DatasetdmError(f"{path}: decoder checkpoint not found")
    return load_decoder(path)


def file_digest(path: Path) -> str:
    """A file's or folder's content hash: a run records its decoders by content, not by path."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        digest.update(p.read_bytes())
    return digest.hexdigest()[:16]


def decoder_categories(decoders) -> list[Category]:
    """The union of the categories of ``decoders`` ([(path, decoder)]), by id; one id must mean
    one name in all of them."""
    from datasetdm.formats.coco import category_from_coco

    by_id: dict[int, Category] = {}
    for path, dec in decoders:
        for entry in dec.cfg.categories:
            cat = category_from_coco(entry)
            if cat.id in by_id and by_id[cat.id].name != cat.name:
                raise DatasetdmError(f"{path}: category id {cat.id} is {cat.name!r} here but "
                                     f"{by_id[cat.id].name!r} in another decoder")
            by_id.setdefault(cat.id, cat)
    return [by_id[i] for i in sorted(by_id)]


def decoder_run_config(decoders, steps: int, guidance: float, min_pixel_confidence: float | None) -> dict:
    config = {"steps": steps, "guidance": guidance, "decoders": [file_digest(p) for p, _ in decoders]}
    if min_pixel_confidence is not None:  # only when set, so runs made before the option still resume
        config["min_pixel_confidence"] = min_pixel_confidence
    return config


def generate_with_decoders(out: Path, decoder_paths, prompts: Path, backbone: str, n: int, seed: int,
                           steps: int, guidance: float, batch_size: int, show_progress: bool = True,
                           min_pixel_confidence: float | None = None) -> GenerationSummary:
    """Generate ``n`` samples into ``out`` with prompts from the file ``prompts``, every decoder
    labelling each image; resumes when ``out`` holds an interrupted run."""
    from datasetdm.backbone.capture import generate as generate_images
    from datasetdm.backbone.loader import load_backbone
    from datasetdm.labelers.decoder import decoder_annotator
    from datasetdm.prompts import load_prompts

    loaded = [(p, load_decoder_checkpoint(p)) for p in decoder_paths]
    categories = decoder_categories(loaded)
    bb = load_backbone(backbone)
    for _, dec in loaded:
        dec.check_backbone(bb)
    annotators = {dec.cfg.task: decoder_annotator(dec, bb.tokenizer, min_pixel_confidence) for _, dec in loaded}

    def generate_fn(texts, seeds):
        return generate_images(bb, texts, seeds, num_inference_steps=steps, guidance_scale=guidance)

    source = load_prompts(prompts, classes=[c.name for c in categories], seed=seed)
    return generate_dataset(
        out, generate_fn, annotators, source, categories, n=n, seed=seed, batch_size=batch_size,
        filters=Filters(), backbone=f"{bb.name}@{bb.fingerprint}",
        config=decoder_run_config(loaded, steps, guidance, min_pixel_confidence),
        resume=(Path(out) / "run.json").exists(), progress=show_progress,
    )
