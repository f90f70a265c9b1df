"""The README's "every task" table from ``datasetdm downstream --task T`` result files.

    python bench/downstream_task_table.py runs/ds/downstream-depth.json runs/ds-inst/downstream-instance.json

Each argument is a ``downstream-{task}.json`` (``downstream.json`` for semantic) that a default run
wrote: 100 real scenes, 1000 synthetic samples, 500 test scenes. One row per file, in the table's
task order (a semantic run with ``--semantic-head pixels``, or a run with ``--decoder-iterations`` or
``--min-instance-score``, or prompted away from the task's default prompts, gets its own row; an
instance or pose run made before the task models' regression heads started at zero, session 21, is
labelled "random-init heads"; a run whose joint model
drew every batch half real — `--joint mixed`, and every run before session 22 — is labelled "mixed
joint"); a task with no file keeps its "not yet measured" row. Domain-shift runs (``downstream
--domain``) get a table after it per setting and lighting trained on, one row per file. A joint recipe
other than the default ``finetune`` is named in the row. The change against real-only is given for the synthetic
and joint models (lower is better for AbsRel, higher for the rest).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# task → (row label, metrics as (key, short name, higher is better))
TASKS = {
    "semantic": ("semantic, mIoU", [("miou", "mIoU", True)]),
    "instance": ("instance, mask AP / AP50", [("mask_ap", "AP", True), ("mask_ap50", "AP50", True)]),
    "depth": ("depth, AbsRel / δ1", [("abs_rel", "AbsRel", False), ("delta1", "δ1", True)]),
    "pose": ("pose, keypoint AP / AP50", [("keypoint_ap", "AP", True), ("keypoint_ap50", "AP50", True)]),
}


def task_of(result: dict) -> str:
    return result.get("task", "semantic")


def figures(result: dict, task: str, model: str) -> list[float | None]:
    if task == "semantic":
        return [result.get(f"{model}_miou")]
    return [result.get(f"{model}_{key}") for key, _, _ in TASKS[task][1]]


def cell(values: list[float | None], real: list[float | None] | None) -> str:
    parts = []
    for i, v in enumerate(values):
        if v is None:
            parts.append("–")
        elif real is None or real[i] is None:
            parts.append(f"{v:.3f}")
        else:
            parts.append(f"{v:.3f} ({v - real[i]:+.3f})")
    return " / ".join(parts)


def row(result: dict) -> str:
    from datasetdm.evaluation.downstream import default_prompts

    task = task_of(result)
    notes = []  # what sets the run apart from today's default
    if result.get("semantic_head", "masks") != "masks":
        notes.append(f"`--semantic-head {result['semantic_head']}`")
    if result.get("decoder_iterations") is not None:
        notes.append(f"`--decoder-iterations {result['decoder_iterations']}`")
    prompts = (result.get("generation") or {}).get("prompts")
    if prompts is not None and prompts != default_prompts(task):  # e.g. pose prompted by all captions
        notes.append(f"`--prompts {Path(prompts).name}`")
    min_score = (result.get("generation") or {}).get("min_instance_score")
    if min_score is not None:
        notes.append(f"`--min-instance-score {min_score:g}`")
    if task in ("instance", "pose") and "zero_init_heads" not in result.get("config", {}):
        notes.append("random-init heads")
    if result.get("joint", "mixed") == "mixed":  # result files before session 22 name no recipe: mixed
        notes.append("mixed joint")
    elif result["joint"] != "finetune":
        notes.append(f"`--joint {result['joint']}`")
    label = TASKS[task][0]
    if notes:
        label = label.replace(",", f" ({', '.join(notes)}),", 1)
    real = figures(result, task, "real")
    return (f"| {label} | {cell(real, None)} | {cell(figures(result, task, 'synthetic'), real)} | "
            f"{cell(figures(result, task, 'joint'), real)} |")


def domain_table(results: list[dict]) -> list[str]:
    """Rows of the domain-shift tables: real from one setting and lighting, tested outside it; one
    table per training domain, one row per file."""
    lines, by_domain = [], {}
    for result in results:
        domain = result["domain"]
        trained = ", ".join(v for v in (domain.get("setting"), domain.get("lighting")) if v) or "any"
        by_domain.setdefault(trained, []).append(result)
    for trained, rows in by_domain.items():
        lines += ["", f"| domain shift (real: {trained}; test: every other setting or lighting) | real 100 | "
                  "synthetic only | real + synthetic |", "|---|---|---|---|", *map(row, rows)]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", type=Path, help="downstream result files (JSON)")
    args = ap.parse_args()
    by_task: dict[str, list[dict]] = {}
    domain: list[dict] = []
    for path in args.results:
        result = json.loads(path.read_text())
        if result.get("domain"):
            domain.append(result)
        else:
            by_task.setdefault(task_of(result), []).append(result)
    if by_task or not domain:  # domain-shift files alone: their table only
        print("| task (500 test scenes, 1000 synthetic, 2000 steps) | real 100 | synthetic only | real + synthetic |")
        print("|---|---|---|---|")
        for task, (label, _) in TASKS.items():
            if task in by_task:
                for result in by_task[task]:
                    print(row(result))
            elif task == "semantic":
                print(f"| {label} | see \"Choosing a labeler\" | | |")
            else:
                print(f"| {label} | not yet measured | not yet measured | not yet measured |")
    for line in domain_table(domain)[0 if by_task else 1:]:
        print(line)


if __name__ == "__main__":
    main()
