import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from datasetdm.errors import DatasetdmError
from datasetdm.formats.labelled_folder import LabelledFolderWriter
from datasetdm.formats.sample import COCO_KEYPOINT_NAMES, COCO_SKELETON, Category, Instance, LabelledSample
from datasetdm.formats.shards import ShardWriter
from datasetdm.view import build_gallery, class_colour, depth_colours

CATS = [Category(1, "person", COCO_KEYPOINT_NAMES, COCO_SKELETON), Category(2, "dog")]
H, W = 16, 20


def make_sample(i):
    rng = np.random.default_rng(i)
    sem = np.zeros((H, W), np.uint8)
    sem[2:12, 2:8] = 1
    sem[10:, 12:] = 2
    sem[0, :] = 255
    kp = np.zeros((17, 3), np.float32)
    kp[5] = [3, 4, 2]
    kp[7] = [3, 8, 2]
    kp[9] = [4, 11, 1]
    depth = np.linspace(1, 10, H * W, dtype=np.float32).reshape(H, W)
    depth[:3] = 0
    return LabelledSample(
        id=f"img{i}",
        image=rng.integers(0, 120, (H, W, 3), dtype=np.uint8),
        caption=f"a person <walking> a dog & friends {i}",
        semantic=sem,
        instances=[Instance(1, sem == 1, kp), Instance(2, sem == 2)],
        depth=depth,
    )


@pytest.fixture()
def folder(tmp_path):
    out = tmp_path / "folder"
    with LabelledFolderWriter(out, CATS) as writer:
        for i in range(3):
            writer.add(make_sample(i))
    return out


def test_gallery_of_a_labelled_folder(folder, tmp_path):
    index = build_gallery(folder, tmp_path / "gallery")
    page = index.read_text()
    assert page.count('class="sample"') == 3
    # image, classes, instances, skeletons, depth for each sample
    imgs = re.findall(r'<img src="(assets/[^"]+)"', page)
    assert len(imgs) == 15
    assert "a person &lt;walking&gt; a dog &amp; friends 1" in page  # captions escaped
    assert f"rgb{class_colour(2)}" in page and ">dog<" in page  # legend

    panels = [np.asarray(Image.open(tmp_path / "gallery" / src)) for src in imgs[:5]]
    scale = panels[0].shape[0] // H
    assert scale >= 2 and panels[0].shape[:2] == (H * scale, W * scale)  # small images enlarged
    image, classes, contours, skeleton, depth = panels
    ref = make_sample(0).image
    np.testing.assert_array_equal(image[::scale, ::scale], ref)
    # dog pixels are tinted towards the dog's class colour, background is untouched
    y, x = 14 * scale, 16 * scale
    tinted = classes[y, x].astype(int)
    assert np.abs(tinted - np.array(class_colour(2))).sum() < np.abs(ref[14, 16].astype(int) - np.array(class_colour(2))).sum()
    np.testing.assert_array_equal(classes[5 * scale, 10 * scale], ref[5, 10])
    # contours only on instance boundaries
    assert (contours[2 * scale, 4 * scale] != ref[2, 4]).any()
    np.testing.assert_array_equal(contours[6 * scale + 2, 4 * scale + 2], ref[6, 4])
    # the skeleton draws on the joints
    assert (skeleton[4 * scale, 3 * scale] != ref[4, 3]).any()
    # depth: black where there is none, near warmer (brighter) than far
    assert (depth[0, 0] == 0).all()
    assert depth[4 * scale, 0].sum() > depth[15 * scale, W * scale - 1].sum()


def test_gallery_of_shards_with_extras(tmp_path):
    out = tmp_path / "shards"
    with ShardWriter(out, CATS, {}, samples_per_shard=2) as writer:
        for i in range(3):
            s = make_sample(i)
            extra = LabelledSample(id="", image=s.image, semantic=(s.semantic == 2).astype(np.uint8) * 2)
            writer.add(i, {"prompt": s.caption, "seed": i, "scores": {"area": 0.4}}, s, {"attn": extra})
    index = build_gallery(out, limit=2)
    assert index == out / "gallery" / "index.html"
    page = index.read_text()
    assert page.count('class="sample"') == 2
    assert page.count("<figcaption>attn classes</figcaption>") == 2
    assert "area 0.40 · seed 1" in page


def test_gallery_errors(tmp_path):
    with pytest.raises(DatasetdmError, match="nothing: not a folder"):
        build_gallery(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetdmError, match="no images"):
        build_gallery(tmp_path / "empty")


def test_depth_colours_handle_no_depth():
    assert (depth_colours(np.zeros((3, 3))) == 0).all()


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium not installed (Debian package 'chromium')")
def test_gallery_renders_in_headless_chromium(folder, tmp_path):
    index = build_gallery(folder, tmp_path / "gallery")
    result = subprocess.run(
        [
            _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=10000",
            "--dump-dom", index.resolve().as_uri(),
        ],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    # the page's load handler counts the images that actually decoded
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert 'data-images="15"' in body, body
    assert 'data-loaded="15"' in body, body
    assert dom.count('class="sample"') == 3
