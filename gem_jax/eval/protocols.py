"""The two inference protocols: GEM's single 448×448 pass, and the sliding window of the later
training-free papers (SCLIP, ClearCLIP, ProxyCLIP, NACLIP).

Both turn an image into per-prompt cosine-similarity maps at the label's resolution
(`Protocol.scores`), then into class ids (`classify`):

    p_q   = softmax_q(logit_scale · cos_q)          over all prompts q
    P_c   = max_{q of class c} p_q                   (classes with several prompts: SCLIP's rule)
    pred  = argmax_c P_c;   pred = 0 where max_c P_c < threshold   (datasets with a background)

With one prompt per class and the background not prompted this is exactly
`gem_jax.gem.segment_from_scores(logit_scale · cos, threshold)` (class ids shifted by one).

GEM protocol (``"gem"``, what upstream GEM's code does): the image resized to size×size (PIL
bicubic, `gem_jax.preprocess`), one template ``"a photo of a {}."``, patch-text cosine maps
upsampled (bilinear) to the label size.

Sliding protocol (``"sliding"``, SCLIP's ``forward_slide``): the image resized keeping its aspect
ratio so that the short side is `size` and the long side at most `max_long_side` (mmcv's
``Resize(scale=(2048, size), keep_ratio=True)`` rule); windows of crop×crop every `stride`
pixels (the last window of a row/column is shifted back inside the image); a window whose sides
are not multiples of the patch size is zero-padded around its centre; each window's maps are
upsampled to the window, the overlapping windows' maps averaged (a count map), the average
upsampled to the label size.  Text: the 80 ImageNet templates, each embedding normalized,
averaged, renormalized (CLIP's zero-shot recipe).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from .. import maps as maps_lib, methods as methods_lib, vision
from ..model import _as_arrays, dense_tokens, encode_text
from ..preprocess import preprocess
from ..resample import interp_matrix
from .classnames import GEM_TEMPLATE, IMAGENET_TEMPLATES

__all__ = ["GEMProtocol", "SlidingProtocol", "PointProtocol", "PROTOCOLS", "BACKGROUND_MODES",
           "classify", "refine", "MethodProtocol", "METHOD_PROTOCOLS", "MASKCLIP_TEMPLATES",
           "protocol_key", "protocol_defaults", "method_protocol",
           "build_queries", "rescale_size", "window_boxes", "pad_amounts", "slide_inference",
           "resize_maps", "text_embeddings"]

BACKGROUND_MODES = ("threshold", "prompt", "both")


# ----------------------------------------------------------------------------- small numpy pieces
@lru_cache(maxsize=128)
def _bilinear(n_in: int, n_out: int) -> np.ndarray:
    return interp_matrix(n_in, n_out, "bilinear").astype(np.float32)


def resize_maps(x, out_hw) -> np.ndarray:
    """Bilinear resize (torch ``F.interpolate(align_corners=False)``) of maps [..., h, w] (numpy)."""
    x = np.asarray(x, np.float32)
    h, w = x.shape[-2:]
    oh, ow = int(out_hw[0]), int(out_hw[1])
    if h != oh:
        x = _bilinear(h, oh) @ x
    if w != ow:
        x = x @ _bilinear(w, ow).T
    return np.ascontiguousarray(x)


def rescale_size(width: int, height: int, short: int, long_cap: int | None = 2048) -> tuple[int, int]:
    """mmcv ``rescale_size((w, h), (long_cap, short))``: the largest scale with the short side
    at most `short` and the long side at most `long_cap`; sides rounded half up.  → (w, h)."""
    scale = short / min(width, height)
    if long_cap:
        scale = min(scale, long_cap / max(width, height))
    return max(1, int(width * scale + 0.5)), max(1, int(height * scale + 0.5))


def window_boxes(height: int, width: int, crop, stride) -> list[tuple[int, int, int, int]]:
    """Sliding windows (y1, y2, x1, x2) as mmseg's ``slide_inference``: a grid every `stride`,
    windows clipped to the image and shifted back so they stay crop-sized where possible."""
    hc, wc = (crop, crop) if np.isscalar(crop) else crop
    hs, ws = (stride, stride) if np.isscalar(stride) else stride
    if min(hc, wc, hs, ws) < 1:
        raise ValueError(f"crop and stride must be positive, got crop={crop}, stride={stride}")
    h_grids = max(height - hc + hs - 1, 0) // hs + 1
    w_grids = max(width - wc + ws - 1, 0) // ws + 1
    boxes = []
    for hi in range(h_grids):
        for wi in range(w_grids):
            y1, x1 = hi * hs, wi * ws
            y2, x2 = min(y1 + hc, height), min(x1 + wc, width)
            boxes.append((max(y2 - hc, 0), y2, max(x2 - wc, 0), x2))
    return boxes


def pad_amounts(height: int, width: int, multiple: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) zero padding to the next multiple, split around the centre
    (ClearCLIP / ProxyCLIP's ``compute_padsize``)."""
    def split(n):
        extra = (-n) % multiple
        return extra // 2, extra - extra // 2
    t, b = split(height)
    l, r = split(width)
    return t, b, l, r


def slide_inference(pixels, window_fn: Callable, crop, stride, multiple: int = 1,
                    batch_size: int = 1) -> np.ndarray:
    """Average of per-window maps over a sliding window.

    pixels [H, W, 3]; window_fn(crops [b, h, w, 3]) → maps [b, Q, h, w] for crops of one size
    (already padded to `multiple`).  Returns [Q, H, W]: each pixel's mean over the windows that
    cover it (padding cut off before averaging).
    """
    pixels = np.asarray(pixels)
    height, width = pixels.shape[:2]
    boxes = window_boxes(height, width, crop, stride)
    acc = None
    count = np.zeros((height, width), np.float32)
    groups: dict[tuple, list] = {}
    for box in boxes:  # windows of one (padded) size share a batch
        h, w = box[1] - box[0], box[3] - box[2]
        groups.setdefault((h, w), []).append(box)
    for (h, w), group in groups.items():
        t, b, l, r = pad_amounts(h, w, multiple)
        for i in range(0, len(group), batch_size):
            chunk = group[i:i + batch_size]
            crops = np.stack([pixels[y1:y2, x1:x2] for y1, y2, x1, x2 in chunk])
            if t or b or l or r:
                crops = np.pad(crops, ((0, 0), (t, b), (l, r), (0, 0)))
            maps = np.asarray(window_fn(crops), np.float32)
            if maps.ndim != 4 or maps.shape[0] != len(chunk) or maps.shape[2:] != crops.shape[1:3]:
                raise ValueError(f"window_fn returned shape {maps.shape} for crops {crops.shape}; "
                                 f"expected [{len(chunk)}, Q, {crops.shape[1]}, {crops.shape[2]}]")
            if acc is None:
                acc = np.zeros((maps.shape[1], height, width), np.float32)
            for (y1, y2, x1, x2), m in zip(chunk, maps):
                acc[:, y1:y2, x1:x2] += m[:, t:t + h, l:l + w]
                count[y1:y2, x1:x2] += 1
    assert (count > 0).all()
    return acc / count


# ----------------------------------------------------------------------------- prompts → classes
def build_queries(class_prompts: Sequence[Sequence[str]], has_background: bool,
                  background: str | None) -> tuple[list[str], np.ndarray]:
    """Flatten per-class prompt lists into (prompts, class id of each prompt).  On a dataset with
    a background (class 0), background "threshold" leaves class 0 unprompted."""
    queries, owner = [], []
    for c, prompts in enumerate(class_prompts):
        if has_background and c == 0 and background == "threshold":
            continue
        for p in prompts:
            queries.append(p)
            owner.append(c)
    if not queries:
        raise ValueError("no prompts")
    return queries, np.asarray(owner, np.int64)


def classify(cos, query_class, logit_scale: float, threshold: float | None = None,
             background_index: int = 0, rows: int = 64,
             area_threshold: float | None = None) -> np.ndarray:
    """Class ids [H, W] (int32) from prompt cosine maps cos [Q, H, W] (see the module docstring).

    area_threshold (SCLIP on VOC21, ``area_thd``): a class other than the background whose argmax
    area is at most this fraction of the image's non-background argmax area has its
    probabilities zeroed before the argmax and the threshold (wangf3014/SCLIP@b56bd301
    clip_segmentor.py L156-161)."""
    cos = np.asarray(cos, np.float32)
    query_class = np.asarray(query_class)
    q, height, width = cos.shape
    if query_class.shape != (q,):
        raise ValueError(f"query_class has shape {query_class.shape}, expected ({q},)")
    cands = np.unique(query_class)
    simple = len(cands) == q and (np.diff(query_class) > 0).all()
    slot = np.searchsorted(cands, query_class)
    scale = np.float32(logit_scale)

    def probs(r0):
        z = cos[:, r0:r0 + rows] * scale
        z -= z.max(0, keepdims=True)
        np.exp(z, out=z)
        z /= z.sum(0, keepdims=True)
        if simple:
            return z
        cp = np.zeros((len(cands),) + z.shape[1:], np.float32)
        for i in range(q):
            np.maximum(cp[slot[i]], z[i], out=cp[slot[i]])
        return cp

    keep = None
    if area_threshold is not None:  # first pass: each class's argmax area
        area = np.zeros(len(cands), np.int64)
        for r0 in range(0, height, rows):
            area += np.bincount(probs(r0).argmax(0).ravel(), minlength=len(cands))
        fg = cands != background_index
        keep = ~fg | (area > area_threshold * area[fg].sum())
    out = np.empty((height, width), np.int32)
    for r0 in range(0, height, rows):
        cp = probs(r0)
        if keep is not None:
            cp[~keep] = 0
        best = cp.argmax(0)
        pred = cands[best].astype(np.int32)
        if threshold is not None:
            pmax = np.take_along_axis(cp, best[None], 0)[0]
            pred[pmax < threshold] = background_index
        out[r0:r0 + rows] = pred
    return out


def text_embeddings(model, queries: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """[Q, E] unit text embeddings: per prompt, every template's embedding normalized, averaged,
    renormalized (one template: just the normalized embedding)."""
    for t in templates:
        if "{}" not in t:
            raise ValueError(f"template {t!r} has no '{{}}' placeholder")
    out = []
    for qtext in queries:
        ids = jnp.asarray(model.tokenize([t.format(qtext) for t in templates]))
        e = np.asarray(encode_text(model.params, ids, cfg=model.config), np.float32)
        e = e / np.linalg.norm(e, axis=-1, keepdims=True)
        m = e.mean(0)
        out.append(m / np.linalg.norm(m))
    return np.stack(out)


@partial(jax.jit, static_argnames=("cfg", "method", "use_ori", "ex"))
def _grid_scores(params, pixels, text_emb, knobs, *, cfg, method, use_ori, ex):
    """Patch-prompt scores on the patch grid [B, Q, gh, gw] through the model's method path
    (`gem_jax.model.dense_tokens`), then the method's similarity (`gem_jax.maps.patch_similarity`
    unless the method has its own, e.g. CLIP Surgery's feature surgery); `use_ori`: CLIP's own
    tokens and the plain cosine."""
    dense, ori = dense_tokens(params, pixels, knobs, cfg=cfg, method=method, with_ori=use_ori,
                              ex=ex)
    grid = vision.patch_grid(cfg.vision, pixels.shape[1], pixels.shape[2])
    if use_ori:
        return maps_lib.patch_similarity(ori, text_emb, grid)
    return getattr(method, "similarity", maps_lib.patch_similarity)(dense, text_emb, grid)


PAMR_CLASS_CHUNK = 16  # classes refined at once (bounds PAMR's [C, 16 neighbours, H, W] memory)


def refine(maps, pixels, steps: int, dilations=(8, 16), chunk: int = PAMR_CLASS_CHUNK):
    """PAMR (`gem_jax.pamr`) of score maps [Q, h, w] with the normalized input pixels [H, W, 3]
    bilinearly resized to (h, w), as SCLIP/NACLIP's ``forward_slide``/``predict`` do.  Classes
    are refined `chunk` at a time (PAMR treats them independently), zero-padded to one shape."""
    from .. import pamr
    maps = np.asarray(maps, np.float32)
    q, h, w = maps.shape
    img = np.moveaxis(resize_maps(np.moveaxis(np.asarray(pixels, np.float32), -1, 0), (h, w)), 0, -1)
    out = np.empty_like(maps)
    for i in range(0, q, chunk):
        m = maps[i:i + chunk]
        n = len(m)
        if n < chunk and q > chunk:
            m = np.concatenate([m, np.zeros((chunk - n, h, w), np.float32)])
        out[i:i + n] = np.asarray(pamr.pamr(img[None], m[None], int(steps), tuple(dilations)))[0, :n]
    return out


# ----------------------------------------------------------------------------- protocols
def _method_and_knobs(model, method: str, knobs: dict | None, gem_kw: dict):
    """(method object, knobs with defaults, the user's knob/option dict) for a method name and its
    keyword arguments; GEM's legacy keywords (gem_depth, ...) join the knobs when given.
    Arguments that do not apply to the method and concrete out-of-range knobs raise ValueError."""
    kw = dict(knobs or {})
    kw.update({k: v for k, v in gem_kw.items() if v is not None})
    m, kn = methods_lib.build(method, **kw)
    m.check(model.config.vision.layers, kn)
    return m.for_knobs(kn), kn, kw


def _method_record(name: str, kw: dict, kn: dict) -> dict:
    """The method, its knobs (defaults filled in) and its options, JSON-able, for results."""
    def plain(v):
        if v is None or isinstance(v, (str, bool, int, float)):
            return v
        a = np.asarray(v)
        return a.item() if a.ndim == 0 else a.tolist()
    out = {"method": name}
    out.update({k: plain(v) for k, v in kn.items()})
    out.update({k: plain(v) for k, v in kw.items() if k not in kn})
    return out


def _templates_label(templates) -> str | list:
    t = tuple(templates)
    if len(t) <= 3:
        return list(t)
    if t == IMAGENET_TEMPLATES:
        return f"{len(t)} templates (ImageNet)"
    if t == MASKCLIP_TEMPLATES:
        return f"{len(t)} templates (ImageNet + 5 scene, MaskCLIP/CLIP Surgery)"
    return list(t)


class _Base:
    name = ""

    def __init__(self, model, class_prompts, *, has_background: bool, templates,
                 method: str = "gem", knobs: dict | None = None,
                 gem_depth=None, ss_attn_iter=None, ss_attn_temp=None, use_ori=False,
                 background: str | None = None, threshold: float | None = None,
                 logit_scale: float | None = None, batch_size: int | None = None,
                 area_threshold: float | None = None, pamr_steps: int = 0,
                 pamr_dilations=(8, 16)):
        if has_background:
            if background not in BACKGROUND_MODES:
                raise ValueError(f"background must be one of {BACKGROUND_MODES}, got {background!r}")
            if background in ("threshold", "both") and threshold is None:
                raise ValueError(f"background={background!r} needs a threshold")
            if background == "prompt":
                threshold = None
        else:
            if threshold is not None:
                raise ValueError("a background threshold applies only to datasets with a "
                                 "background class (voc21, context60, coco_object)")
            if area_threshold is not None:
                raise ValueError("an area threshold applies only to datasets with a background "
                                 "class (voc21, context60, coco_object)")
            background = None
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if area_threshold is not None and not 0.0 <= area_threshold <= 1.0:
            raise ValueError(f"area_threshold must be in [0, 1], got {area_threshold}")
        if isinstance(pamr_steps, bool) or not isinstance(pamr_steps, (int, np.integer)) \
                or pamr_steps < 0:
            raise ValueError(f"pamr_steps must be an integer >= 0 (0: no PAMR), got {pamr_steps!r}")
        self.method, kn, kw = _method_and_knobs(
            model, method, knobs, dict(gem_depth=gem_depth, ss_attn_iter=ss_attn_iter,
                                       ss_attn_temp=ss_attn_temp))
        self._knobs = _as_arrays(kn)
        self.method_name = method
        self._record = _method_record(method, kw, kn)
        self.model = model
        self.has_background = has_background
        self.background = background
        self.threshold = threshold
        self.area_threshold = area_threshold
        self.pamr_steps = int(pamr_steps)
        self.pamr_dilations = tuple(int(d) for d in pamr_dilations)
        self.class_prompts = [list(p) for p in class_prompts]
        self.templates = list(templates)
        self.queries, self.query_class = build_queries(self.class_prompts, has_background,
                                                       background)
        self.logit_scale = float(model.logit_scale if logit_scale is None else logit_scale)
        self.use_ori = bool(use_ori)
        self.batch_size = int(batch_size or (1 if jax.default_backend() == "cpu" else 8))
        self.text_emb = jnp.asarray(text_embeddings(model, self.queries, self.templates))

    # GEM's knobs, as before the method zoo (callers and results use these names)
    gem_depth = property(lambda self: self._record.get("gem_depth"))
    ss_attn_iter = property(lambda self: self._record.get("ss_attn_iter"))
    ss_attn_temp = property(lambda self: self._record.get("ss_attn_temp"))

    def grid_cosine(self, pixels) -> np.ndarray:
        """[B, Q, gh, gw] for pixels [B, H, W, 3] (the batch padded to batch_size: one compile):
        the method's patch-prompt scores (cosines; CLIP Surgery's feature-surgery similarity)."""
        b = pixels.shape[0]
        n = max(b, self.batch_size)
        if b < n:
            pixels = np.concatenate([pixels, np.zeros((n - b,) + pixels.shape[1:], pixels.dtype)])
        out = _grid_scores(self.model.params, jnp.asarray(pixels), self.text_emb, self._knobs,
                           cfg=self.model.config, method=self.method, use_ori=self.use_ori,
                           ex=self.model.execution)
        return np.asarray(out[:b], np.float32)

    def refine(self, maps, pixels) -> np.ndarray:
        """PAMR of maps [Q, h, w] at the label size with the input pixels, if enabled."""
        if not self.pamr_steps:
            return maps
        return refine(maps, pixels, self.pamr_steps, self.pamr_dilations)

    def classify(self, cos) -> np.ndarray:
        return classify(cos, self.query_class, self.logit_scale, self.threshold,
                        area_threshold=self.area_threshold)

    def predict_batch(self, images, out_hws) -> list[np.ndarray]:
        return [self.classify(c) for c in self.scores_batch(images, out_hws)]

    def knobs(self) -> dict:
        out = {"protocol": self.name}
        if self.method_name == "gem":  # the keys results had before other methods existed
            t = self.ss_attn_temp
            out.update(gem_depth=self.gem_depth, ss_attn_iter=self.ss_attn_iter,
                       ss_attn_temp="adaptive" if t is None else t,
                       tokens="original" if self.use_ori else "gem")
            if self._record.get("branches") is not None:
                out["branches"] = self._record["branches"]
        else:
            out.update(method=self._record,
                       tokens="original" if self.use_ori else self.method_name)
        out.update(logit_scale=self.logit_scale, background=self.background,
                   background_threshold=self.threshold, templates=_templates_label(self.templates),
                   class_prompts=self.class_prompts)
        if self.area_threshold is not None:
            out["area_threshold"] = self.area_threshold
        if self.pamr_steps:
            out["pamr"] = {"steps": self.pamr_steps, "dilations": list(self.pamr_dilations)}
        if getattr(self, "defaults_from", None):
            out["defaults_from"] = self.defaults_from
        return out


class GEMProtocol(_Base):
    """GEM's evaluation: resize to size×size, one template (or an ensemble: `templates`),
    upsample to the label size; PAMR (pamr_steps > 0) at the label size."""
    name = "gem"

    def __init__(self, model, class_prompts, *, has_background: bool, size=448,
                 template: str = GEM_TEMPLATE, scores: str = "cosine", templates=None, **kw):
        if scores not in ("cosine", "minmax"):
            raise ValueError(f"scores must be 'cosine' or 'minmax', got {scores!r}")
        super().__init__(model, class_prompts, has_background=has_background,
                         templates=[template] if templates is None else templates, **kw)
        self.size = (size, size) if np.isscalar(size) else tuple(size)
        vision.patch_grid(model.config.vision, *self.size)
        self.scores_mode = scores
        self.images_per_step = self.batch_size

    def scores_batch(self, images, out_hws) -> list[np.ndarray]:
        """Per image, cosine maps [Q, H, W] at its label size (refined by PAMR if enabled;
        min-max normalized per map with scores='minmax', as GEM's heatmaps)."""
        cfg = self.model.config
        pixels = preprocess(list(images), size=self.size, mean=cfg.image_mean, std=cfg.image_std)
        grid = self.grid_cosine(pixels)
        out = []
        for g, px, hw in zip(grid, pixels, out_hws):
            m = self.refine(resize_maps(g, hw), px)
            if self.scores_mode == "minmax":
                lo = m.min(axis=(1, 2), keepdims=True)
                rng = m.max(axis=(1, 2), keepdims=True) - lo
                m = np.where(rng > 0, (m - lo) / np.where(rng > 0, rng, 1), 0).astype(np.float32)
            out.append(m)
        return out

    def knobs(self) -> dict:
        return dict(super().knobs(), size=list(self.size), scores=self.scores_mode,
                    resize="PIL bicubic to size x size")


class SlidingProtocol(_Base):
    """Short side `size` keeping the aspect ratio, crop×crop windows every `stride`, averaged.

    crop=0: the whole resized image is one window (NACLIP on VOC, ``slide_crop=0``).  pad=True
    zero-pads a window whose sides are not multiples of the patch size around its centre
    (ClearCLIP); pad=False runs it as it is, the patch embedding dropping the trailing pixels and
    the grid maps stretched over the window (SCLIP, NACLIP: ``forward_feature`` upsamples the
    patch grid to ``img.shape``).  PAMR (pamr_steps > 0) refines the averaged maps at the label
    size with the resized input (SCLIP/NACLIP)."""
    name = "sliding"

    def __init__(self, model, class_prompts, *, has_background: bool, size=336, crop=None,
                 stride=None, max_long_side: int | None = 2048, resample: str = "bicubic",
                 templates=IMAGENET_TEMPLATES, pad: bool = True, **kw):
        super().__init__(model, class_prompts, has_background=has_background,
                         templates=templates, **kw)
        self.size = int(size)
        self.crop = int(size if crop is None else crop)
        # crop 0 (the whole image) has no stride
        self.stride = 0 if not self.crop else int(stride or default_stride(self.crop))
        if min(self.size, self.stride if self.crop else 1) < 1 or self.crop < 0:
            raise ValueError("size, crop and stride must be positive (crop 0: the whole image)")
        if self.crop and self.stride > self.crop:
            raise ValueError(f"stride {self.stride} > crop {self.crop} would leave pixels uncovered")
        self.max_long_side = max_long_side
        if resample not in ("bicubic", "bilinear"):
            raise ValueError(f"resample must be 'bicubic' or 'bilinear', got {resample!r}")
        self.resample = resample
        self.pad = bool(pad)
        self.images_per_step = 1

    def resize(self, image: Image.Image) -> Image.Image:
        w, h = rescale_size(image.width, image.height, self.size, self.max_long_side)
        if (w, h) == image.size:
            return image
        return image.resize((w, h), Image.BICUBIC if self.resample == "bicubic" else Image.BILINEAR)

    def window_fn(self, crops) -> np.ndarray:
        """Per-window cosine maps upsampled to the window: [b, Q, h, w]."""
        grid = self.grid_cosine(np.asarray(crops, np.float32))
        return resize_maps(grid, crops.shape[1:3])

    def scores_batch(self, images, out_hws) -> list[np.ndarray]:
        cfg = self.model.config
        out = []
        for image, hw in zip(images, out_hws):
            img = self.resize(image)
            pixels = preprocess(img, size=(img.height, img.width), mean=cfg.image_mean,
                                std=cfg.image_std)[0]
            crop = self.crop or (img.height, img.width)
            stride = self.stride or crop
            avg = slide_inference(pixels, self.window_fn, crop, stride,
                                  multiple=cfg.vision.patch_size if self.pad else 1,
                                  batch_size=self.batch_size)
            out.append(self.refine(resize_maps(avg, hw), pixels))
        return out

    def knobs(self) -> dict:
        out = dict(super().knobs(), size=self.size, crop=self.crop or "whole image",
                   stride=self.stride or None, max_long_side=self.max_long_side,
                   resize=f"PIL {self.resample}, short side {self.size} keeping the aspect ratio")
        if not self.pad:  # key absent for the padded default (results before it existed)
            out["pad"] = "none (trailing pixels dropped by the patch embedding)"
        return out


def default_stride(crop: int) -> int:
    """336 → 112 (SCLIP / ProxyCLIP / NACLIP), 448 → 224 (ClearCLIP), 224 → 112, else crop // 2."""
    return {336: 112, 448: 224, 224: 112}.get(int(crop), max(1, int(crop) // 2))


PROTOCOLS = {"gem": GEMProtocol, "sliding": SlidingProtocol}


class PointProtocol:
    """GEM on point labels (OpenImages V7, `gem_jax.eval.oiv7`): every image resized to
    size×size (PIL bicubic, GEM's preprocessing), one template, one GEM heatmap per class that has
    points on the image, min-max normalized per map (upstream GEM's heatmaps; ``normalize=False``
    keeps raw cosines), a point positive when its class's map exceeds `threshold` at it.

    The maps are sampled at size×size: a normalized point (X, Y) falls on the same place of the
    resized image as of the original, so no upsampling to the original size is needed.  Prompts
    are the classes' display names (`lowercase` optional).  The default threshold 0.5 is LeGrad's
    (same authors as GEM); GEM's own value is not published with code (WalBouss/GEM#5).
    """
    name = "points"

    def __init__(self, model, *, size: int = 448, template: str | None = GEM_TEMPLATE,
                 threshold: float = 0.5, normalize: bool = True, lowercase: bool = False,
                 gem_depth=None, ss_attn_iter=None, ss_attn_temp=None, use_ori: bool = False,
                 batch_size: int | None = None, method: str = "gem", knobs: dict | None = None):
        if not 0.0 <= float(threshold) <= 1.0 and normalize:
            raise ValueError(f"threshold must be in [0, 1] for min-max normalized maps, got {threshold}")
        if template is not None and "{}" not in template:
            raise ValueError(f"template must contain '{{}}' where the class name goes, got {template!r}")
        _, kn, self._kw = _method_and_knobs(model, method, knobs, dict(
            gem_depth=gem_depth, ss_attn_iter=ss_attn_iter, ss_attn_temp=ss_attn_temp))
        self.method_name = method
        self._record = _method_record(method, self._kw, kn)
        self.model = model
        self.size = int(size)
        vision.patch_grid(model.config.vision, self.size, self.size)
        self.template = template
        self.threshold = float(threshold)
        self.normalize = bool(normalize)
        self.lowercase = bool(lowercase)
        self.use_ori = bool(use_ori)
        self.images_per_step = int(batch_size or (1 if jax.default_backend() == "cpu" else 8))

    gem_depth = property(lambda self: self._record.get("gem_depth"))
    ss_attn_iter = property(lambda self: self._record.get("ss_attn_iter"))
    ss_attn_temp = property(lambda self: self._record.get("ss_attn_temp"))

    def prompt(self, display_name: str) -> str:
        return display_name.lower() if self.lowercase else display_name

    def maps_batch(self, images, prompt_lists) -> list[np.ndarray]:
        """Per image, its classes' heatmaps [P_i, size, size] (float32)."""
        if len(images) != len(prompt_lists):
            raise ValueError("one prompt list per image")
        pixels = self.model.preprocess(list(images), size=self.size)
        maps = self.model.heatmaps(pixels, [[self.prompt(p) for p in ps] for ps in prompt_lists],
                                   method=self.method_name, normalize=self.normalize,
                                   return_ori=self.use_ori, template=self.template, **self._kw)
        return [np.asarray(m, np.float32) for m in maps]

    def knobs(self) -> dict:
        out = {"protocol": self.name, "size": self.size, "template": self.template,
               "threshold": self.threshold, "scores": "minmax" if self.normalize else "cosine",
               "lowercase": self.lowercase}
        if self.method_name == "gem":  # the keys results had before other methods existed
            t = self.ss_attn_temp
            out.update(gem_depth=self.gem_depth, ss_attn_iter=self.ss_attn_iter,
                       ss_attn_temp="adaptive" if t is None else t,
                       tokens="original" if self.use_ori else "gem")
        else:
            out.update(method=self._record,
                       tokens="original" if self.use_ori else self.method_name)
        out["resize"] = "PIL bicubic to size x size; points sampled at size x size"
        return out


# ----------------------------------------------------------------------------- per-method defaults
# MaskCLIP's and CLIP Surgery's prompt ensemble: the 80 ImageNet templates and 5 scene templates
# (chongzhou96/MaskCLIP@245d31f8 tools/maskclip_utils/prompt_engineering.py L33-35;
# xmed-lab/CLIP_Surgery@d4696d47 clip/clip.py L255, the same 85).
MASKCLIP_TEMPLATES = IMAGENET_TEMPLATES + (
    "there is a {} in the scene.", "there is the {} in the scene.", "this is a {} in the scene.",
    "this is the {} in the scene.", "this is one {} in the scene.")

TEMPLATE_SETS = {"gem": (GEM_TEMPLATE,), "imagenet": IMAGENET_TEMPLATES,
                 "maskclip": MASKCLIP_TEMPLATES}


def clearclip_names(dataset: str) -> list[list[str]]:
    """ClearCLIP's ``configs/cls_*.txt`` (mc-lan/ClearCLIP@ad68a404): SCLIP's files, except VOC21,
    VOC20 and COCO-Object, whose one name per class is mmseg's with "background" prompted as
    such, and on VOC "boat" → "ship", "diningtable" → "table"."""
    from .classnames import names_for
    if dataset == "coco_object":
        return names_for(dataset, "mmseg")
    if dataset in ("voc21", "voc20"):
        ren = {"boat": "ship", "diningtable": "table"}
        return [[ren.get(n, n) for n in p] for p in names_for(dataset, "mmseg")]
    return names_for(dataset, "sclip")


def _names(dataset: str, names: str):
    from .classnames import names_for
    return clearclip_names(dataset) if names == "clearclip" else names_for(dataset, names)


WITH_BACKGROUND = ("voc21", "context60", "coco_object")


@dataclass(frozen=True)
class MethodProtocol:
    """A method's evaluation protocol, from its upstream code and configs (see docs/methods.md).

    kind: "gem" (the image resized to size×size, `GEMProtocol`) or "sliding" (short side `size`,
    long side ≤ max_long_side, windows crop×crop every `stride`, crop 0 = the whole image;
    `SlidingProtocol`).  templates: a key of TEMPLATE_SETS; names: "mmseg", "sclip" or
    "clearclip"; logit_scale None = the model's learned scale; threshold: the background
    probability threshold on datasets with a background (0 or None: the background is only
    prompted); pamr_steps: PAMR iterations (0 = off); per_dataset: overrides by dataset name.
    """
    kind: str
    size: int
    crop: int | None = None
    stride: int | None = None
    max_long_side: int | None = 2048
    resample: str = "bilinear"
    pad: bool = False
    templates: str = "imagenet"
    names: str = "sclip"
    logit_scale: float | None = None
    background: str = "both"
    threshold: float | None = None
    area_threshold: float | None = None
    pamr_steps: int = 0
    method_options: tuple = ()
    per_dataset: tuple = ()          # ((dataset, ((field, value), ...)), ...)
    source: str = ""

    def for_dataset(self, dataset: str) -> "MethodProtocol":
        over = dict(dict(self.per_dataset).get(dataset, ()))
        return dataclasses.replace(self, **over) if over else self


def _per(**by_dataset) -> tuple:
    return tuple((d, tuple(v.items())) for d, v in by_dataset.items())


# mmseg's Resize (SCLIP, ClearCLIP, NACLIP, MaskCLIP configs) uses cv2 bilinear; PIL's bilinear is
# the nearest we have (it antialiases when shrinking, cv2 does not).
METHOD_PROTOCOLS = {
    "gem": MethodProtocol(
        kind="gem", size=448, resample="bicubic", templates="gem", names="mmseg",
        background="threshold", threshold=0.85,
        source="upstream GEM's code (walbouss/GEM) and README; threshold 0.85 from its README "
               "(see docs/reproduce.md: GEM's evaluation code is unpublished)"),
    # the default `maskclip` is ClearCLIP's re-implementation, so ClearCLIP's protocol
    "maskclip": MethodProtocol(
        kind="sliding", size=448, crop=448, stride=224, pad=True, names="clearclip",
        logit_scale=50.0,
        per_dataset=_per(voc21=dict(threshold=0.5), context60=dict(threshold=0.15),
                         coco_object=dict(threshold=0.4), cityscapes=dict(crop=224, stride=224)),
        source="mc-lan/ClearCLIP@ad68a404 clearclip_segmentor.py + configs/cfg_*.py "
               "(model_type='MaskCLIP')"),
    "maskclip_official": MethodProtocol(
        kind="sliding", size=512, crop=0, templates="maskclip", names="mmseg", logit_scale=1.0,
        background="prompt", method_options=(("residual", True),),
        per_dataset=_per(context59=dict(size=520, max_long_side=520),
                         context60=dict(size=520, max_long_side=520),
                         cityscapes=dict(size=512, max_long_side=1024)),
        source="chongzhou96/MaskCLIP@245d31f8 configs/maskclip/maskclip_vit16_*.py (mmseg "
               "'whole' inference, argmax; its benchmarks have no background)"),
    "surgery": MethodProtocol(
        kind="gem", size=512, resample="bicubic", templates="maskclip", names="sclip",
        background="prompt",
        source="xmed-lab/CLIP_Surgery@d4696d47 demo.py (no evaluation code is released: the "
               "512x512 bicubic resize and 85 templates are its demo's; names and background "
               "handling are ours)"),
    "sclip": MethodProtocol(
        kind="sliding", size=336, crop=224, stride=112, names="sclip", logit_scale=40.0,
        per_dataset=_per(voc21=dict(logit_scale=65.0, threshold=0.1, area_threshold=0.1),
                         context60=dict(logit_scale=50.0, threshold=0.1),
                         coco_object=dict(logit_scale=50.0, threshold=0.1),
                         coco_stuff=dict(size=448), cityscapes=dict(size=560)),
        source="wangf3014/SCLIP@b56bd301 clip_segmentor.py + configs/cfg_*.py"),
    "clearclip": MethodProtocol(
        kind="sliding", size=448, crop=448, stride=224, pad=True, names="clearclip",
        logit_scale=50.0,
        per_dataset=_per(voc21=dict(threshold=0.5), context60=dict(threshold=0.15),
                         coco_object=dict(threshold=0.4), cityscapes=dict(crop=224, stride=224)),
        source="mc-lan/ClearCLIP@ad68a404 clearclip_segmentor.py + configs/cfg_*.py"),
    "naclip": MethodProtocol(
        kind="sliding", size=336, crop=224, stride=112, names="sclip", logit_scale=40.0,
        pamr_steps=10,
        per_dataset=_per(voc21=dict(crop=0, threshold=0.1), voc20=dict(crop=0),
                         context60=dict(threshold=0.1), coco_object=dict(threshold=0.1),
                         cityscapes=dict(size=560)),
        source="sinahmr/NACLIP@0cac3a65 naclip.py + configs/cfg_*.py"),
}


def protocol_key(method: str, options: dict | None = None) -> str:
    """The METHOD_PROTOCOLS entry of a method and its options: MaskCLIP with residual=True (the
    official code) has the official protocol."""
    if method == "maskclip" and (options or {}).get("residual"):
        return "maskclip_official"
    if method not in METHOD_PROTOCOLS:
        raise ValueError(f"unknown method {method!r}; choose one of: "
                         f"{', '.join(k for k in METHOD_PROTOCOLS if k != 'maskclip_official')}")
    return method


def protocol_defaults(method: str, dataset: str, options: dict | None = None) -> dict:
    """The keyword arguments of `GEMProtocol` / `SlidingProtocol` for a method on a dataset, from
    its upstream configs, plus "kind" (which protocol) and "class_prompts"."""
    from .datasets import get_dataset
    spec = get_dataset(dataset)
    mp = METHOD_PROTOCOLS[protocol_key(method, options)].for_dataset(spec.name)
    kw = dict(kind=mp.kind, class_prompts=_names(spec.name, mp.names),
              has_background=spec.has_background, logit_scale=mp.logit_scale,
              pamr_steps=mp.pamr_steps)
    if spec.has_background:
        bg = "prompt" if not mp.threshold else mp.background
        kw.update(background=bg, threshold=mp.threshold if bg != "prompt" else None,
                  area_threshold=mp.area_threshold)
    templates = TEMPLATE_SETS[mp.templates]
    if mp.kind == "gem":
        kw.update(size=mp.size, templates=templates)
    else:
        kw.update(size=mp.size, crop=mp.crop, stride=mp.stride, max_long_side=mp.max_long_side,
                  resample=mp.resample, pad=mp.pad, templates=templates)
    return kw


def method_protocol(model, method: str, dataset: str, *, knobs: dict | None = None,
                    **overrides):
    """The evaluation protocol of `method` on `dataset` with its upstream defaults (see
    METHOD_PROTOCOLS), e.g. ``method_protocol(model, "naclip", "voc21")`` is NACLIP's: short side
    336, the whole image as one window, 80 templates, SCLIP's names, logit scale 40, background
    threshold 0.1, PAMR with 10 steps.  knobs: the method's knobs and static options (e.g.
    ``{"gaussian_std": 3.0}``, ``{"residual": True}``); overrides: any protocol keyword."""
    knobs = dict(knobs or {})
    key = protocol_key(method, knobs)
    kw = protocol_defaults(method, dataset, knobs)
    kw.update(overrides)
    kind = kw.pop("kind")
    prompts = kw.pop("class_prompts")
    cls = GEMProtocol if kind == "gem" else SlidingProtocol
    proto = cls(model, prompts, method=method, knobs=knobs, **kw)
    proto.defaults_from = METHOD_PROTOCOLS[key].source
    return proto
