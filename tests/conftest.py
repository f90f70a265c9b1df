"""Shared fixtures: tiny random SD-shaped backbones (CLIP and BERT text encoders), built once per session."""

import os

import pytest
import torch

# Offline always: nothing in the suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Two shared, busy cores: one intra-op thread avoids oversubscription (measured: a tiny UNet
# forward takes ~50 ms with one thread and >1 s with two while another job runs).
torch.set_num_threads(int(os.environ.get("DATASETDM_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def tiny_clip_path(tmp_path_factory):
    from datasetdm.testing import make_tiny_backbone

    return make_tiny_backbone(tmp_path_factory.mktemp("tiny_clip"), text_encoder="clip")


@pytest.fixture(scope="session")
def tiny_bert_path(tmp_path_factory):
    from datasetdm.testing import make_tiny_backbone

    return make_tiny_backbone(tmp_path_factory.mktemp("tiny_bert"), text_encoder="bert")


@pytest.fixture(scope="session")
def tiny_clip(tiny_clip_path):
    """A loaded tiny backbone with a CLIP text encoder (SD 1.x/2.x shape). Do not mutate it."""
    from datasetdm.backbone.loader import load_backbone

    return load_backbone(tiny_clip_path)


@pytest.fixture(scope="session")
def tiny_bert(tiny_bert_path):
    """A loaded tiny backbone with a BERT text encoder (the embedded backbone's shape). Do not mutate it."""
    from datasetdm.backbone.loader import load_backbone

    return load_backbone(tiny_bert_path)


@pytest.fixture(params=["tiny_clip", "tiny_bert"])
def tiny_backbone(request):
    """Each tiny backbone in turn, so one test runs over both text encoders."""
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def semantic_checkpoint(tiny_clip, tmp_path_factory):
    """A random-weight semantic P-Decoder (classes dog, cat) for the tiny CLIP backbone."""
    from datasetdm.backbone.capture import generate
    from datasetdm.decoder import DecoderConfig, build_decoder
    from datasetdm.decoder.checkpoint import save_decoder

    images, hc = generate(tiny_clip, ["a photo of a dog"], [0], num_inference_steps=2, guidance_scale=1.0)
    cfg = DecoderConfig(
        task="semantic", categories=[{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}],
        feature_channels=[f.shape[1] for f in hc.features], feature_sizes=[list(f.shape[-2:]) for f in hc.features],
        image_size=list(images.shape[1:3]), dim=16, num_queries=4, layers=2, heads=2, ffn_dim=32,
        backbone={"source": "tiny", "fingerprint": tiny_clip.fingerprint},
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("dec") / "semantic"
    save_decoder(build_decoder(cfg).eval(), path)
    return path
