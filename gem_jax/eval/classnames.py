"""Class names of the evaluation datasets and the prompt templates.

Two name sets per dataset:

* ``"mmseg"``: the class names of the mmsegmentation dataset classes, verbatim (one prompt per
  class; ADE20K's ``'bed '`` without its trailing space).  Index order = label ids.
* ``"sclip"``: SCLIP's ``configs/cls_*.txt`` (github.com/wangf3014/SCLIP), which ProxyCLIP and
  NACLIP reuse: some classes have several prompts (synonyms, e.g. VOC's
  ``person, person in shirt, ...``); a class's probability is the highest over its prompts.  On
  VOC21 and COCO-Object the background class is prompted with a list of "stuff" words.
  ClearCLIP reuses them except on VOC21, VOC20 and COCO-Object, where its files have one plain
  name per class (mmseg's, "background" prompted as such; on VOC "ship" and "table" for "boat"
  and "diningtable"): `gem_jax.eval.protocols.clearclip_names`, ``--names clearclip`` in
  ``gem-jax eval``.

A name set is a list with one entry per class (label id), each entry a list of prompts.  Files
in SCLIP's format (one class per line, prompts separated by commas) load with `read_names`.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["CLASSES", "NAME_SETS", "IMAGENET_TEMPLATES", "GEM_TEMPLATE", "names_for", "read_names",
           "parse_names"]

GEM_TEMPLATE = "a photo of a {}."

# ----------------------------------------------------------------------------- mmseg class names
VOC20 = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
         "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
         "train", "tvmonitor")
VOC21 = ("background",) + VOC20

CONTEXT59 = ("aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book",
             "bottle", "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth",
             "computer", "cow", "cup", "curtain", "dog", "door", "fence", "floor", "flower", "food",
             "grass", "ground", "horse", "keyboard", "light", "motorbike", "mountain", "mouse",
             "person", "plate", "platform", "pottedplant", "road", "rock", "sheep", "shelves",
             "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train", "tree", "truck",
             "tvmonitor", "wall", "water", "window", "wood")
CONTEXT60 = ("background",) + CONTEXT59

ADE20K = ("wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane",
          "grass", "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant",
          "curtain", "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror",
          "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp",
          "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
          "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator",
          "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow", "screen door",
          "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower",
          "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer",
          "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
          "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
          "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman",
          "bottle", "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt",
          "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
          "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
          "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
          "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan",
          "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
          "glass", "clock", "flag")

COCO_THINGS = ("person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
               "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
               "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
               "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
               "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
               "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl",
               "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza",
               "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
               "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
               "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
               "hair drier", "toothbrush")
COCO_STUFF_ONLY = ("banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet",
                   "cage", "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth",
                   "clothes", "clouds", "counter", "cupboard", "curtain", "desk-stuff", "dirt",
                   "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone",
                   "floor-tile", "floor-wood", "flower", "fog", "food-other", "fruit",
                   "furniture-other", "grass", "gravel", "ground-other", "hill", "house", "leaves",
                   "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin",
                   "net", "paper", "pavement", "pillow", "plant-other", "plastic", "platform",
                   "playingfield", "railing", "railroad", "river", "road", "rock", "roof", "rug",
                   "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow",
                   "solid-other", "stairs", "stone", "straw", "structural-other", "table", "tent",
                   "textile-other", "towel", "tree", "vegetable", "wall-brick", "wall-concrete",
                   "wall-other", "wall-panel", "wall-stone", "wall-tile", "wall-wood",
                   "water-other", "waterdrops", "window-blind", "window-other", "wood")
COCO_STUFF = COCO_THINGS + COCO_STUFF_ONLY
COCO_OBJECT = ("background",) + COCO_THINGS

CITYSCAPES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
              "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck",
              "bus", "train", "motorcycle", "bicycle")

CLASSES: dict[str, tuple[str, ...]] = {
    "voc21": VOC21, "voc20": VOC20, "context60": CONTEXT60, "context59": CONTEXT59,
    "ade20k": ADE20K, "coco_stuff": COCO_STUFF, "coco_object": COCO_OBJECT,
    "cityscapes": CITYSCAPES,
}

# ----------------------------------------------------------------------------- SCLIP's prompt lists
_SCLIP_BACKGROUND = ("sky, wall, tree, wood, grass, road, sea, river, mountain, sands, desk, bed, "
                     "building, cloud, lamp, door, window, wardrobe, ceiling, shelf, curtain, stair, "
                     "floor, hill, rail, fence")
_SCLIP_PERSON = "person, person in shirt, person in jeans, person in dress, person in sweater, " \
                "person in skirt, person in jacket"
_SCLIP_VOC20 = ["aeroplane", "bicycle", "bird", "ship", "bottle", "bus", "car", "cat", "chair", "cow",
                "table", "dog", "horse", "motorbike", _SCLIP_PERSON, "pottedplant", "sheep", "sofa",
                "train", "television monitor, tv monitor, monitor, television, screen"]
_SCLIP_ADE20K = [n.replace(" ", "") for n in ADE20K]  # SCLIP's cls_ade20k.txt drops the spaces
_SCLIP_COCO_STUFF = [n.replace(" ", "") for n in COCO_STUFF]  # likewise cls_coco_stuff.txt
_SCLIP_CITYSCAPES = [n.replace(" ", "") for n in CITYSCAPES]  # likewise cls_city_scapes.txt
_SCLIP_COCO_OBJECT = [_SCLIP_BACKGROUND, _SCLIP_PERSON + ", body"] + list(COCO_THINGS[1:])


def parse_names(lines) -> list[list[str]]:
    """SCLIP's format: one class per line, its prompts separated by commas."""
    out = []
    for i, line in enumerate(lines):
        prompts = [p.strip() for p in line.strip("\n").split(",")]
        prompts = [p for p in prompts if p]
        if not prompts:
            raise ValueError(f"class {i} (line {i + 1}) has no prompt")
        out.append(prompts)
    return out


def read_names(path: str | Path) -> list[list[str]]:
    """A name set from a text file in SCLIP's format (blank trailing lines ignored)."""
    text = Path(path).read_text(encoding="utf-8")
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return parse_names(lines)


NAME_SETS: dict[str, dict[str, list[list[str]]]] = {
    "mmseg": {k: [[n] for n in v] for k, v in CLASSES.items()},
    "sclip": {
        "voc21": parse_names([_SCLIP_BACKGROUND] + _SCLIP_VOC20),
        "voc20": parse_names(_SCLIP_VOC20),
        "context60": [[n] for n in CONTEXT60],
        "context59": [[n] for n in CONTEXT59],
        "ade20k": [[n] for n in _SCLIP_ADE20K],
        "coco_stuff": [[n] for n in _SCLIP_COCO_STUFF],
        "coco_object": parse_names(_SCLIP_COCO_OBJECT),
        "cityscapes": [[n] for n in _SCLIP_CITYSCAPES],
    },
}


def names_for(dataset: str, names: str | Path = "mmseg") -> list[list[str]]:
    """The prompt lists (one list per class) of `dataset` from a named set or a file."""
    if isinstance(names, str) and names in NAME_SETS:
        return [list(p) for p in NAME_SETS[names][dataset]]
    path = Path(names)
    if not path.is_file():
        raise ValueError(f"--names must be one of {sorted(NAME_SETS)} or a text file "
                         f"(one class per line, prompts separated by commas); {str(names)!r} is neither")
    out = read_names(path)
    n = len(CLASSES[dataset])
    if len(out) != n:
        raise ValueError(f"{path} lists {len(out)} classes but {dataset} has {n}")
    return out


# ----------------------------------------------------------------------------- templates
# The 80 ImageNet prompt templates of CLIP's zero-shot notebook (as in SCLIP's
# prompts/imagenet_template.py, in the same order).
IMAGENET_TEMPLATES = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.",
    "graffiti of a {}.", "a bad photo of the {}.", "a cropped photo of the {}.", "a tattoo of a {}.",
    "the embroidered {}.", "a photo of a hard to see {}.", "a bright photo of a {}.",
    "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.",
    "a bright photo of the {}.", "a cropped photo of a {}.", "a plastic {}.",
    "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.",
    "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.",
    "a close-up photo of the {}.", "a photo of a {}.", "the origami {}.",
    "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.", "a origami {}.",
    "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.",
    "a photo of a nice {}.", "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.",
    "art of a {}.", "a sketch of the {}.", "a embroidered {}.", "a pixelated photo of a {}.",
    "itap of the {}.", "a jpeg corrupted photo of the {}.", "a good photo of a {}.",
    "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.",
    "a dark photo of a {}.", "itap of a {}.", "graffiti of the {}.", "a toy {}.",
    "itap of my {}.", "a photo of a cool {}.", "a photo of a small {}.", "a tattoo of the {}.",
)
