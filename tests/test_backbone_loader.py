import json
import shutil

import pytest
import torch

from datasetdm.backbone import loader
from datasetdm.backbone.loader import load_backbone
from datasetdm.testing import make_tiny_backbone
from datasetdm.errors import DatasetdmError


def test_loads_clip_backbone(tiny_clip, tiny_clip_path):
    bb = tiny_clip
    assert type(bb.text_encoder).__name__ == "CLIPTextModel"
    assert bb.max_tokens == 77
    assert bb.vae_scale_factor == 2
    assert bb.native_size == (32, 32)
    assert bb.latent_scaling_factor == bb.vae.config.scaling_factor
    assert not any(p.requires_grad for p in bb.unet.parameters())
    emb, ids = bb.encode_prompt(["a photo of a dog", "a cat"])
    assert emb.shape == (2, 77, bb.unet.config.cross_attention_dim)
    assert ids.shape == (2, 77)
    assert ids[0, 0].item() == bb.tokenizer.bos_token_id
    # padded to 77 with the pad token (CLIP: end of text)
    assert ids[1, -1].item() == bb.tokenizer.pad_token_id


def test_loads_bert_backbone(tiny_bert):
    bb = tiny_bert
    assert type(bb.text_encoder).__name__ == "BertModel"
    # MiniLM's tokenizer allows 512 tokens; the backbone caps at 77
    emb, ids = bb.encode_prompt(["a photo of a hedgehog"])
    assert emb.shape == (1, 77, 32) and ids.shape == (1, 77)
    assert ids[0, 0].item() == bb.tokenizer.cls_token_id


def test_package_reference_loads_minilm(tmp_path):
    # the embedded backbone's layout: text_encoder/ and tokenizer/ point at the installed package
    path = make_tiny_backbone(tmp_path / "m", text_encoder="minilm")
    bb = load_backbone(path)
    assert bb.text_width == 384 == bb.unet.config.cross_attention_dim
    emb, _ = bb.encode_prompt(["a red ball"])
    assert emb.shape == (1, 77, 384)
    assert torch.isfinite(emb).all()


def test_fingerprint_stable_and_distinguishes_weights(tiny_clip, tiny_clip_path, tmp_path):
    assert load_backbone(tiny_clip_path).fingerprint == tiny_clip.fingerprint
    copy = shutil.copytree(tiny_clip_path, tmp_path / "copy")
    assert load_backbone(copy).fingerprint == tiny_clip.fingerprint  # a copy is the same backbone
    # same architecture, other weights: a different backbone
    other = make_tiny_backbone(tmp_path / "other", text_encoder="clip", seed=1)
    assert load_backbone(other).fingerprint != tiny_clip.fingerprint


def test_missing_component_is_named(tiny_bert_path, tmp_path):
    broken = shutil.copytree(tiny_bert_path, tmp_path / "broken")
    shutil.rmtree(broken / "vae")
    with pytest.raises(DatasetdmError, match=r"vae.*missing component folder"):
        load_backbone(broken)


def test_missing_model_index(tiny_bert_path, tmp_path):
    broken = shutil.copytree(tiny_bert_path, tmp_path / "broken")
    (broken / "model_index.json").unlink()
    with pytest.raises(DatasetdmError, match="model_index.json: missing"):
        load_backbone(broken)


def test_text_width_mismatch(tiny_bert_path, tmp_path):
    broken = shutil.copytree(tiny_bert_path, tmp_path / "broken")
    cfg_path = broken / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["cross_attention_dim"] = 768
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(DatasetdmError, match=r"text width 32 does not match.*cross_attention_dim 768"):
        load_backbone(broken)


def test_hub_id_not_cached_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DatasetdmError, match="not in the Hugging Face cache and HF_HUB_OFFLINE is set"):
        load_backbone("datasetdm-tests/no-such-model")


def test_missing_folder():
    with pytest.raises(DatasetdmError, match="no such folder"):
        load_backbone("./no/such/folder")


def test_embedded_not_trained_yet(monkeypatch, tmp_path):
    monkeypatch.setattr(loader, "embedded_backbone_path", lambda: tmp_path)
    with pytest.raises(DatasetdmError, match="embedded backbone is not trained yet"):
        load_backbone(None)


def test_embedded_training_and_loader_encode_prompts_alike(tmp_path):
    """The embedded UNet is trained on `embedded.encode_captions`; the loader must condition it the same way."""
    import torch

    from datasetdm.embedded import model as embedded
    from datasetdm.backbone.loader import load_backbone
    from datasetdm.testing import make_tiny_backbone

    bb = load_backbone(make_tiny_backbone(tmp_path / "m", text_encoder="minilm"))
    captions = ["a red ball and two people on grass at dusk", ""]
    loaded, ids = bb.encode_prompt(captions)
    tokenizer, encoder = embedded.load_text_encoder()
    trained = embedded.encode_captions(tokenizer, encoder, captions)
    assert loaded.shape == trained.shape == (2, embedded.MAX_TOKENS, embedded.TEXT_DIM)
    assert torch.allclose(loaded, trained, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_unet_cast_tensor_by_tensor_equals_from_pretrained(tiny_clip_path, dtype):
    # weights stored in fp32, loaded in a reduced dtype: the per-tensor path (which keeps the peak
    # memory at the model's size) gives diffusers' own load, weight for weight
    from diffusers import UNet2DConditionModel

    ours = loader._load_unet(tiny_clip_path / "unet", dtype)
    theirs = UNet2DConditionModel.from_pretrained(tiny_clip_path / "unet", torch_dtype=dtype, low_cpu_mem_usage=False)
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == dtype and torch.equal(a[k], b[k]), k
    assert not ours.training
    x = torch.randn(1, 4, 8, 8, dtype=dtype)
    ctx = torch.randn(1, 3, ours.config.cross_attention_dim, dtype=dtype)
    assert torch.equal(ours(x, 10, ctx).sample, theirs(x, 10, ctx).sample)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])  # the file's own dtype, and the tensor-by-tensor cast
def test_a_truncated_unet_file_is_named(tiny_clip_path, tmp_path, dtype):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_clip_path, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])
    with pytest.raises(DatasetdmError, match=r"could not load a component.*diffusion_pytorch_model\.safetensors"):
        load_backbone(broken, dtype=dtype)
