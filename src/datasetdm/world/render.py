"""The embedded world: procedural scenes with exact ground truth for every task.

It plays the part of real labelled data (DESIGN.md): a few of its images are the labelled ones,
thousands more held out measure everything, and its images and captions (never its masks) train
the embedded backbone.

A scene is a ground plane seen in perspective from a camera, a sky, and objects standing on the
ground: eight rigid categories of distinct silhouette in several colours, and articulated human
figures with the 17 COCO keypoints. Objects are painted far to near, so occlusion, the instance
masks and the depth map agree by construction.

Two presets (``PRESETS``) set how many objects a scene holds and how large they appear:

- ``default`` (world v2) frames scenes the way VOC 2012's photos are framed, the paper's headline
  benchmark: 1–3 objects (1.8 on average; VOC has about 2.4), each photographed so that its
  largest extent fills 35–75% of the image (people 50–85%), in horizontal slots so they overlap
  only partly. The median instance covers about 10% of the image and a person's shoulders,
  hips and knees lie two or more latent cells apart.
- ``crowded`` (world v1) keeps the first world: 1–6 objects 3–11 m away, median instance about
  2% of the image — a COCO-like setting for instance work that a 16×16 latent models poorly.

Why 64×64 px: the embedded diffusion model must learn this world on 2 CPU cores. At 64 px a VAE
with a downsampling factor of 4 gives a 16×16×4 latent, the size at which a ~13M-parameter UNet
trains at about 1 s per batch of 32 here; 128 px would cost about 4× per step.
Images are drawn at 4× and box-filtered (smooth edges, flat shading with a vertical light
gradient, no per-pixel noise: low needless entropy); labels are the 4×4-block majority of the
same drawing, so they match the image exactly up to the anti-aliased edge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from datasetdm.formats.sample import (
    COCO_KEYPOINT_NAMES,
    COCO_SKELETON,
    Category,
    Instance,
    LabelledSample,
)
from datasetdm.text import plural

IMAGE_SIZE = 64
SUPERSAMPLE = 4
_C = IMAGE_SIZE * SUPERSAMPLE  # canvas side in supersampled pixels

CATEGORIES: tuple[Category, ...] = (
    Category(1, "person", keypoints=COCO_KEYPOINT_NAMES, skeleton=COCO_SKELETON),
    Category(2, "ball"),
    Category(3, "box"),
    Category(4, "cone"),
    Category(5, "barrel"),
    Category(6, "star"),
    Category(7, "tree"),
    Category(8, "house"),
    Category(9, "car"),
)
CATEGORY_BY_NAME = {c.name: c for c in CATEGORIES}

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 210),
    "yellow": (235, 205, 40),
    "orange": (240, 130, 30),
    "purple": (135, 55, 175),
    "white": (235, 235, 235),
    "black": (35, 35, 40),
}

# Setting: ground colour, sky colour at the horizon and at the top, and its caption phrase.
SETTINGS: dict[str, dict] = {
    "grass": dict(ground=(80, 150, 60), sky_low=(185, 215, 240), sky_high=(80, 140, 220), phrase="on grass"),
    "desert": dict(ground=(215, 185, 120), sky_low=(235, 225, 200), sky_high=(140, 175, 225), phrase="in the desert"),
    "snow": dict(ground=(225, 230, 238), sky_low=(200, 205, 215), sky_high=(150, 160, 180), phrase="on snow"),
    "street": dict(ground=(110, 110, 115), sky_low=(200, 210, 225), sky_high=(110, 150, 205), phrase="on a street"),
}
# Lighting: a brightness and a tint applied to everything, and its caption phrase.
LIGHTING: dict[str, dict] = {
    "sunny": dict(gain=1.0, tint=(1.0, 1.0, 1.0), phrase="on a sunny day"),
    "cloudy": dict(gain=0.82, tint=(0.95, 0.97, 1.0), phrase="on a cloudy day"),
    "dusk": dict(gain=0.72, tint=(1.12, 0.85, 0.75), phrase="at dusk"),
    "night": dict(gain=0.38, tint=(0.8, 0.85, 1.15), phrase="at night"),
}

SPLITS = {"train": 0, "val": 1, "test": 2}
FOCAL = 64.0  # output pixels; a 53° horizontal field of view
MAX_GROUND_DEPTH = 40.0  # metres; ground beyond this is drawn but its depth is clipped here
MIN_VISIBLE_PIXELS = 6  # an instance hidden below this many pixels is dropped (and not captioned)
SKIN = (224, 180, 140)
PANTS = (50, 55, 90)


# Largest extent of each category at size 1, metres: a framed object's distance follows from it.
EXTENT = {"person": 1.7, "ball": 1.1, "box": 1.35, "cone": 1.6, "barrel": 1.4, "star": 1.5,
          "tree": 2.6, "house": 2.7, "car": 2.2}


@dataclass(frozen=True)
class WorldPreset:
    """How a scene is composed: object count, camera and how objects are framed."""

    name: str
    counts: tuple[int, ...]  # possible numbers of objects ...
    count_p: tuple[float, ...]  # ... and their probabilities
    camera_height: float  # metres
    horizon: tuple[float, float]  # horizon row range, fraction of the image height
    # framed: an object's largest extent fills a fraction of the image drawn from `fill`
    # (`person_fill` for people) and objects sit in horizontal slots; otherwise (v1) objects stand
    # at a uniform distance in `depth` metres, anywhere across the image
    framed: bool
    fill: tuple[float, float] = (0.0, 0.0)
    person_fill: tuple[float, float] = (0.0, 0.0)
    depth: tuple[float, float] = (0.0, 0.0)
    category_p: tuple[float, ...] = field(default=(0.2,) + (0.1,) * 8)


PRESETS: dict[str, WorldPreset] = {
    "default": WorldPreset("default", counts=(1, 2, 3), count_p=(0.4, 0.4, 0.2), camera_height=1.2,
                           horizon=(0.28, 0.42), framed=True, fill=(0.35, 0.75), person_fill=(0.5, 0.85),
                           category_p=(0.16,) + (0.105,) * 8),
    "crowded": WorldPreset("crowded", counts=(1, 2, 3, 4, 5, 6), count_p=(0.2, 0.25, 0.22, 0.15, 0.1, 0.08),
                           camera_height=1.6, horizon=(0.28, 0.45), framed=False, depth=(3.0, 11.0)),
}


def get_preset(name: str) -> WorldPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown world preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]


@dataclass
class _Object:
    category: str
    colour: str
    depth: float  # metres, distance of its base from the camera
    x: float  # base centre, canvas px
    y: float  # base (ground contact), canvas px
    scale: float  # canvas px per metre at this depth


def _rng(split: str, seed: int, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    # The split code is part of the seed sequence, so splits never share a scene.
    return np.random.default_rng([SPLITS[split], int(seed), int(index)])


def render_scene(split: str, seed: int, index: int, preset: str = "default") -> LabelledSample:
    """Render scene ``index`` of ``split`` for ``seed``: image, caption, semantic and instance
    masks, person keypoints, depth. Deterministic in (split, seed, index, preset)."""
    world = get_preset(preset)
    rng = _rng(split, seed, index)
    setting = str(rng.choice(list(SETTINGS)))
    lighting = str(rng.choice(list(LIGHTING), p=[0.4, 0.25, 0.2, 0.15]))
    horizon = float(rng.uniform(*world.horizon)) * _C

    objects = _sample_objects(rng, horizon, setting, world)
    canvas, depth_canvas, inst_canvas = _draw_background(setting, horizon, world.camera_height)
    keypoints_canvas: dict[int, np.ndarray] = {}
    # Painter's algorithm: far to near, so nearer objects overwrite image, instance id and depth.
    for inst_id, obj in sorted(enumerate(objects, start=1), key=lambda p: -p[1].depth):
        parts, kps = _draw_object(obj, rng)
        for part_mask, colour in parts:
            _paint(canvas, part_mask, colour)
        full = np.zeros((_C, _C), bool)
        for part_mask, _ in parts:
            full |= part_mask
        inst_canvas[full] = inst_id
        depth_canvas[full] = _object_depth(obj, full)
        if kps is not None:
            keypoints_canvas[inst_id] = kps

    light = LIGHTING[lighting]
    canvas = canvas * light["gain"] * np.asarray(light["tint"])
    image = _downsample_image(canvas)
    inst_map = _downsample_labels(inst_canvas)
    depth = _downsample_depth(depth_canvas, inst_canvas, inst_map)

    instances: list[Instance] = []
    semantic = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    described: list[_Object] = []
    distances: list[float] = []  # base distance of each kept instance, metres
    colours: list[str] = []  # colour name of each kept instance (a person's shirt)
    for inst_id, obj in enumerate(objects, start=1):
        mask = inst_map == inst_id
        if mask.sum() < MIN_VISIBLE_PIXELS:
            continue
        cat = CATEGORY_BY_NAME[obj.category]
        semantic[mask] = cat.id
        kps = None
        if inst_id in keypoints_canvas:
            kps = _keypoints_with_visibility(keypoints_canvas[inst_id], inst_map, inst_id)
        instances.append(Instance(category_id=cat.id, mask=mask, keypoints=kps))
        described.append(obj)
        distances.append(round(obj.depth, 4))
        colours.append(obj.colour)

    caption = _caption(described, setting, lighting)
    return LabelledSample(
        id=f"{split}-{seed}-{index:06d}",
        image=image,
        caption=caption,
        semantic=semantic,
        instances=instances,
        depth=depth,
        meta={"split": split, "seed": seed, "index": index, "preset": preset, "setting": setting, "lighting": lighting,
              "instance_distances": distances, "instance_colours": colours, "horizon": horizon / SUPERSAMPLE},
    )


# ---------------------------------------------------------------------------- scene layout


def map_scene_chunks(fn, n: int, workers: int = 1, chunk: int = 500):
    """Yield ``(start, stop, fn(start, stop))`` over scenes 0..n-1 in chunks, in order.

    ``fn`` must be picklable (a module-level function or a ``functools.partial`` of one): with
    ``workers`` > 1 the chunks run in that many spawned processes. Scene i depends only on
    (split, seed, i), so the results are the same for any number of workers.
    """
    starts = list(range(0, n, chunk))
    stops = [min(start + chunk, n) for start in starts]
    if workers <= 1:
        yield from ((a, b, fn(a, b)) for a, b in zip(starts, stops))
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn: forking a process that has started torch's thread pools can hang
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from zip(starts, stops, pool.map(fn, starts, stops))


def render_images_and_captions(split: str, seed: int, start: int, stop: int,
                               preset: str = "default") -> tuple[np.ndarray, list[str]]:
    """Images (N, H, W, 3) uint8 and captions of scenes ``start..stop-1``: what the backbone trains on."""
    scenes = [render_scene(split, seed, i, preset) for i in range(start, stop)]
    return np.stack([s.image for s in scenes]), [s.caption for s in scenes]


def _sample_objects(rng: np.random.Generator, horizon: float, setting: str, world: WorldPreset) -> list[_Object]:
    n = int(rng.choice(world.counts, p=world.count_p))
    ground_colour = SETTINGS[setting]["ground"]
    names = [c.name for c in CATEGORIES]
    # framed scenes: one horizontal slot per object, shuffled, so objects overlap only partly
    slots = rng.permutation(n) if world.framed else None
    objects = []
    for k in range(n):
        category = str(rng.choice(names, p=world.category_p))
        # A colour that stands out from the ground; one flat colour for everything but people.
        while True:
            colour = str(rng.choice(list(COLOURS)))
            if np.abs(np.subtract(COLOURS[colour], ground_colour)).sum() > 90:
                break
        if world.framed:
            lo, hi = world.person_fill if category == "person" else world.fill
            fit = _largest_fill(category, horizon / SUPERSAMPLE, world.camera_height)
            fill = float(rng.uniform(min(lo, fit), min(hi, fit)))
            depth = EXTENT[category] * FOCAL / (fill * IMAGE_SIZE)
            x = (slots[k] + float(rng.uniform(0.3, 0.7))) / n * _C
        else:
            depth = float(rng.uniform(*world.depth))
            x = float(rng.uniform(0.05, 0.95)) * _C
        scale = FOCAL * SUPERSAMPLE / depth  # canvas px per metre
        y = horizon + world.camera_height * scale  # where the ground at this depth projects
        objects.append(_Object(category, colour, depth, x, y, scale))
    return objects


def _largest_fill(category: str, horizon: float, camera_height: float) -> float:
    """The largest fraction of the image an object's extent may fill with its base above the
    bottom edge and its top below the top edge (horizon in output px). An object's base projects
    to horizon + camera_height·f/d and its top to horizon + (camera_height − height)·f/d; the
    per-instance size factor (≤ 1.2) is allowed for in the height."""
    extent = EXTENT[category]
    fits = [(IMAGE_SIZE - 1 - horizon) * extent / (camera_height * IMAGE_SIZE)]
    height = 1.2 * extent
    if height > camera_height:
        fits.append((horizon - 1) * extent / ((height - camera_height) * IMAGE_SIZE))
    return max(min(fits), 0.1)


def _draw_background(setting: str, horizon: float, camera_height: float):
    s = SETTINGS[setting]
    rows = np.arange(_C, dtype=np.float64)[:, None] + 0.5
    canvas = np.zeros((_C, _C, 3))
    # Sky: vertical gradient from the top colour to the horizon colour.
    a = np.clip(rows / max(horizon, 1.0), 0, 1)
    sky = (1 - a) * np.asarray(s["sky_high"]) + a * np.asarray(s["sky_low"])
    # Ground: depth from the ground-plane projection, hazed towards the horizon colour with distance.
    below = np.maximum(rows - horizon, 1e-3)
    ground_depth = camera_height * FOCAL * SUPERSAMPLE / below
    haze = np.clip(ground_depth / 60.0, 0, 0.7)
    ground = (1 - haze) * np.asarray(s["ground"]) + haze * np.asarray(s["sky_low"])
    is_sky = rows < horizon
    canvas[:] = np.where(is_sky[..., None], sky[:, None, :], ground[:, None, :])
    depth = np.where(is_sky, 0.0, np.minimum(ground_depth, MAX_GROUND_DEPTH))
    depth = np.broadcast_to(depth, (_C, _C)).astype(np.float32).copy()
    inst = np.zeros((_C, _C), np.int32)
    return canvas, depth, inst


def _paint(canvas: np.ndarray, mask: np.ndarray, colour) -> None:
    """Fill ``mask`` with ``colour`` lit from above: brighter at the top of the part."""
    rows = np.nonzero(mask.any(axis=1))[0]
    if rows.size == 0:
        return
    top, bottom = rows[0], rows[-1] + 1
    t = (np.arange(_C) - top) / max(bottom - top, 1)
    shade = np.clip(1.12 - 0.32 * t, 0.75, 1.12)[:, None, None]
    canvas[:] = np.where(mask[..., None], shade * np.asarray(colour, float), canvas)


def _object_depth(obj: _Object, mask: np.ndarray) -> np.ndarray:
    """Per-pixel depth of an object: its base distance, bulging towards the camera for round
    things (ball, barrel, tree canopy) so depth varies smoothly inside the object."""
    d = np.full(int(mask.sum()), obj.depth, np.float32)
    if obj.category in ("ball", "barrel", "tree"):
        ys, xs = np.nonzero(mask)
        radius = 0.5 * (xs.max() - xs.min() + 1)
        u = np.clip((xs - 0.5 * (xs.max() + xs.min())) / max(radius, 1), -1, 1)
        d -= (np.sqrt(1 - u**2) * radius / obj.scale * 0.8).astype(np.float32)
    return d


# ------------------------------------------------------------------------ object drawings


def _mask_from(draw_fn) -> np.ndarray:
    img = Image.new("L", (_C, _C), 0)
    draw_fn(ImageDraw.Draw(img))
    return np.asarray(img) > 127


def _draw_object(obj: _Object, rng: np.random.Generator):
    """Return the object's parts as (mask, colour) and, for people, canvas keypoints (17, 2)."""
    x, y, s = obj.x, obj.y, obj.scale
    colour = COLOURS[obj.colour]
    size = float(rng.uniform(0.85, 1.2))  # per-instance size variation
    cat = obj.category
    if cat == "person":
        return _draw_person(obj, rng, size)
    if cat == "ball":
        r = 0.55 * size * s
        return [(_mask_from(lambda d: d.ellipse([x - r, y - 2 * r, x + r, y], fill=255)), colour)], None
    if cat == "box":
        w = 1.1 * size * s
        h = w * float(rng.uniform(0.8, 1.1))
        top = 0.22 * h  # a lighter top face gives the box volume
        body = _mask_from(lambda d: d.rectangle([x - w / 2, y - h, x + w / 2, y], fill=255))
        lid = _mask_from(lambda d: d.polygon(
            [(x - w / 2, y - h), (x - w / 2 + top, y - h - top), (x + w / 2 + top, y - h - top), (x + w / 2, y - h)],
            fill=255))
        return [(body, colour), (lid & ~body, _lighter(colour))], None
    if cat == "cone":
        w, h = 0.9 * size * s, 1.6 * size * s
        return [(_mask_from(lambda d: d.polygon([(x - w / 2, y), (x + w / 2, y), (x, y - h)], fill=255)), colour)], None
    if cat == "barrel":
        w, h = 0.9 * size * s, 1.3 * size * s
        e = 0.18 * w
        body = _mask_from(lambda d: (d.rectangle([x - w / 2, y - h, x + w / 2, y - e / 2], fill=255),
                                     d.ellipse([x - w / 2, y - e, x + w / 2, y], fill=255)))
        lid = _mask_from(lambda d: d.ellipse([x - w / 2, y - h - e / 2, x + w / 2, y - h + e / 2], fill=255))
        return [(body, colour), (lid, _lighter(colour))], None
    if cat == "star":
        r = 0.75 * size * s
        cy = y - r
        rot = float(rng.uniform(-0.3, 0.3))
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.42 * r
            a = rot - math.pi / 2 + k * math.pi / 5
            pts.append((x + rad * math.cos(a), cy + rad * math.sin(a)))
        return [(_mask_from(lambda d: d.polygon(pts, fill=255)), colour)], None
    if cat == "tree":
        h = 2.6 * size * s
        tw = 0.22 * size * s
        r = 0.75 * size * s
        trunk = _mask_from(lambda d: d.rectangle([x - tw / 2, y - h + r, x + tw / 2, y], fill=255))
        crown = _mask_from(lambda d: d.ellipse([x - r, y - h, x + r, y - h + 2 * r], fill=255))
        return [(trunk & ~crown, (110, 75, 45)), (crown, colour)], None
    if cat == "house":
        w = 1.9 * size * s
        h = 1.3 * size * s
        roof_h = 0.7 * w
        walls = _mask_from(lambda d: d.rectangle([x - w / 2, y - h, x + w / 2, y], fill=255))
        roof = _mask_from(lambda d: d.polygon([(x - 0.6 * w, y - h), (x + 0.6 * w, y - h), (x, y - h - roof_h)], fill=255))
        door = _mask_from(lambda d: d.rectangle([x - 0.12 * w, y - 0.55 * h, x + 0.12 * w, y], fill=255))
        return [(walls, colour), (roof, (150, 60, 50)), (door & walls, (90, 60, 40))], None
    if cat == "car":
        w = 2.2 * size * s
        h = 0.55 * size * s
        wr = 0.2 * w
        body = _mask_from(lambda d: d.rounded_rectangle([x - w / 2, y - h - 0.1 * w, x + w / 2, y - 0.12 * w],
                                                        radius=max(0.1 * h, 1), fill=255))
        cabin = _mask_from(lambda d: d.polygon([(x - 0.3 * w, y - h - 0.1 * w), (x - 0.18 * w, y - h - 0.32 * w),
                                                (x + 0.18 * w, y - h - 0.32 * w), (x + 0.32 * w, y - h - 0.1 * w)], fill=255))
        wheels = _mask_from(lambda d: [d.ellipse([cx - wr / 2, y - wr, cx + wr / 2, y], fill=255)
                                       for cx in (x - 0.3 * w, x + 0.3 * w)])
        return [(body | cabin, colour), (cabin & ~body, _lighter(colour)), (wheels, (30, 30, 30))], None
    raise AssertionError(cat)


def _lighter(colour, amount: float = 0.35):
    return tuple(int(c + (255 - c) * amount) for c in colour)


def _draw_person(obj: _Object, rng: np.random.Generator, size: float):
    """An articulated figure 1.7 m tall with the 17 COCO keypoints (person's left = image right:
    figures face the camera)."""
    H = 1.7 * size * obj.scale
    x0 = obj.x
    u = lambda a, b: float(rng.uniform(a, b))  # noqa: E731

    def limb(start, angle, length):
        # angle in radians from straight down, positive towards image right
        return (start[0] + length * math.sin(angle), start[1] + length * math.cos(angle))

    hip_c = (x0, -0.5 * H)  # y relative to the feet, fixed below
    lean = u(-0.12, 0.12)
    shoulder_c = (x0 + 0.3 * H * math.sin(lean), hip_c[1] - 0.3 * H * math.cos(lean))
    l_sh = (shoulder_c[0] + 0.11 * H, shoulder_c[1])
    r_sh = (shoulder_c[0] - 0.11 * H, shoulder_c[1])
    l_hip = (hip_c[0] + 0.07 * H, hip_c[1])
    r_hip = (hip_c[0] - 0.07 * H, hip_c[1])
    neck = (shoulder_c[0], shoulder_c[1] - 0.04 * H)
    head_r = 0.075 * H
    head = (neck[0] + u(-0.02, 0.02) * H, neck[1] - head_r * 1.05)

    # Arms: anywhere from down by the side to raised overhead, elbows bending.
    l_up = u(-0.4, 2.9)
    r_up = -u(-0.4, 2.9)
    l_el = limb(l_sh, l_up, 0.17 * H)
    r_el = limb(r_sh, r_up, 0.17 * H)
    l_wr = limb(l_el, l_up + u(-0.3, 1.6), 0.16 * H)
    r_wr = limb(r_el, r_up - u(-0.3, 1.6), 0.16 * H)
    # Legs: standing, striding, or one knee raised.
    l_th = u(-0.15, 0.6)
    r_th = -u(-0.15, 0.6)
    l_kn = limb(l_hip, l_th, 0.25 * H)
    r_kn = limb(r_hip, r_th, 0.25 * H)
    l_an = limb(l_kn, l_th - u(0.0, 0.9), 0.25 * H)
    r_an = limb(r_kn, r_th + u(0.0, 0.9), 0.25 * H)

    nose = (head[0], head[1] + 0.25 * head_r)
    l_eye = (head[0] + 0.35 * head_r, head[1] - 0.15 * head_r)
    r_eye = (head[0] - 0.35 * head_r, head[1] - 0.15 * head_r)
    l_ear = (head[0] + 0.85 * head_r, head[1])
    r_ear = (head[0] - 0.85 * head_r, head[1])
    kps = np.array([nose, l_eye, r_eye, l_ear, r_ear, l_sh, r_sh, l_el, r_el, l_wr, r_wr,
                    l_hip, r_hip, l_kn, r_kn, l_an, r_an], dtype=np.float64)
    kps[:, 1] += obj.y - kps[:, 1].max() + 0.02 * H  # the lower foot stands on the ground

    P = [tuple(p) for p in kps]
    lw, aw = max(0.09 * H, 2.0), max(0.065 * H, 2.0)

    def seg(d, a, b, w):
        d.line([a, b], fill=255, width=int(round(w)))
        r = w / 2
        for p in (a, b):  # round joints
            d.ellipse([p[0] - r, p[1] - r, p[0] + r, p[1] + r], fill=255)

    legs = _mask_from(lambda d: [seg(d, P[11], P[13], lw), seg(d, P[13], P[15], lw),
                                 seg(d, P[12], P[14], lw), seg(d, P[14], P[16], lw)])
    torso = _mask_from(lambda d: d.polygon([P[6], P[5], P[11], P[12]], fill=255))
    arms = _mask_from(lambda d: [seg(d, P[5], P[7], aw), seg(d, P[7], P[9], aw),
                                 seg(d, P[6], P[8], aw), seg(d, P[8], P[10], aw)])
    hc = (P[0][0], P[0][1] - 0.25 * head_r)
    head_m = _mask_from(lambda d: (d.ellipse([hc[0] - head_r, hc[1] - head_r, hc[0] + head_r, hc[1] + head_r], fill=255),
                                   d.line([(hc[0], hc[1]), (hc[0], P[5][1])], fill=255, width=int(max(0.05 * H, 2)))))
    shirt = COLOURS[obj.colour]
    parts = [(legs, PANTS), (torso | arms, shirt), (head_m, SKIN)]
    return parts, kps


def _keypoints_with_visibility(kps_canvas: np.ndarray, inst_map: np.ndarray, inst_id: int) -> np.ndarray:
    """Canvas keypoints → output pixels with COCO visibility: 2 where the pixel under the joint
    belongs to this person, 1 where something else covers it, 0 (and x=y=0) out of frame."""
    xy = (kps_canvas + 0.5) / SUPERSAMPLE - 0.5
    out = np.zeros((len(xy), 3), np.float32)
    for k, (x, y) in enumerate(xy):
        xi, yi = int(round(x)), int(round(y))
        if not (0 <= xi < IMAGE_SIZE and 0 <= yi < IMAGE_SIZE):
            continue
        out[k] = (x, y, 2 if inst_map[yi, xi] == inst_id else 1)
    return out


# --------------------------------------------------------------------------- downsampling


def _blocks(a: np.ndarray) -> np.ndarray:
    s = SUPERSAMPLE
    return a.reshape(IMAGE_SIZE, s, IMAGE_SIZE, s, *a.shape[2:]).swapaxes(1, 2).reshape(IMAGE_SIZE, IMAGE_SIZE, s * s, *a.shape[2:])


def _downsample_image(canvas: np.ndarray) -> np.ndarray:
    return np.clip(_blocks(canvas).mean(axis=2) + 0.5, 0, 255).astype(np.uint8)


def _downsample_labels(inst_canvas: np.ndarray) -> np.ndarray:
    """Majority id of each 4×4 block (ties go to the nearer, later-painted id)."""
    blocks = _blocks(inst_canvas)
    n = int(inst_canvas.max()) + 1
    counts = np.stack([(blocks == k).sum(axis=2) for k in range(n)], axis=-1)
    # argmax over reversed ids so a tie prefers the higher id (painted later, nearer)
    return (n - 1 - np.argmax(counts[..., ::-1], axis=-1)).astype(np.int32)


def _downsample_depth(depth_canvas: np.ndarray, inst_canvas: np.ndarray, inst_map: np.ndarray) -> np.ndarray:
    """Mean depth of the supersamples that carry the pixel's own label, so depth stays
    consistent with the instance masks at edges (no blend of near and far)."""
    d = _blocks(depth_canvas)
    same = _blocks(inst_canvas) == inst_map[..., None]
    out = (d * same).sum(axis=2) / np.maximum(same.sum(axis=2), 1)
    # Sky pixels carry no depth; a block on the horizon keeps only its ground samples.
    return out.astype(np.float32)


# ---------------------------------------------------------------------------------- caption

_NUMBERS = ["no", "a", "two", "three", "four", "five", "six"]


def _caption(objects: list[_Object], setting: str, lighting: str) -> str:
    """'two red balls, a blue box and a person in a yellow shirt on grass on a sunny day'."""
    groups: dict[tuple[str, str], int] = {}
    for o in objects:  # first-seen order: left to right would be a cue the prompt can't give
        groups[(o.category, o.colour)] = groups.get((o.category, o.colour), 0) + 1
    phrases = []
    for (cat, colour), n in groups.items():
        noun = cat if n == 1 else plural(cat)
        if cat == "person":
            clothes = "shirt" if n == 1 else "shirts"
            article = ("an " if colour[0] in "aeiou" else "a ") if n == 1 else ""
            phrases.append(f"{_NUMBERS[n]} {noun} in {article}{colour} {clothes}")
        else:
            article = "an" if n == 1 and colour[0] in "aeiou" else _NUMBERS[n]
            phrases.append(f"{article} {colour} {noun}")
    if not phrases:
        things = "an empty scene"
    elif len(phrases) == 1:
        things = phrases[0]
    else:
        things = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"{things} {SETTINGS[setting]['phrase']} {LIGHTING[lighting]['phrase']}"


# ----------------------------------------------------------------------------------- stats


def scene_stats(samples: list[LabelledSample]) -> dict:
    """Object count and size distribution of rendered scenes (what `world stats` prints).

    Sizes are visible instance areas as a fraction of the image; people's joint spacing is the
    median distance, in latent cells (4 px), between left and right shoulder, hip and knee."""
    areas = [float(inst.mask.mean()) for s in samples for inst in s.instances]
    counts = [len(s.instances) for s in samples]
    spacing = []
    for s in samples:
        for inst in s.instances:
            kp = inst.keypoints
            if kp is None:
                continue
            for a, b in ((5, 6), (11, 12), (13, 14)):
                if kp[a, 2] > 0 and kp[b, 2] > 0:
                    spacing.append(float(np.hypot(*(kp[a, :2] - kp[b, :2]))) / 4.0)
    per_category: dict[str, list[float]] = {}
    for s in samples:
        for inst in s.instances:
            per_category.setdefault(CATEGORIES[inst.category_id - 1].name, []).append(float(inst.mask.mean()))
    a = np.asarray(areas) if areas else np.zeros(1)
    return {
        "scenes": len(samples),
        "objects_per_image": round(float(np.mean(counts)), 3),
        "max_objects": int(max(counts)),
        "median_instance_area": round(float(np.median(a)), 4),
        "instance_area_p10": round(float(np.percentile(a, 10)), 4),
        "instance_area_p90": round(float(np.percentile(a, 90)), 4),
        "under_64_px": round(float(np.mean(a * IMAGE_SIZE**2 < 64)), 3),
        "median_joint_spacing_cells": round(float(np.median(spacing)), 2) if spacing else None,
        "median_area_per_category": {k: round(float(np.median(v)), 4) for k, v in sorted(per_category.items())},
    }
