"""bench/joint_recipes.py: the real-only model and one joint model per recipe, each scored on several
test seeds (choose a recipe on one, report another), resumable from its kept figures."""

from datasetdm.formats.labelled_folder import LabelledFolderWriter
from datasetdm.world.render import CATEGORIES, render_scene

from bench_support import load_bench


def _folder(path, split, seed, n):
    with LabelledFolderWriter(path, list(CATEGORIES)) as w:
        for i in range(n):
            w.add(render_scene(split, seed, i))
    return path


def test_every_model_is_scored_on_every_seed_and_a_rerun_reads_them_back(tmp_path, monkeypatch):
    bench = load_bench("joint_recipes")
    real, syn = _folder(tmp_path / "real", "train", 0, 6), _folder(tmp_path / "syn", "val", 0, 5)
    keep = tmp_path / "keep"
    first = bench.compare(real, syn, "instance", [2, 1], 3, 4, ["finetune", "mixed"], keep)
    assert list(first) == ["real", "joint-finetune", "joint-mixed"]
    for by_seed in first.values():
        assert list(by_seed) == ["seed 2", "seed 1"]
        assert all(0.0 <= v <= 1.0 for figures in by_seed.values() for v in figures.values())
    assert len(list(keep.glob("instance-*-steps4-test3.json"))) == 3

    from datasetdm.evaluation import task_models

    monkeypatch.setattr(task_models, "train_task_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    assert bench.compare(real, syn, "instance", [1], 3, 4, ["finetune", "mixed"], keep) == {
        name: {"seed 1": by_seed["seed 1"]} for name, by_seed in first.items()}


def test_another_synthetic_set_trains_its_own_joint_models_beside_the_same_real_one(tmp_path, monkeypatch):
    bench = load_bench("joint_recipes")
    real, syn = _folder(tmp_path / "real", "train", 0, 6), _folder(tmp_path / "syn", "val", 0, 5)
    other = _folder(tmp_path / "people", "val", 1, 5)
    keep = tmp_path / "keep"
    bench.compare(real, syn, "instance", [2], 3, 4, ["finetune"], keep)

    from datasetdm.evaluation import task_models

    trained = []
    original = task_models.train_task_model
    monkeypatch.setattr(task_models, "train_task_model", lambda data, *a, **k: trained.append(len(data))
                        or original(data, *a, **k))
    result = bench.compare(real, other, "instance", [2], 3, 4, ["finetune"], keep, synthetic_tag="-syn-people")
    assert trained == [5, 6]  # only the new set's joint model: its synthetic phase, then the real one
    assert (keep / "instance-joint-finetune-syn-people-steps4-test3.json").exists()
    assert list(result) == ["real", "joint-finetune"]
