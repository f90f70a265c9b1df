"""bench/ablations.py (issue 22 item 5). Slow: every ablation's --tiny run on a tiny 64-px
backbone, in one shared --out, checked against what each setting must change (the manifest's
size, run.json's guidance and capture step, the prompts the samples were made from; one decoder
and one real-only model for all). Default run: the settings' checks and names, the capture step
reaching the generator, the LLM-style prompt file."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from datasetdm.errors import DatasetdmError
from datasetdm.formats.shards import read_manifest, read_run_info

from bench_support import load_bench


def _bench():
    return load_bench("ablations")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The four ablations, --tiny, one after another in one folder: (out, {ablation: last JSON line})."""
    from datasetdm.testing import make_tiny_backbone

    backbone = make_tiny_backbone(tmp_path_factory.mktemp("bb64"), text_encoder="clip", sample_size=64)
    out = tmp_path_factory.mktemp("ablations")
    bench = _bench()
    lines = {}
    for ablation in bench.ABLATIONS:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            returned = bench.main(["--ablation", ablation, "--out", str(out), "--tiny", "--backbone", str(backbone),
                                   "--generation-steps", "3"])
        lines[ablation] = json.loads(printed.getvalue().strip().splitlines()[-1])  # the last line is the JSON
        assert lines[ablation] == json.loads(json.dumps(returned))
    return out, lines


def _check_line(line: dict, ablation: str, values: list) -> list[dict]:
    assert line["ablation"] == ablation and line["task"] == "semantic" and line["metric"] == "miou"
    assert [s["value"] for s in line["settings"]] == values
    for s in line["settings"]:
        assert {"real_miou", "synthetic_miou", "joint_miou", "n_synthetic", "shards", "result_file"} <= set(s)
    # one real set, one real-only model: its figure is the same in every setting
    assert len({s["real_miou"] for s in line["settings"]}) == 1
    return line["settings"]


@pytest.mark.slow
def test_size_ablation_makes_each_size(runs):
    _, lines = runs
    for s in _check_line(lines["size"], "size", [2, 4]):
        assert read_manifest(s["shards"]).num_rows == s["value"]  # kept or dropped, one row per sample
        assert 0 < s["n_synthetic"] <= s["value"]
        assert read_run_info(s["shards"])["config"]["guidance"] == 4.0


@pytest.mark.slow
def test_guidance_reaches_the_generator(runs):
    _, lines = runs
    settings = _check_line(lines["guidance"], "guidance", [1.0, 4.0])
    assert [read_run_info(s["shards"])["config"]["guidance"] for s in settings] == [1.0, 4.0]
    assert len({s["shards"] for s in settings}) == 2


@pytest.mark.slow
def test_capture_step_reaches_the_generator(runs):
    _, lines = runs
    settings = _check_line(lines["timestep"], "timestep", [-1, -2])
    configs = [read_run_info(s["shards"])["config"] for s in settings]
    assert "capture_step" not in configs[0]  # the default run is the one made before the option existed
    assert configs[1]["capture_step"] == -2
    assert settings[0]["timestep"] < settings[1]["timestep"]  # an earlier step is a noisier t


@pytest.mark.slow
def test_prompt_sources_reach_the_generator(runs):
    out, lines = runs
    bench = _bench()
    templates, captions, llm = _check_line(lines["prompts"], "prompts",
                                           ["templates", "captions", str(bench.LLM_PROMPTS)])
    used = {name: set(read_manifest(s["shards"]).column("prompt").to_pylist())
            for name, s in (("templates", templates), ("captions", captions), ("llm", llm))}
    assert all(p.startswith("a photo of") for p in used["templates"])
    assert used["captions"] <= set((out / "prompts-n4.txt").read_text().splitlines())
    file_lines = {line for line in bench.LLM_PROMPTS.read_text().splitlines() if line and not line.startswith("#")}
    assert used["llm"] <= file_lines
    # the default setting (captions, guidance 4, last step, 4 samples) is one run shared by every ablation
    assert captions["shards"] == lines["size"]["settings"][1]["shards"] == lines["guidance"]["settings"][1]["shards"]


@pytest.mark.slow
def test_one_decoder_and_one_real_model_serve_every_setting(runs):
    out, lines = runs
    assert [p.name for p in (out / "decoders").iterdir() if (p / "config.json").exists()] == ["semantic"]
    synthetic_sets = {s["shards"] for line in lines.values() for s in line["settings"]}
    assert len(synthetic_sets) == 6  # the default run (in every ablation) and one per other value
    # per synthetic set at most its synthetic-only and joint model (sets with the same images and
    # labels share them), and the real-only model once
    assert len(list((out / "cache").glob("segmenter-*.json"))) <= 2 * len(synthetic_sets) + 1


# ------------------------------------------------------------------ default run


def test_generation_settings_name_their_runs():
    from datasetdm.evaluation.downstream import _generation_settings

    assert _generation_settings(1000, 25, 4.0, -1, "captions")["tag"] == ""  # the default keeps its old names
    assert _generation_settings(250, 25, 4.0, -1, "captions")["tag"] == "-n250"
    assert _generation_settings(1000, 25, 7.5, -2, "templates")["tag"] == "-g7.5-capture-2-prompts-templates"
    assert _generation_settings(1000, 3, 1.0, -1, "/x/world-llm.txt")["tag"] == "-steps3-g1-prompts-world-llm"
    # the label filters too: runs that keep other labels never share shards, synthetic sets or results
    assert _generation_settings(1000, 25, 4.0, -1, "captions", None, 0.7)["tag"] == "-minscore0.7"
    assert _generation_settings(1000, 25, 4.0, -1, "captions", 0.5, None)["tag"] == "-minconf0.5"
    # pose's default source is the people captions: its default run keeps the untagged names, captions are tagged
    assert _generation_settings(1000, 25, 4.0, -1, "people", default_source="people")["tag"] == ""
    assert _generation_settings(1000, 25, 4.0, -1, "captions", default_source="people")["tag"] == "-prompts-captions"
    assert _generation_settings(1000, 25, 4.0, -1, "people")["tag"] == "-prompts-people"


def test_build_and_run_checks_generation_options_first(tmp_path):
    import inspect

    from datasetdm.evaluation.downstream import build_and_run

    cases = [({"synthetic": tmp_path, "guidance": 7.5}, "--synthetic is generated already.*g7.5"),
             ({"prompts": tmp_path / "missing.txt"}, "--prompts .*missing.txt: no such prompt file"),
             ({"capture_step": 25}, "--capture-step 25: out of range for 25"),
             ({"long_tail": ["star"], "prompts": "templates"}, "--long-tail prompts with .* drop --prompts"),
             ({"task": "pose", "class_quota": 10}, "--class-quota: the people prompts .* drop one"),
             ({"min_instance_score": 0.7}, "--min-instance-score: .*--task is semantic"),
             ({"task": "instance", "synthetic": tmp_path, "min_instance_score": 0.7}, "generated already.*minscore0.7")]
    for kwargs, message in cases:
        with pytest.raises(DatasetdmError, match=message):
            build_and_run(tmp_path / "out", test_seed=1, **kwargs)
    assert not (tmp_path / "out").exists()  # refused before anything is built
    # every ablation's keyword is one build_and_run takes
    bench = _bench()
    accepted = inspect.signature(build_and_run).parameters
    for ablation in bench.ABLATIONS:
        assert set(bench.setting_kwargs(ablation, 0)) <= set(accepted)


def test_capture_step_is_the_step_the_labeler_reads(tiny_clip, semantic_checkpoint):
    """The decoder labeler's features come from the asked denoising step: its timestep is the
    scheduler's, and run.json's settings carry the step only when it is not the default."""
    from datasetdm.labelers.registry import create_labeler

    scheduler = type(tiny_clip.scheduler).from_config(tiny_clip.scheduler.config)
    scheduler.set_timesteps(3)
    read = {}
    for step in (-1, 0):
        labeling = create_labeler("decoder", tiny_clip, steps=3, guidance=2.0, decoders=[semantic_checkpoint],
                                  capture_step=step)
        _, hc = labeling.generate_fn(["a dog on grass"], [0])
        read[step] = (hc.timestep, labeling.config.get("capture_step"))
    assert read[-1] == (int(scheduler.timesteps[-1]), None)
    assert read[0] == (int(scheduler.timesteps[0]), 0)
    with pytest.raises(DatasetdmError, match="--capture-step 3: out of range for 3"):
        create_labeler("decoder", tiny_clip, steps=3, guidance=2.0, decoders=[semantic_checkpoint], capture_step=3)
    with pytest.raises(DatasetdmError, match="--capture-step is for decoder labels"):
        from datasetdm.formats.sample import Category

        create_labeler("attention", tiny_clip, steps=3, guidance=2.0, categories=[Category(1, "dog")],
                       capture_step=0)


def test_llm_style_prompt_file_names_world_classes():
    from datasetdm.prompts import read_prompts
    from datasetdm.world.render import CATEGORIES

    bench = _bench()
    header = bench.LLM_PROMPTS.read_text().splitlines()[:3]
    assert any("HAND-WRITTEN" in line for line in header)  # labelled as what it is
    prompts = read_prompts(bench.LLM_PROMPTS, [c.name for c in CATEGORIES])
    assert len(prompts) >= 40 and all(p.classes for p in prompts)
    assert {c for p in prompts for c in p.classes} == {c.name for c in CATEGORIES}
    assert all(len(p.text.split()) >= 10 for p in prompts)  # LLMPromptBuilder's min_words


def test_a_bench_on_a_folder_in_use_says_so_in_one_line(tmp_path):
    """Two ablation benches cannot share an --out (downstream's run lock): the second stops at once
    with the holder named and exit status 1, not a traceback (session 26 hit this)."""
    import subprocess
    import sys
    from pathlib import Path

    from datasetdm.io import output_lock

    bench = Path(__file__).resolve().parents[1] / "bench" / "ablations.py"
    with output_lock(tmp_path / "abl"):
        done = subprocess.run([sys.executable, str(bench), "--ablation", "guidance", "--out", str(tmp_path / "abl"),
                               "--tiny"], capture_output=True, text=True)
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("error: ") and "in use by another datasetdm run" in done.stderr
    assert "Traceback" not in done.stderr
    # DATASETDM_DEBUG=1 keeps the traceback, as in the CLI
    import os

    with output_lock(tmp_path / "abl"):
        debug = subprocess.run([sys.executable, str(bench), "--ablation", "guidance", "--out", str(tmp_path / "abl"),
                                "--tiny"], capture_output=True, text=True, env={**os.environ, "DATASETDM_DEBUG": "1"})
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "DatasetdmError" in debug.stderr
