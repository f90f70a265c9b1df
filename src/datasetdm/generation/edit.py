"""Editing with labels (the DatasetDM paper's novel task composition, §1 and Fig. 4): regenerate one
sample of a generate run with a word of its prompt swapped ("red=blue", "ball=box"), from the same
seed, keeping its layout through the model's own attention (prompt-to-prompt, ref. [24]:
``backbone.p2p``), and label the edited image with the run's own decoders.

The source prompt and the edited one are denoised together under ``prompt_to_prompt``; the edited
row's hypercolumns are captured at the run's capture step and the decoders label them exactly as
generation does (``loop.merge_labels``). The result holds the stored sample (before), the edited
one (after), the source regenerated beside it (how faithfully the run's sample was reproduced),
and the semantic agreement of after with before.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from datasetdm.errors import DatasetdmError
from datasetdm.formats.sample import IGNORE_INDEX, Category, LabelledSample

if TYPE_CHECKING:  # torch loads only when an edit runs
    from datasetdm.backbone.loader import Backbone

CROSS_FRACTION = 0.8  # P2P's word-swap defaults: cross-attention injected for 80% of the steps,
SELF_FRACTION = 0.4  # self-attention for the first 40%


def parse_swaps(swaps: Sequence[str]) -> list[tuple[str, str]]:
    """["red=blue", ...] -> [("red", "blue"), ...]."""
    out = []
    for text in swaps:
        old, sep, new = text.partition("=")
        old, new = old.strip(), new.strip()
        if not sep or not old or not new or "=" in new:
            raise DatasetdmError(f"--swap {text!r}: expected OLD=NEW (e.g. red=blue)")
        out.append((old, new))
    if not out:
        raise DatasetdmError("--swap: give at least one OLD=NEW")
    return out


def swap_words(prompt: str, swaps: Sequence[tuple[str, str]], where: str = "prompt") -> str:
    """``prompt`` with each OLD replaced by NEW as a whole word (every occurrence)."""
    out = prompt
    for old, new in swaps:
        pattern = re.compile(r"\b" + re.escape(old) + r"\b", re.IGNORECASE)
        if not pattern.search(out):
            raise DatasetdmError(f"{where}: the prompt {prompt!r} has no word {old!r} to swap")
        out = pattern.sub(new, out)
    return out


def semantic_agreement(a: np.ndarray | None, b: np.ndarray | None) -> float | None:
    """Share of pixels with the same class in ``a`` and ``b`` (pixels ignore in either left out)."""
    if a is None or b is None:
        return None
    valid = (a != IGNORE_INDEX) & (b != IGNORE_INDEX)
    return float((a[valid] == b[valid]).mean()) if valid.any() else None


@dataclass
class EditResult:
    run: str
    sample_id: int
    prompt: str
    edited_prompt: str
    seed: int
    categories: list[Category]
    before: LabelledSample
    after: LabelledSample
    source_again: LabelledSample
    before_extras: dict = field(default_factory=dict)
    after_extras: dict = field(default_factory=dict)
    record: dict = field(default_factory=dict)


def _run_sample(run: Path, sample_id: int):
    from datasetdm.formats.shards import read_manifest, read_shards

    rows = [r for r in read_manifest(run).select(["id", "key", "prompt", "seed", "kept", "dropped_reason"]).to_pylist()
            if r["id"] == sample_id]
    if not rows:
        raise DatasetdmError(f"{run}: no sample {sample_id} in the manifest")
    row = rows[0]
    if not row["kept"]:
        raise DatasetdmError(f"{run}: sample {sample_id} was dropped ({row['dropped_reason']}); choose a kept one")
    for sample, extras in read_shards(run, with_extras=True):
        if sample.id == row["key"]:
            return row, sample, extras
    raise DatasetdmError(f"{run}: sample {sample_id} is listed as kept but is in no shard")


def edit_sample(run: str | Path, sample_id: int, swaps: Sequence[tuple[str, str]], decoders: Sequence[Path],
                backbone: str | Path | Backbone | None = None, cross_fraction: float = CROSS_FRACTION,
                self_fraction: float = SELF_FRACTION, device: str = "cpu") -> EditResult:
    """Regenerate sample ``sample_id`` of the shard run ``run`` with ``swaps`` applied to its prompt.
    ``decoders``: the run's decoder checkpoints (checked against run.json's digests);
    ``backbone``: the run's backbone, a source or a loaded ``Backbone`` (so many edits load it once;
    default the embedded one; its fingerprint is checked)."""
    import torch

    from datasetdm.backbone.loader import Backbone, load_backbone
    from datasetdm.backbone.p2p import EditControl, prompt_to_prompt, token_alignment
    from datasetdm.formats.shards import read_run_info, shard_categories
    from datasetdm.generation.loop import as_uint8_images, merge_labels
    from datasetdm.labelers.decoder import file_digest
    from datasetdm.labelers.registry import create_labeler
    from datasetdm.prompts.base import Prompt, classes_in_text

    run = Path(run)
    info = read_run_info(run)
    config = info.get("config", {})
    for name, value in (("--cross-steps", cross_fraction), ("--self-steps", self_fraction)):
        if not 0.0 <= value <= 1.0:
            raise DatasetdmError(f"{name} {value}: a fraction of the steps, in [0, 1]")
    if "attention_labeler" in config:
        raise DatasetdmError(f"{run / 'run.json'}: labelled by the attention labeler; edit relabels with the run's "
                             "decoders (--labeler decoder runs)")
    if not decoders:
        raise DatasetdmError("--decoder: pass the run's decoder checkpoints (the ones it was generated with)")
    digests = [file_digest(Path(p)) for p in decoders]
    if digests != config.get("decoders"):
        raise DatasetdmError(f"{run / 'run.json'}: generated with other decoders than {', '.join(map(str, decoders))} "
                             "(their digests differ); pass the run's --decoder checkpoints in its order")
    row, before, before_extras = _run_sample(run, sample_id)
    target = swap_words(row["prompt"], swaps, where=f"{run}: sample {sample_id}")
    bb = backbone if isinstance(backbone, Backbone) else load_backbone(backbone, device=device)
    if info.get("backbone") and info["backbone"] != f"{bb.name}@{bb.fingerprint}":
        raise DatasetdmError(f"{run / 'run.json'}: generated with backbone {info['backbone']}, not "
                             f"{bb.name}@{bb.fingerprint}; pass the run's --backbone")
    steps, guidance = int(config["steps"]), float(config["guidance"])
    labeling = create_labeler("decoder", bb, steps=steps, guidance=guidance, decoders=decoders,
                              min_pixel_confidence=config.get("min_pixel_confidence"),
                              min_instance_score=config.get("min_instance_score"))
    mapping, changed = token_alignment(bb.tokenizer, row["prompt"], target, bb.max_tokens)
    control = EditControl(mapping, cross_steps=round(cross_fraction * steps), self_steps=round(self_fraction * steps))
    with torch.no_grad(), prompt_to_prompt(bb.unet, control):
        images, hc = labeling.generate_fn([row["prompt"], target], [int(row["seed"])] * 2)
    images = as_uint8_images(images)
    names = [c.name for c in labeling.categories]
    prompts = [Prompt(t, classes_in_text(t, names)) for t in (row["prompt"], target)]
    labels = {name: list(annotate(images, hc, prompts)) for name, annotate in labeling.annotators.items()}
    merged = [merge_labels(images[b], {name: labels[name][b] for name in labels}) for b in range(2)]
    (again, _, _), (after, after_extras, _) = merged
    for sample, suffix, text in ((again, "source", row["prompt"]), (after, "after", target)):
        sample.id = f"{sample_id}-{suffix}"
        sample.caption = text
        sample.meta = {"seed": int(row["seed"])}
    before.id, before.caption = f"{sample_id}-before", row["prompt"]
    before.meta = {"seed": int(row["seed"])}
    diff = np.abs(again.image.astype(np.int16) - before.image.astype(np.int16))
    record = {
        "run": str(run), "sample": sample_id, "prompt": row["prompt"], "edited_prompt": target,
        "swaps": [f"{a}={b}" for a, b in swaps], "seed": int(row["seed"]), "steps": steps, "guidance": guidance,
        "cross_steps": control.cross_steps, "self_steps": control.self_steps,
        "changed_tokens": len(changed), "aligned_tokens": sum(i >= 0 for i in mapping),
        "semantic_agreement": semantic_agreement(before.semantic, after.semantic),
        "source_semantic_agreement": semantic_agreement(before.semantic, again.semantic),
        "source_image_mean_abs_diff": float(diff.mean()),
        "edited_image_mean_abs_diff": float(np.abs(after.image.astype(np.int16) - before.image.astype(np.int16)).mean()),
    }
    return EditResult(str(run), sample_id, row["prompt"], target, int(row["seed"]), shard_categories(run), before,
                      after, again, before_extras or {}, after_extras or {}, record)


def write_edit(out: str | Path, result: EditResult, overwrite: bool = False,
               gallery: Callable | None = None) -> Path:
    """``out/samples`` (labelled folder: before, after), ``out/edit.json`` and, with ``gallery``
    (``view.write_gallery``), ``out/gallery``: before and after with their labels. Built in a
    hidden sibling and moved in whole (``io.atomic_folder``)."""
    from datasetdm.formats.labelled_folder import LabelledFolderWriter
    from datasetdm.io import atomic_folder, write_json_atomic

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise DatasetdmError(f"{out}: exists and is not empty; pass --overwrite to replace it")
    with atomic_folder(out) as tmp:
        with LabelledFolderWriter(tmp / "samples", result.categories) as writer:
            writer.add(result.before)
            writer.add(result.after)
        write_json_atomic(tmp / "edit.json", result.record)
        if gallery is not None:
            gallery([(result.before, result.before_extras), (result.after, result.after_extras)], result.categories,
                    tmp / "gallery", title=f"edit of sample {result.sample_id}: {', '.join(result.record['swaps'])}")
    return out


def summary_line(result: EditResult) -> str:
    keys = ("sample", "edited_prompt", "semantic_agreement", "source_semantic_agreement", "source_image_mean_abs_diff",
            "edited_image_mean_abs_diff")
    return json.dumps({k: result.record[k] for k in keys})
