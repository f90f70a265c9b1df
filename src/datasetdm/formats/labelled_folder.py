"""The labelled folder: the project's interchange format, written and read here.

Layout of a folder ``DIR`` (every label kind is optional, but present for all images or none)::

    DIR/images/{id}.png        RGB image (the reader also accepts .jpg / .jpeg)
    DIR/semantic/{id}.png      palettized 'P' PNG (the reader also accepts 'L'): pixel = category id,
                               0 background, 255 ignore (VOC style)
    DIR/depth/{id}.png         uint16 PNG in millimetres (NYU style), 0 = no depth; depths beyond
                               65.535 m are clipped to 65535 when written
    DIR/annotations.json       COCO JSON: ``images`` (id, file_name, height, width, caption,
                               sample_id), ``annotations`` (RLE masks, person keypoints),
                               ``categories`` (with keypoint names and skeleton for people) and
                               ``info`` (``tasks``, ``depth_scale`` = metres per depth unit)
    DIR/categories.json        only read when there is no annotations.json: ``[{"id", "name"}]``,
                               so a VOC-style folder (images + semantic PNGs) can name its classes

The writer always writes annotations.json (it carries the captions, categories, depth scale and
list of tasks). The reader takes categories from annotations.json when it exists and ignores
categories.json then. Without annotations.json, images are ordered by file name and the depth
scale is the NYU convention (0.001 m per unit).

Checks: ``read_labelled_folder`` checks what is cheap up front (JSON, file presence, image
headers: sizes and modes, category ids in annotations). Pixel-level checks (truncated image data,
unknown ids inside semantic masks) run when a sample is loaded; ``LabelledFolder.validate()``
loads every sample to run them all at once. Every problem is a ``DatasetdmError`` naming the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from datasetdm.errors import DatasetdmError
from datasetdm.formats import coco
from datasetdm.formats.png import (
    DEPTH_MODES,
    DEPTH_SCALE,
    SEMANTIC_MODES,
    open_header,
    read_depth_png,
    read_rgb,
    read_semantic_png,
    write_depth_png,
    write_image_png,
    write_semantic_png,
)
from datasetdm.formats.sample import IGNORE_INDEX, Category, Instance, LabelledSample
from datasetdm.io import atomic_folder, output_lock, write_json_atomic

ANNOTATIONS_FILE = "annotations.json"
CATEGORIES_FILE = "categories.json"
TASKS = ("semantic", "instances", "keypoints", "depth", "captions")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------


class LabelledFolderWriter:
    """Write ``LabelledSample``s to a labelled folder; use as a context manager or call ``close()``.

    The folder is built in a hidden temporary sibling (``.{name}.tmp-{pid}-…``) and renamed onto
    ``out_dir`` by ``close`` once annotations.json is written, so readers see no folder (or the
    previous one) until the new one is complete; if the ``with`` block raises, or the process is
    killed, no half-written folder is left under ``out_dir`` and a rerun removes the temporary.
    The writer holds ``out_dir``'s lock (``io.output_lock``) from construction to close.

    ``out_dir`` may be new or empty; a labelled folder there is replaced as a whole only with
    ``overwrite`` (the CLI's ``--overwrite``); a folder holding anything else is never replaced.

    The first sample fixes which label kinds (semantic, instances, depth) the folder carries;
    every later sample must carry the same ones, because the reader requires that too.
    """

    def __init__(self, out_dir: str | Path, categories: list[Category], *, overwrite: bool = False):
        self.out_dir = Path(out_dir)
        ids = [c.id for c in categories]
        if len(set(ids)) != len(ids):
            raise DatasetdmError(f"{self.out_dir}: duplicate category ids {sorted(ids)}")
        for c in categories:
            if c.id < 1:
                raise DatasetdmError(
                    f"{self.out_dir}: category {c.name!r} has id {c.id}; ids start at 1 (0 is background)"
                )
        self.categories = list(categories)
        self._by_id = {c.id: c for c in categories}
        self._kinds: frozenset[str] | None = None
        self._ids: set[str] = set()
        self._images: list[dict] = []
        self._annotations: list[dict] = []
        self._has_keypoints = False
        self._has_captions = False
        self._closed = False
        self._building = atomic_folder(self.out_dir)
        with output_lock(self.out_dir):  # checked under the lock: no other run is replacing it meanwhile
            check_replaceable(self.out_dir, overwrite)
            self._dir = self._building.__enter__()  # takes the lock again (re-entrant) until close

    def __enter__(self) -> "LabelledFolderWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _file(self, *parts: str) -> Path:
        return self._dir.joinpath(*parts)

    def _final_name(self, err: OSError) -> OSError:
        """The OSError naming the file's place in ``out_dir``, not in the temporary sibling."""
        name = str(err.filename) if err.filename else str(self._dir)
        if name.startswith(str(self._dir)):
            name = str(self.out_dir) + name[len(str(self._dir)):]
        return OSError(err.errno, err.strerror or str(err), name)

    def add(self, sample: LabelledSample) -> None:
        if self._closed:
            raise DatasetdmError(f"{self.out_dir}: writer is closed")
        sid = self._check_sample(sample)
        kinds = frozenset(k for k in ("semantic", "instances", "depth") if getattr(sample, k) is not None)
        if self._kinds is None:
            self._kinds = kinds
        elif kinds != self._kinds:
            raise DatasetdmError(
                f"sample {sid!r}: carries {sorted(kinds) or 'no labels'} but earlier samples carry "
                f"{sorted(self._kinds) or 'no labels'}; every image in a folder needs the same label kinds"
            )

        height, width = sample.size
        image_id = len(self._images) + 1
        try:
            write_image_png(self._file("images", f"{sid}.png"), sample.image)
            if sample.semantic is not None:
                write_semantic_png(self._file("semantic", f"{sid}.png"), sample.semantic)
            if sample.depth is not None:
                write_depth_png(self._file("depth", f"{sid}.png"), sample.depth)
        except OSError as err:
            raise self._final_name(err) from None

        entry = {
            "id": image_id,
            "file_name": f"{sid}.png",  # relative to images/, as COCO tools expect
            "height": height,
            "width": width,
            "sample_id": sid,
        }
        if sample.caption is not None:
            entry["caption"] = sample.caption
            self._has_captions = True
        if sample.meta:
            entry["meta"] = sample.meta
        self._images.append(entry)
        for inst in sample.instances or []:
            ann = coco.instance_to_annotation(inst, len(self._annotations) + 1, image_id)
            self._has_keypoints |= "keypoints" in ann
            self._annotations.append(ann)
        self._ids.add(sid)

    def _check_sample(self, sample: LabelledSample) -> str:
        sid = str(sample.id)
        if not sid or "/" in sid or "\\" in sid or sid.startswith("."):
            raise DatasetdmError(
                f"sample {sid!r}: id must be a non-empty file name (no '/', not starting with '.')"
            )
        if sid in self._ids:
            raise DatasetdmError(f"sample {sid!r}: duplicate id")
        image = np.asarray(sample.image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise DatasetdmError(
                f"sample {sid!r}: image must be (H, W, 3) uint8, got {image.shape} {image.dtype}"
            )
        hw = image.shape[:2]
        if sample.semantic is not None:
            sem = np.asarray(sample.semantic)
            if sem.shape != hw or sem.dtype != np.uint8:
                raise DatasetdmError(
                    f"sample {sid!r}: semantic must be {hw} uint8, got {sem.shape} {sem.dtype}"
                )
            unknown = set(np.unique(sem).tolist()) - set(self._by_id) - {0, IGNORE_INDEX}
            if unknown:
                raise DatasetdmError(
                    f"sample {sid!r}: semantic mask has unknown category ids {sorted(unknown)}"
                )
        if sample.depth is not None and np.shape(sample.depth) != hw:
            raise DatasetdmError(f"sample {sid!r}: depth must be {hw}, got {np.shape(sample.depth)}")
        if sample.meta:
            try:
                json.dumps(sample.meta)
            except TypeError as e:
                raise DatasetdmError(f"sample {sid!r}: meta must be JSON-serializable ({e})") from None
        for k, inst in enumerate(sample.instances or []):
            where = f"sample {sid!r} instance {k}"
            if inst.category_id not in self._by_id:
                raise DatasetdmError(f"{where}: unknown category id {inst.category_id}")
            if np.shape(inst.mask) != hw:
                raise DatasetdmError(f"{where}: mask must be {hw}, got {np.shape(inst.mask)}")
            if inst.keypoints is not None:
                names = self._by_id[inst.category_id].keypoints
                if names is None:
                    raise DatasetdmError(
                        f"{where}: has keypoints but category {self._by_id[inst.category_id].name!r} "
                        "has no keypoint names"
                    )
                if np.shape(inst.keypoints) != (len(names), 3):
                    raise DatasetdmError(
                        f"{where}: keypoints must be ({len(names)}, 3), got {np.shape(inst.keypoints)}"
                    )
        return sid

    def close(self) -> None:
        """Write annotations.json and put the folder in place. Safe to call twice."""
        if self._closed:
            return
        try:
            self._write_annotations()
        except BaseException as err:
            self.abort()
            if isinstance(err, OSError):
                raise self._final_name(err) from None
            raise
        self._closed = True
        try:
            self._building.__exit__(None, None, None)  # rename onto out_dir, release the lock
        except OSError as err:
            raise self._final_name(err) from None

    def abort(self) -> None:
        """Remove what was written (the temporary sibling) and release the lock; ``out_dir`` keeps
        whatever it held before."""
        if self._closed:
            return
        self._closed = True
        self._building.__exit__(DatasetdmError, DatasetdmError("aborted"), None)

    def _write_annotations(self) -> None:
        kinds = set(self._kinds or ())
        if self._has_keypoints:
            kinds.add("keypoints")
        if self._has_captions:
            kinds.add("captions")
        tasks = [t for t in TASKS if t in kinds]
        info = {"description": "datasetdm labelled folder", "version": FORMAT_VERSION, "tasks": tasks}
        if "depth" in kinds:
            info["depth_scale"] = DEPTH_SCALE  # metres per unit of the depth PNGs
            info["depth_unit"] = "mm"
        write_json_atomic(
            self._file(ANNOTATIONS_FILE),
            {
                "info": info,
                "images": self._images,
                "annotations": self._annotations,
                "categories": [coco.category_to_coco(c) for c in self.categories],
            },
        )


OWNED_ENTRIES = ("images", "semantic", "depth", ANNOTATIONS_FILE, CATEGORIES_FILE)


def check_replaceable(out_dir: Path, overwrite: bool) -> None:
    """Refuse, before anything is written, an output folder that must not be replaced: one that
    holds files without ``overwrite``, and with it, one that is not a labelled folder (none of
    images/, semantic/, depth/, annotations.json, categories.json: a home folder given as --out)."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise DatasetdmError(f"{out_dir}: exists and is not a folder; choose another output folder")
    entries = sorted(p.name for p in out_dir.iterdir())
    if not entries:
        return
    if not any(name in OWNED_ENTRIES for name in entries):
        raise DatasetdmError(f"{out_dir}: holds other files ({', '.join(entries[:3])}) and is not a labelled "
                             "folder; not replacing it: choose an empty or new output folder")
    if not overwrite:
        raise DatasetdmError(f"{out_dir}: already exists; pass --overwrite to replace it, or choose another output folder")


# --------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------


@dataclass
class _Entry:
    id: str
    image_path: Path
    height: int
    width: int
    caption: str | None = None
    meta: dict = field(default_factory=dict)
    semantic_path: Path | None = None
    depth_path: Path | None = None
    annotations: list[dict] = field(default_factory=list)
    coco_id: int | None = None  # the image's id in annotations.json, if there is one


class LabelledFolder:
    """A checked labelled folder; ``folder[i]`` loads sample ``i`` from disk (lazily)."""

    def __init__(
        self,
        root: Path,
        categories: list[Category],
        tasks: tuple[str, ...],
        entries: list[_Entry],
        depth_scale: float,
    ):
        self.root = root
        self.categories = categories
        self.tasks = tasks
        self.depth_scale = depth_scale
        self._entries = entries
        self._known_ids = {c.id for c in categories} | {0, IGNORE_INDEX}

    @property
    def ids(self) -> list[str]:
        return [e.id for e in self._entries]

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[LabelledSample]:
        for i in range(len(self)):
            yield self[i]

    def __getitem__(self, index: int) -> LabelledSample:
        entry = self._entries[index]  # IndexError / negative indices as for a list
        image = read_rgb(entry.image_path)
        if image.shape[:2] != (entry.height, entry.width):
            raise DatasetdmError(
                f"{entry.image_path}: image is {image.shape[1]}x{image.shape[0]} but annotations.json says "
                f"{entry.width}x{entry.height}"
            )
        semantic = depth = instances = None
        if entry.semantic_path is not None:
            semantic = read_semantic_png(entry.semantic_path)
            unknown = set(np.unique(semantic).tolist()) - self._known_ids
            if unknown:
                raise DatasetdmError(
                    f"{entry.semantic_path}: unknown category ids {sorted(unknown)} "
                    f"(known: {sorted(c.id for c in self.categories)}, plus 0 background and 255 ignore)"
                )
        if entry.depth_path is not None:
            depth = read_depth_png(entry.depth_path, self.depth_scale)
        if "instances" in self.tasks:
            instances = []
            for ann in entry.annotations:
                try:
                    instances.append(coco.annotation_to_instance(ann, entry.height, entry.width))
                except Exception as e:
                    raise DatasetdmError(
                        f"{self.root / ANNOTATIONS_FILE}: annotation {ann.get('id')} cannot be decoded ({e})"
                    ) from None
        return LabelledSample(
            id=entry.id,
            image=image,
            caption=entry.caption,
            semantic=semantic,
            instances=instances,
            depth=depth,
            meta=dict(entry.meta),
        )

    def validate(self) -> None:
        """Load every sample, running the pixel-level checks (corrupt data, unknown mask ids)."""
        for i in range(len(self)):
            self[i]


def read_labelled_folder(path: str | Path) -> LabelledFolder:
    """Open and check a labelled folder (see the module docstring for the layout and checks)."""
    root = Path(path)
    if not root.is_dir():
        raise DatasetdmError(f"{root}: not a folder")

    ann_path = root / ANNOTATIONS_FILE
    coco_json = _load_json(ann_path) if ann_path.exists() else None
    is_coco = isinstance(coco_json, dict) and isinstance(coco_json.get("images"), list)
    if coco_json is not None and not is_coco:
        raise DatasetdmError(f"{ann_path}: not a COCO file (expected an object with an 'images' list)")
    info = (coco_json or {}).get("info")
    info = info if isinstance(info, dict) else {}  # user COCO files may carry any 'info'
    declared = set(info.get("tasks") or [])

    if coco_json is not None:
        categories = _parse_categories(coco_json.get("categories") or [], ann_path)
    elif (root / CATEGORIES_FILE).exists():
        raw = _load_json(root / CATEGORIES_FILE)
        raw = raw.get("categories") if isinstance(raw, dict) else raw
        categories = _parse_categories(raw, root / CATEGORIES_FILE)
    else:
        categories = []

    image_files = _list_files(root / "images", IMAGE_SUFFIXES, "image")
    if not image_files:
        raise DatasetdmError(f"{root / 'images'}: no images (expected images/*.png, .jpg or .jpeg)")

    if coco_json is not None:
        entries = _entries_from_coco(coco_json, ann_path, root, image_files)
    else:
        # sizes unknown until the headers are read below
        entries = [_Entry(stem, p, height=-1, width=-1) for stem, p in sorted(image_files.items())]

    # Images: readable header, and the size annotations.json claims.
    for entry in entries:
        with open_header(entry.image_path) as im:
            width, height = im.size
        if entry.height < 0:
            entry.height, entry.width = height, width
        elif (height, width) != (entry.height, entry.width):
            raise DatasetdmError(
                f"{entry.image_path}: image is {width}x{height} but {ann_path.name} says "
                f"{entry.width}x{entry.height}"
            )

    tasks = []
    stems = {e.image_path.stem: e for e in entries}
    for kind, modes in (("semantic", SEMANTIC_MODES), ("depth", DEPTH_MODES)):
        files = _list_files(root / kind, (".png",), f"{kind} mask")
        if not files:
            if kind in declared:
                raise DatasetdmError(
                    f"{root / kind}: missing, but {ann_path.name} lists '{kind}' in info.tasks"
                )
            continue
        tasks.append(kind)
        for stem, p in files.items():
            if stem not in stems:
                raise DatasetdmError(f"{p}: no matching image in {root / 'images'}")
        for stem, entry in stems.items():
            p = files.get(stem)
            if p is None:
                raise DatasetdmError(
                    f"{root / kind / (stem + '.png')}: missing ({kind} files exist for other images)"
                )
            with open_header(p) as im:
                if im.size != (entry.width, entry.height):
                    raise DatasetdmError(
                        f"{p}: {kind} is {im.size[0]}x{im.size[1]} but its image is "
                        f"{entry.width}x{entry.height}"
                    )
                if im.mode not in modes:
                    raise DatasetdmError(
                        f"{p}: {kind} PNG has mode {im.mode!r}; expected one of {list(modes)}"
                    )
            setattr(entry, f"{kind}_path", p)
    if "semantic" in tasks and not categories:
        raise DatasetdmError(
            f"{root}: semantic masks need class names: add {CATEGORIES_FILE} "
            f"([{{\"id\": 1, \"name\": ...}}]) "
            f"or {ANNOTATIONS_FILE}"
        )

    if coco_json is not None:
        annotations = coco_json.get("annotations") or []
        _attach_annotations(annotations, entries, categories, ann_path)
        if annotations or "instances" in declared:
            tasks.append("instances")
        if any(a.get("keypoints") for a in annotations) or "keypoints" in declared:
            tasks.append("keypoints")
        if any(e.caption is not None for e in entries) or "captions" in declared:
            tasks.append("captions")

    depth_scale = info.get("depth_scale", DEPTH_SCALE)
    if not isinstance(depth_scale, (int, float)) or depth_scale <= 0:
        raise DatasetdmError(f"{ann_path}: info.depth_scale must be a positive number, got {depth_scale!r}")

    tasks = tuple(t for t in TASKS if t in tasks)  # canonical order
    return LabelledFolder(root, categories, tasks, entries, float(depth_scale))


def _load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetdmError(f"{path}: not valid JSON ({e})") from None


def _list_files(folder: Path, suffixes: tuple[str, ...], what: str) -> dict[str, Path]:
    """stem -> path for the visible files of ``folder`` (none if it does not exist)."""
    if not folder.is_dir():
        return {}
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file():  # hidden files, atomic-write temporaries
            continue
        if p.suffix.lower() not in suffixes:
            raise DatasetdmError(f"{p}: not a {what} file (expected {', '.join(suffixes)})")
        if p.stem in found:
            raise DatasetdmError(f"{p}: same name as {found[p.stem].name}; ids must be unique")
        found[p.stem] = p
    return found


def _parse_categories(raw, path: Path) -> list[Category]:
    if not isinstance(raw, list):
        raise DatasetdmError(f"{path}: categories must be a list of {{\"id\", \"name\"}} objects")
    categories = []
    for entry in raw:
        try:
            cat = coco.category_from_coco(entry)
        except (TypeError, KeyError, ValueError):
            raise DatasetdmError(
                f"{path}: bad category entry {entry!r} (needs integer 'id' and 'name')"
            ) from None
        if cat.id < 1:
            raise DatasetdmError(
                f"{path}: category {cat.name!r} has id {cat.id}; ids start at 1 (0 is background)"
            )
        categories.append(cat)
    ids = [c.id for c in categories]
    if len(set(ids)) != len(ids):
        raise DatasetdmError(f"{path}: duplicate category ids")
    return categories


def _entries_from_coco(
    coco_json: dict, ann_path: Path, root: Path, image_files: dict[str, Path]
) -> list[_Entry]:
    entries, seen_ids, seen_sids = [], set(), set()
    for img in coco_json["images"]:
        try:
            image_id, file_name = int(img["id"]), str(img["file_name"])
            height, width = int(img["height"]), int(img["width"])
        except (TypeError, KeyError, ValueError):
            raise DatasetdmError(
                f"{ann_path}: image entry {img!r} needs id, file_name, height and width"
            ) from None
        # COCO file names are relative to the image folder; accept an "images/" prefix too.
        name = file_name[len("images/"):] if file_name.startswith("images/") else file_name
        image_path = root / "images" / name
        if not image_path.is_file():
            raise DatasetdmError(f"{image_path}: file is missing (listed in {ann_path.name})")
        if image_id in seen_ids:
            raise DatasetdmError(f"{ann_path}: duplicate image id {image_id}")
        sid = str(img.get("sample_id") or image_path.stem)
        if sid in seen_sids:
            raise DatasetdmError(f"{ann_path}: duplicate sample_id {sid!r}")
        seen_ids.add(image_id)
        seen_sids.add(sid)
        entries.append(
            _Entry(
                id=sid,
                image_path=image_path,
                height=height,
                width=width,
                caption=img.get("caption"),
                meta=img.get("meta") or {},
                coco_id=image_id,
            )
        )
    listed = {e.image_path for e in entries}
    for p in image_files.values():
        if p not in listed:
            raise DatasetdmError(f"{p}: not listed in {ann_path.name} 'images'")
    return entries


def _attach_annotations(
    annotations: list, entries: list[_Entry], categories: list[Category], ann_path: Path
) -> None:
    by_image = {e.coco_id: e for e in entries}
    by_cat = {c.id: c for c in categories}
    for ann in annotations:
        ann_id = ann.get("id") if isinstance(ann, dict) else None
        where = f"{ann_path}: annotation {ann_id}"
        if not isinstance(ann, dict) or "segmentation" not in ann:
            raise DatasetdmError(f"{where}: needs image_id, category_id and segmentation")
        entry = by_image.get(ann.get("image_id"))
        if entry is None:
            raise DatasetdmError(f"{where}: unknown image_id {ann.get('image_id')!r}")
        cat = by_cat.get(ann.get("category_id"))
        if cat is None:
            raise DatasetdmError(f"{where}: unknown category_id {ann.get('category_id')!r}")
        seg = ann["segmentation"]
        if isinstance(seg, dict) and list(seg.get("size", [])) != [entry.height, entry.width]:
            raise DatasetdmError(
                f"{where}: mask size (height, width) {seg.get('size')} does not match image "
                f"{entry.image_path.name} ({entry.height}, {entry.width})"
            )
        kp = ann.get("keypoints")
        if kp and (cat.keypoints is None or len(kp) != 3 * len(cat.keypoints)):
            expected = 3 * len(cat.keypoints) if cat.keypoints else 0
            raise DatasetdmError(
                f"{where}: has {len(kp)} keypoint values; category {cat.name!r} expects {expected}"
            )
        if kp:
            _check_keypoints(kp, cat, entry, where)
        entry.annotations.append(ann)


def _check_keypoints(values: list, cat: Category, entry: _Entry, where: str) -> None:
    """COCO keypoints (x, y, v): v is 0 (not labelled), 1 (labelled, hidden) or 2 (visible), and a
    labelled point lies in the image. The range takes both conventions in use: pixel centres
    (x from -0.5 to width - 0.5, the world and the decoders) and COCO's continuous [0, width]."""
    try:
        points = np.asarray(values, dtype=np.float64).reshape(-1, 3)
    except (TypeError, ValueError):
        raise DatasetdmError(f"{where}: keypoints must be numbers (x, y, v per joint)") from None
    for k, (x, y, v) in enumerate(points):
        name = cat.keypoints[k] if cat.keypoints and k < len(cat.keypoints) else str(k)
        if v not in (0, 1, 2):
            raise DatasetdmError(f"{where}: keypoint {k} ({name}) has visibility {v:g}; COCO allows 0, 1 or 2")
        if v > 0 and not (-0.5 <= x <= entry.width and -0.5 <= y <= entry.height):
            raise DatasetdmError(f"{where}: keypoint {k} ({name}) at ({x:g}, {y:g}) lies outside the "
                                 f"{entry.width}x{entry.height} image {entry.image_path.name}")
