"""The README's semantic-head tables from ``bench/decoder_ablation.py --seed N`` result files.

    python bench/decoder_ablation_table.py --tuned runs/s16/abl --untuned runs/s17/conf

``--tuned``/``--untuned``: the ``--out`` folders of the runs (results.json for seed 0,
results-seed{N}.json for the others) on the tuning data and on data seeds not tuned on.
"""

import argparse
import json
import statistics as st
from pathlib import Path

ROWS = [("mask classification (the default)", "caption+v16"),
        ("per-pixel, cross-entropy", "pixel+caption+v16"),
        ("per-pixel, cross-entropy + dice (`--semantic-head pixels`)", "pixel+dice+caption+v16")]


def load(out: Path) -> dict:
    res = {}
    for f in sorted(out.glob("results*.json")):
        seed = 0 if f.name == "results.json" else int(f.stem.split("seed")[1])
        res[seed] = json.loads(f.read_text())
    return dict(sorted(res.items()))


def table(res: dict, title: str, rows) -> str:
    seeds = list(res)
    lines = [f"| {title} | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |", "|---|" + "---|" * (len(seeds) + 1)]
    for name, v in rows:
        xs = [res[s][v]["test_miou"] if v in res[s] else None for s in seeds]
        got = [x for x in xs if x is not None]
        if got:
            lines.append(f"| {name} | " + " | ".join("—" if x is None else f"{x:.3f}" for x in xs) + f" | {st.mean(got):.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tuned", type=Path, required=True)
    ap.add_argument("--untuned", type=Path, required=True)
    args = ap.parse_args()
    print(table(load(args.tuned), "semantic head (captions, 16 views)", ROWS))
    print()
    print(table(load(args.untuned), "data seeds not tuned on (train 1, test 2)", ROWS[::2]))


if __name__ == "__main__":
    main()
