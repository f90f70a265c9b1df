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
