"""The README tables printed from saved result lines (issue 22): ablation rows, the long-tail table and
the domain-shift table each carry the saved figures, rounded, in the saved order."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys

from bench_support import BENCH, load_bench


def _ablation_line(ablation: str, values: list, figures: list[tuple]) -> dict:
    settings = [{"value": v, "real_miou": r, "synthetic_miou": s, "joint_miou": j, "n_synthetic": 1000}
                for v, (r, s, j) in zip(values, figures)]
    if ablation == "timestep":
        for s, t in zip(settings, (1, 41)):
            s["timestep"] = t
    return {"ablation": ablation, "task": "semantic", "metric": "miou", "values": values, "settings": settings}


def test_ablation_row_joins_values_and_figures(tmp_path):
    bench = load_bench("ablations")
    line = _ablation_line("prompts", ["templates", "captions", str(BENCH / "prompts" / "world-llm.txt")],
                          [(0.8351, 0.70049, 0.8802), (0.8351, 0.823, 0.894), (0.8351, None, 0.9)])
    assert bench.markdown_row(line) == ("| prompt source | templates / captions / `world-llm.txt` | 0.835 / 0.835 / 0.835 "
                                        "| 0.700 / 0.823 / – | 0.880 / 0.894 / 0.900 |")
    timestep = _ablation_line("timestep", [-1, -2], [(0.8, 0.7, 0.9), (0.8, 0.6, 0.85)])
    assert bench.markdown_row(timestep).startswith("| capture step (t) | -1 (t = 1) / -2 (t = 41) | 0.800 / 0.800 |")
    guidance = _ablation_line("guidance", [1.0, 7.5], [(0.8, 0.5, 0.81), (0.8, 0.6, 0.82)])
    assert "| 1 / 7.5 |" in bench.markdown_row(guidance)

    # --table reads saved lines (the bench's last line, as docs/ keeps it) and runs nothing
    files = []
    for name, saved in (("prompts", line), ("guidance", guidance)):
        files.append(tmp_path / f"ablation-{name}.json")
        files[-1].write_text(json.dumps(saved))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        bench.main(["--table", *map(str, files)])
    assert printed.getvalue().splitlines() == [bench.markdown_row(line), bench.markdown_row(guidance)]


def test_long_tail_table_rows(tmp_path):
    bench = load_bench("long_tail")
    run = {"real_head_miou": 0.7648, "real_tail_miou": 0.2399, "synthetic_head_miou": 0.6972,
           "synthetic_tail_miou": 0.2133, "joint_head_miou": 0.734, "joint_tail_miou": 0.2532}
    line = {"tail": ["ball", "star"], "class_quota": 150, "joint": "finetune", "head_images": 20, "tail_images": 2,
            "synthetic_tail_images": {"no_quota": {"ball": 26, "star": 24}, "quota": {"ball": 157, "star": 164}},
            "no_quota": {**run, "class_quota": None}, "quota": {**run, "joint_tail_miou": None, "class_quota": 150}}
    rows = bench.markdown_table(line).splitlines()
    assert rows[0].startswith("| long-tail (tail: ball, star; 2 images each) |")
    assert rows[2] == ("| synthetic prompted with the set's captions | 0.765 / 0.240 | 0.697 / 0.213 | 0.734 / 0.253 "
                       "| 26 / 24 |")
    assert rows[3] == "| … with `--class-quota 150` | 0.765 / 0.240 | 0.697 / 0.213 | 0.734 / – | 157 / 164 |"
    saved = tmp_path / "long-tail.json"
    saved.write_text(json.dumps(line))
    done = subprocess.run([sys.executable, str(BENCH / "long_tail.py"), "--table", str(saved)],
                          capture_output=True, text=True, check=True)
    assert done.stdout.splitlines() == rows
    # a second recipe's file adds its rows under the same header, named for the recipe; a line saved
    # before lines named their recipe (docs/long-tail.json) is of the mixed joint model
    mixed = {**line, "no_quota": {**run, "joint_tail_miou": 0.3, "class_quota": None}}
    del mixed["joint"]
    both = bench.markdown_table(line, mixed).splitlines()
    assert both[:4] == rows and len(both) == 6
    assert both[4] == ("| synthetic prompted with the set's captions, `--joint mixed` | 0.765 / 0.240 | 0.697 / 0.213 "
                       "| 0.734 / 0.300 | 26 / 24 |")
    assert both[5].startswith("| … with `--class-quota 150`, `--joint mixed` |")
    assert bench.markdown_table({**mixed, "joint": "mixed"}).splitlines()[2:] == both[4:]


def test_domain_results_get_their_own_table(tmp_path):
    bench = load_bench("downstream_task_table")
    domain = {"real_miou": 0.1952, "synthetic_miou": 0.1948, "joint_miou": 0.2161, "joint": "mixed",
              "domain": {"setting": "grass", "lighting": "sunny", "test": "outside"}}
    semantic = {"real_miou": 0.835, "synthetic_miou": 0.823, "joint_miou": 0.894, "joint": "finetune"}
    paths = []
    for name, result in (("domain", domain), ("semantic", semantic)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(result))

    def table(*files) -> list[str]:
        done = subprocess.run([sys.executable, str(BENCH / "downstream_task_table.py"), *map(str, files)],
                              capture_output=True, text=True, check=True)
        return done.stdout.splitlines()

    alone = table(paths[0])
    assert alone == ["| domain shift (real: grass, sunny; test: every other setting or lighting) | real 100 | "
                     "synthetic only | real + synthetic |", "|---|---|---|---|", bench.row(domain)]
    assert bench.row(domain) == "| semantic (mixed joint), mIoU | 0.195 | 0.195 (-0.000) | 0.216 (+0.021) |"
    both = table(*paths)
    assert both[2] == "| semantic, mIoU | 0.835 | 0.823 (-0.012) | 0.894 (+0.059) |"
    assert both[-3:] == alone and both[-4] == ""  # the domain table after the task table, apart
    # another recipe on the same domain: a row of the same table; recipes other than finetune are named
    other = tmp_path / "domain-finetune.json"
    other.write_text(json.dumps({**domain, "joint": "finetune", "joint_miou": 0.2932}))
    assert table(paths[0], other) == alone + ["| semantic, mIoU | 0.195 | 0.195 (-0.000) | 0.293 (+0.098) |"]
    share = tmp_path / "semantic-share.json"
    share.write_text(json.dumps({**semantic, "joint": "finetune:0.75"}))
    assert table(share)[2].startswith("| semantic (`--joint finetune:0.75`), mIoU |")


def test_pose_rows_name_prompts_other_than_pose_default():
    bench = load_bench("downstream_task_table")
    pose = {"task": "pose", "joint": "finetune", "config": {"zero_init_heads": True},
            "real_keypoint_ap": 0.616, "real_keypoint_ap50": 0.96, "synthetic_keypoint_ap": 0.588,
            "synthetic_keypoint_ap50": 0.901, "joint_keypoint_ap": 0.712, "joint_keypoint_ap50": 0.951,
            "generation": {"prompts": "people"}}
    assert bench.row(pose).startswith("| pose, keypoint AP / AP50 | 0.616 / 0.960 | 0.588 (-0.028)")
    captions = {**pose, "generation": {"prompts": "captions"}}
    assert bench.row(captions).startswith("| pose (`--prompts captions`), keypoint AP / AP50 |")
    semantic = {"real_miou": 0.835, "synthetic_miou": 0.823, "joint_miou": 0.894, "joint": "finetune",
                "generation": {"prompts": "captions"}}
    assert bench.row(semantic).startswith("| semantic, mIoU |")  # captions are semantic's default
