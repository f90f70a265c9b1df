"""The assets the package ships load offline and are what their records say: the embedded
backbone (assets/embedded) and the gates' reference segmenter (assets/reference)."""

import json

import numpy as np
import pytest

from datasetdm.backbone.loader import embedded_backbone_path, load_backbone
from datasetdm.embedded import gates


def test_shipped_backbone_loads_offline_and_generates():
    from datasetdm.backbone.capture import generate

    path = embedded_backbone_path()
    info = json.loads((path / "training.json").read_text())
    bb = load_backbone(None)
    assert bb.unet.config.sample_size == 16 and bb.unet.config.cross_attention_dim == 384
    assert info["recipe"].get("world_preset", "crowded") == "default", "the shipped backbone models world v2"
    images, hc = generate(bb, ["a red ball on grass on a sunny day"], [0], num_inference_steps=2, guidance_scale=4.0)
    assert images.shape == (1, 64, 64, 3) and images.dtype == np.uint8
    assert [f.shape[-1] for f in hc.features] == [16, 8, 4, 2]


def test_shipped_reference_is_the_default_config_and_passed_its_gate():
    from safetensors import safe_open

    config = gates.ReferenceConfig()
    path = gates.packaged_reference_path(config)
    assert path.is_file(), f"{path}: the default reference segmenter is not shipped"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["config"]) == gates.asdict(config)
    assert json.loads(meta["scores"])["reference_miou_semantic"] >= gates.GATES["reference_miou"]
    assert config.world_preset == "default", "the shipped reference measures world v2"


@pytest.mark.slow
def test_shipped_reference_scores_as_recorded():
    from safetensors import safe_open

    config = gates.ReferenceConfig()
    path = gates.packaged_reference_path(config)
    with safe_open(str(path), framework="pt") as f:
        recorded = json.loads(f.metadata()["scores"])
    model = gates.reference_segmenter(config, cache_dir="/nonexistent-cache")
    scores = gates.segmenter_miou(model, gates.render_set("test", gates.TEST_SEED, recorded["test_images"]))
    assert abs(scores["semantic"] - recorded["reference_miou_semantic"]) < 0.005  # fp16 copy of the weights
