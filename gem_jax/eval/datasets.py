"""Readers for the standard semantic-segmentation validation sets, in mmsegmentation's layouts.

Each dataset is a `DatasetSpec`; ``spec.samples(root)`` lists ``Sample(id, image, label)`` (paths)
in a fixed order, ``load_label(sample.label, spec.reduce_zero_label)`` reads the label map.
`root` may be the dataset directory itself or a parent of it (``VOCdevkit/...`` etc. is searched).

==============  ==================================================================  ===========
name            layout under root (mmseg convention)                                 classes
==============  ==================================================================  ===========
voc21           VOC2012/{JPEGImages, SegmentationClass, ImageSets/Segmentation/     21 (0 = bg)
                val.txt}
voc20           same files, reduce_zero_label (background → ignored)                20
context60       VOC2010/{JPEGImages, SegmentationClassContext,                      60 (0 = bg)
                ImageSets/SegmentationContext/val.txt} (mmseg's pascal_context.py)
context59       same files, reduce_zero_label                                       59
ade20k          ADEChallengeData2016/{images,annotations}/validation, reduce_zero    150
coco_stuff      coco_stuff164k/{images,annotations}/val2017, *_labelTrainIds.png    171
coco_object     coco_stuff164k/{images,annotations}/val2017, *_instanceTrainIds.png  81 (0 = bg)
                (GroupViT/TCL's convert_coco_object.py, used by SCLIP/ClearCLIP/ProxyCLIP)
cityscapes      cityscapes/{leftImg8bit,gtFine}/val/<city>/,                         19
                *_leftImg8bit.png / *_gtFine_labelTrainIds.png
==============  ==================================================================  ===========

Label 255 is ignored everywhere.  ``reduce_zero_label`` is mmseg's: 0 → 255, then v → v − 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from .classnames import CLASSES

__all__ = ["DatasetError", "DatasetSpec", "Sample", "DATASETS", "ALIASES", "get_dataset",
           "load_label", "load_image", "POINT_DATASETS", "POINT_ALIASES", "get_point_dataset",
           "is_point_dataset"]


class DatasetError(RuntimeError):
    """The dataset is missing, incomplete, or not in the expected layout."""


@dataclass(frozen=True)
class Sample:
    id: str
    image: Path
    label: Path


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    title: str
    has_background: bool          # class 0 is "background"
    reduce_zero_label: bool
    layout: str                   # human description of the expected layout
    _find: Callable = field(repr=False, compare=False)

    @property
    def classes(self) -> tuple[str, ...]:
        return CLASSES[self.name]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def resolve_root(self, root) -> Path:
        return self._find(Path(root).expanduser(), resolve_only=True)

    def samples(self, root) -> list[Sample]:
        """All validation samples, sorted by id."""
        return self._find(Path(root).expanduser())


def _first_dir(root: Path, candidates, marker: Callable[[Path], bool], spec_name, layout) -> Path:
    tried = []
    for c in candidates:
        d = root / c if c else root
        tried.append(str(d))
        if d.is_dir() and marker(d):
            return d
    if not root.exists():
        raise DatasetError(f"{spec_name}: root {root} does not exist")
    raise DatasetError(f"{spec_name}: no dataset found under {root} (looked in: "
                       f"{', '.join(tried)}). Expected layout: {layout}")


def _split_file_samples(d: Path, split: Path, img_dir, lbl_dir, name) -> list[Sample]:
    if not split.is_file():
        raise DatasetError(f"{name}: split file {split} is missing")
    ids = [ln.strip() for ln in split.read_text().splitlines() if ln.strip()]
    if not ids:
        raise DatasetError(f"{name}: split file {split} is empty")
    out = []
    for i in ids:
        img = d / img_dir / f"{i}.jpg"
        lbl = d / lbl_dir / f"{i}.png"
        for p, what in ((img, "image"), (lbl, "label")):
            if not p.is_file():
                raise DatasetError(f"{name}: {what} {p} listed in {split.name} is missing")
        out.append(Sample(i, img, lbl))
    return sorted(out, key=lambda s: s.id)


def _glob_samples(img_root: Path, lbl_root: Path, img_suffix, lbl_suffix, name) -> list[Sample]:
    if not img_root.is_dir():
        raise DatasetError(f"{name}: image directory {img_root} is missing")
    out = []
    for img in sorted(img_root.rglob(f"*{img_suffix}")):
        rel = img.relative_to(img_root).as_posix()[: -len(img_suffix)]
        lbl = lbl_root / f"{rel}{lbl_suffix}"
        if not lbl.is_file():
            raise DatasetError(f"{name}: label {lbl} for image {img} is missing")
        out.append(Sample(rel, img, lbl))
    if not out:
        raise DatasetError(f"{name}: no *{img_suffix} images under {img_root}")
    return out


def _voc(year, seg_dir, split_rel):
    def find(root: Path, resolve_only=False, _name=None, _layout=None):
        d = _first_dir(root, ["", f"VOC{year}", f"VOCdevkit/VOC{year}"],
                       lambda d: (d / "JPEGImages").is_dir() and (d / seg_dir).is_dir(),
                       _name, _layout)
        if resolve_only:
            return d
        return _split_file_samples(d, d / split_rel, "JPEGImages", seg_dir, _name)
    return find


def _globbed(dirnames, img_rel, lbl_rel, img_suffix, lbl_suffix):
    def find(root: Path, resolve_only=False, _name=None, _layout=None):
        d = _first_dir(root, [""] + list(dirnames),
                       lambda d: (d / img_rel).is_dir() and (d / lbl_rel).is_dir(), _name, _layout)
        if resolve_only:
            return d
        return _glob_samples(d / img_rel, d / lbl_rel, img_suffix, lbl_suffix, _name)
    return find


def _spec(name, title, has_bg, reduce, layout, find):
    def bound(root, resolve_only=False):
        return find(root, resolve_only=resolve_only, _name=name, _layout=layout)
    return DatasetSpec(name, title, has_bg, reduce, layout, bound)


_VOC_LAYOUT = "VOCdevkit/VOC2012/{JPEGImages/*.jpg, SegmentationClass/*.png, ImageSets/Segmentation/val.txt}"
_CTX_LAYOUT = ("VOCdevkit/VOC2010/{JPEGImages/*.jpg, SegmentationClassContext/*.png, "
               "ImageSets/SegmentationContext/val.txt} (converted with mmseg's "
               "tools/dataset_converters/pascal_context.py)")
_ADE_LAYOUT = "ADEChallengeData2016/{images/validation/*.jpg, annotations/validation/*.png}"
_STUFF_LAYOUT = ("coco_stuff164k/{images/val2017/*.jpg, annotations/val2017/*_labelTrainIds.png} "
                 "(converted with mmseg's tools/dataset_converters/coco_stuff164k.py)")
_OBJ_LAYOUT = ("coco_stuff164k/{images/val2017/*.jpg, annotations/val2017/*_instanceTrainIds.png} "
               "(converted with GroupViT/TCL/SCLIP's convert_coco_object.py)")
_CITY_LAYOUT = ("cityscapes/{leftImg8bit/val/<city>/*_leftImg8bit.png, "
                "gtFine/val/<city>/*_gtFine_labelTrainIds.png} (cityscapesscripts createTrainIdLabelImgs)")

DATASETS: dict[str, DatasetSpec] = {s.name: s for s in [
    _spec("voc21", "PASCAL VOC 2012 val, 20 classes + background", True, False, _VOC_LAYOUT,
          _voc(2012, "SegmentationClass", "ImageSets/Segmentation/val.txt")),
    _spec("voc20", "PASCAL VOC 2012 val, 20 classes (background ignored)", False, True, _VOC_LAYOUT,
          _voc(2012, "SegmentationClass", "ImageSets/Segmentation/val.txt")),
    _spec("context60", "PASCAL Context val, 59 classes + background", True, False, _CTX_LAYOUT,
          _voc(2010, "SegmentationClassContext", "ImageSets/SegmentationContext/val.txt")),
    _spec("context59", "PASCAL Context val, 59 classes (background ignored)", False, True,
          _CTX_LAYOUT,
          _voc(2010, "SegmentationClassContext", "ImageSets/SegmentationContext/val.txt")),
    _spec("ade20k", "ADE20K val (SceneParsing, 150 classes)", False, True, _ADE_LAYOUT,
          _globbed(["ADEChallengeData2016", "ade/ADEChallengeData2016"], "images/validation",
                   "annotations/validation", ".jpg", ".png")),
    _spec("coco_stuff", "COCO-Stuff 164k val2017, 171 classes", False, False, _STUFF_LAYOUT,
          _globbed(["coco_stuff164k"], "images/val2017", "annotations/val2017", ".jpg",
                   "_labelTrainIds.png")),
    _spec("coco_object", "COCO-Object val2017, 80 classes + background", True, False, _OBJ_LAYOUT,
          _globbed(["coco_stuff164k"], "images/val2017", "annotations/val2017", ".jpg",
                   "_instanceTrainIds.png")),
    _spec("cityscapes", "Cityscapes val, 19 classes", False, False, _CITY_LAYOUT,
          _globbed(["cityscapes"], "leftImg8bit/val", "gtFine/val", "_leftImg8bit.png",
                   "_gtFine_labelTrainIds.png")),
]}

ALIASES = {
    "voc": "voc21", "pascal_voc": "voc21", "voc2012": "voc21",
    "context": "context59", "pascal_context": "context59", "pc59": "context59", "pc60": "context60",
    "ade": "ade20k", "ade150": "ade20k",
    "coco-stuff": "coco_stuff", "cocostuff": "coco_stuff", "coco_stuff164k": "coco_stuff",
    "stuff": "coco_stuff", "coco-object": "coco_object", "object": "coco_object",
    "city": "cityscapes", "city_scapes": "cityscapes",
}


# Point-label datasets: no label maps, a p-mIoU over annotated points instead of mIoU (see
# gem_jax.eval.oiv7); evaluated with gem_jax.eval.runner.evaluate_points.
POINT_DATASETS = {"oiv7-points": "validation", "oiv7-points-test": "test"}
POINT_ALIASES = {"oiv7": "oiv7-points", "oiv7_points": "oiv7-points", "openimages": "oiv7-points",
                 "openimages-v7-points": "oiv7-points", "oiv7_points_test": "oiv7-points-test"}


def _point_key(name: str) -> str | None:
    key = name.strip().lower()
    key = POINT_ALIASES.get(key, key)
    return key if key in POINT_DATASETS else None


def is_point_dataset(name: str) -> bool:
    return _point_key(name) is not None


def get_point_dataset(name: str):
    """The `gem_jax.eval.oiv7.OIV7Points` split registered as `name` (e.g. "oiv7-points")."""
    key = _point_key(name)
    if key is None:
        raise KeyError(f"unknown point dataset {name!r}; known: {', '.join(POINT_DATASETS)} "
                       f"(aliases: {', '.join(sorted(POINT_ALIASES))})")
    from .oiv7 import OIV7Points  # oiv7 imports DatasetError from here
    return OIV7Points(split=POINT_DATASETS[key], name=key)


def get_dataset(name: str) -> DatasetSpec:
    key = name.strip().lower().replace("-", "_")
    key = ALIASES.get(key, ALIASES.get(name.strip().lower(), key))
    if key not in DATASETS:
        if is_point_dataset(name):
            raise KeyError(f"{name!r} is a point-label dataset (p-mIoU, not mIoU): evaluate it with "
                           f"gem_jax.eval.runner.evaluate_points and a PointProtocol")
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)} "
                       f"(aliases: {', '.join(sorted(ALIASES))}); point-label datasets: "
                       f"{', '.join(POINT_DATASETS)}")
    return DATASETS[key]


def load_label(path, reduce_zero_label: bool = False) -> np.ndarray:
    """A label map as uint8 [H, W] (palette PNGs give their indices, as mmseg's pillow backend)."""
    try:
        with Image.open(path) as im:
            if im.mode in ("RGB", "RGBA"):
                raise DatasetError(f"label {path} is a colour image (mode {im.mode}); expected a "
                                   f"class-index PNG (mode L or P)")
            a = np.asarray(im)
    except DatasetError:
        raise
    except Exception as e:
        raise DatasetError(f"cannot read label {path}: {e}") from e
    if a.ndim != 2:
        raise DatasetError(f"label {path} has shape {a.shape}; expected a 2-D class-index map")
    if a.dtype != np.uint8:
        if a.min() < 0 or a.max() > 255:
            raise DatasetError(f"label {path} has values outside 0..255")
        a = a.astype(np.uint8)
    if reduce_zero_label:  # mmseg: 0 → 255, v → v − 1, and 255 stays 255
        b = a.astype(np.int16) - 1
        b[(a == 0) | (a == 255)] = 255
        a = b.astype(np.uint8)
    return a


def load_image(path) -> Image.Image:
    """The image as an RGB PIL image, fully decoded."""
    from ..preprocess import to_rgb
    try:
        im = Image.open(path)
        im.load()
    except Exception as e:
        raise DatasetError(f"cannot read image {path}: {e}") from e
    return to_rgb(im)
