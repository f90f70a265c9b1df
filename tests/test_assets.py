"""The assets the package ships load offline and are what their records say: the embedded
backbone (assets/embedded). (The world-v2 reference segmenter is not shipped yet: its test comes
with it.)"""

import json

import numpy as np

from datasetdm.backbone.loader import embedded_backbone_path, load_backbone


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
