"""Evaluation harness: GEM's segmentation protocol and the sliding-window protocol of the later
training-free papers on the standard datasets, mIoU without mmsegmentation.

    from gem_jax.eval import evaluate, GEMProtocol, get_dataset, names_for
    spec = get_dataset("voc21")
    proto = GEMProtocol(model, names_for("voc21"), has_background=True,
                        background="threshold", threshold=0.85)
    results = evaluate(model, spec, "data/VOCdevkit", proto, out="voc21.json")

Other methods with their papers' protocols (`METHOD_PROTOCOLS`, from each upstream's configs):

    proto = method_protocol(model, "naclip", "voc21")   # short side 336, whole image, PAMR, ...
    results = evaluate(model, "voc21", "data/VOCdevkit", proto, out="naclip-voc21.json")

Command line: ``gem-jax eval --dataset voc21 --root data/VOCdevkit`` (or ``python -m gem_jax.eval``).
"""

from .classnames import CLASSES, GEM_TEMPLATE, IMAGENET_TEMPLATES, NAME_SETS, names_for, read_names
from .datasets import DATASETS, DatasetError, DatasetSpec, Sample, get_dataset, load_label
from .metrics import ConfusionMatrix, metrics_from_confusion
from .protocols import (METHOD_PROTOCOLS, PROTOCOLS, GEMProtocol, SlidingProtocol, classify,
                        method_protocol, protocol_defaults, slide_inference, window_boxes)
from .runner import EvalError, evaluate

__all__ = [
    "CLASSES", "ConfusionMatrix", "DATASETS", "DatasetError", "DatasetSpec", "EvalError",
    "GEMProtocol", "GEM_TEMPLATE", "IMAGENET_TEMPLATES", "METHOD_PROTOCOLS", "NAME_SETS",
    "PROTOCOLS", "Sample", "method_protocol", "protocol_defaults",
    "SlidingProtocol", "classify", "evaluate", "get_dataset", "load_label",
    "metrics_from_confusion", "names_for", "read_names", "slide_inference", "window_boxes",
]
