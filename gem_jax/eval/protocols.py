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

from functools import lru_cache, partial
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from .. import gem, vision
from ..model import check_knobs, encode_text, image_tokens
from ..preprocess import preprocess
from ..resample import interp_matrix
from .classnames import GEM_TEMPLATE, IMAGENET_TEMPLATES

__all__ = ["GEMProtocol", "SlidingProtocol", "PointProtocol", "PROTOCOLS", "BACKGROUND_MODES",
           "classify",
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
             background_index: int = 0, rows: int = 64) -> np.ndarray:
    """Class ids [H, W] (int32) from prompt cosine maps cos [Q, H, W] (see the module docstring)."""
    cos = np.asarray(cos, np.float32)
    query_class = np.asarray(query_class)
    q, height, width = cos.shape
    if query_class.shape != (q,):
        raise ValueError(f"query_class has shape {query_class.shape}, expected ({q},)")
    cands = np.unique(query_class)
    simple = len(cands) == q and (np.diff(query_class) > 0).all()
    slot = np.searchsorted(cands, query_class)
    out = np.empty((height, width), np.int32)
    scale = np.float32(logit_scale)
    for r0 in range(0, height, rows):
        z = cos[:, r0:r0 + rows] * scale
        z -= z.max(0, keepdims=True)
        np.exp(z, out=z)
        z /= z.sum(0, keepdims=True)
        if simple:
            cp = z
        else:
            cp = np.zeros((len(cands),) + z.shape[1:], np.float32)
            for i in range(q):
                np.maximum(cp[slot[i]], z[i], out=cp[slot[i]])
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


@partial(jax.jit, static_argnames=("cfg", "use_ori", "ex"))
def _grid_cosine(params, pixels, text_emb, gem_depth, ss_attn_iter, ss_attn_temp, *, cfg,
                 use_ori, ex):
    """Patch-prompt cosine similarities on the patch grid: [B, Q, gh, gw]."""
    g, o = image_tokens(params, pixels, gem_depth, ss_attn_iter, ss_attn_temp, cfg=cfg,
                        with_ori=use_ori, ex=ex)
    grid = vision.patch_grid(cfg.vision, pixels.shape[1], pixels.shape[2])
    return gem.patch_similarity(o if use_ori else g, text_emb, grid)


# ----------------------------------------------------------------------------- protocols
class _Base:
    name = ""

    def __init__(self, model, class_prompts, *, has_background: bool, templates,
                 gem_depth=7, ss_attn_iter=1, ss_attn_temp=None, use_ori=False,
                 background: str | None = None, threshold: float | None = None,
                 logit_scale: float | None = None, batch_size: int | None = None):
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
            background = None
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        check_knobs(model.config.vision, gem_depth, ss_attn_iter, ss_attn_temp)
        self.model = model
        self.has_background = has_background
        self.background = background
        self.threshold = threshold
        self.class_prompts = [list(p) for p in class_prompts]
        self.templates = list(templates)
        self.queries, self.query_class = build_queries(self.class_prompts, has_background,
                                                       background)
        self.logit_scale = float(model.logit_scale if logit_scale is None else logit_scale)
        self.gem_depth, self.ss_attn_iter, self.ss_attn_temp = gem_depth, ss_attn_iter, ss_attn_temp
        self.use_ori = bool(use_ori)
        self.batch_size = int(batch_size or (1 if jax.default_backend() == "cpu" else 8))
        self.text_emb = jnp.asarray(text_embeddings(model, self.queries, self.templates))
        self._knobs = (jnp.asarray(gem_depth, jnp.int32), jnp.asarray(ss_attn_iter, jnp.int32),
                       None if ss_attn_temp is None else jnp.asarray(ss_attn_temp, jnp.float32))

    def grid_cosine(self, pixels) -> np.ndarray:
        """[B, Q, gh, gw] for pixels [B, H, W, 3] (the batch padded to batch_size: one compile)."""
        b = pixels.shape[0]
        n = max(b, self.batch_size)
        if b < n:
            pixels = np.concatenate([pixels, np.zeros((n - b,) + pixels.shape[1:], pixels.dtype)])
        out = _grid_cosine(self.model.params, jnp.asarray(pixels), self.text_emb, *self._knobs,
                           cfg=self.model.config, use_ori=self.use_ori,
                           ex=self.model.execution)
        return np.asarray(out[:b], np.float32)

    def classify(self, cos) -> np.ndarray:
        return classify(cos, self.query_class, self.logit_scale, self.threshold)

    def predict_batch(self, images, out_hws) -> list[np.ndarray]:
        return [self.classify(c) for c in self.scores_batch(images, out_hws)]

    def knobs(self) -> dict:
        return {
            "protocol": self.name,
            "gem_depth": self.gem_depth, "ss_attn_iter": self.ss_attn_iter,
            "ss_attn_temp": "adaptive" if self.ss_attn_temp is None else float(self.ss_attn_temp),
            "tokens": "original" if self.use_ori else "gem",
            "logit_scale": self.logit_scale,
            "background": self.background, "background_threshold": self.threshold,
            "templates": self.templates if len(self.templates) <= 3 else
            f"{len(self.templates)} templates (ImageNet)" if tuple(self.templates) == IMAGENET_TEMPLATES
            else self.templates,
            "class_prompts": self.class_prompts,
        }


class GEMProtocol(_Base):
    """GEM's evaluation: resize to size×size, one template, upsample to the label size."""
    name = "gem"

    def __init__(self, model, class_prompts, *, has_background: bool, size=448,
                 template: str = GEM_TEMPLATE, scores: str = "cosine", **kw):
        if scores not in ("cosine", "minmax"):
            raise ValueError(f"scores must be 'cosine' or 'minmax', got {scores!r}")
        super().__init__(model, class_prompts, has_background=has_background,
                         templates=[template], **kw)
        self.size = (size, size) if np.isscalar(size) else tuple(size)
        vision.patch_grid(model.config.vision, *self.size)
        self.scores_mode = scores
        self.images_per_step = self.batch_size

    def scores_batch(self, images, out_hws) -> list[np.ndarray]:
        """Per image, cosine maps [Q, H, W] at its label size (min-max normalized per map with
        scores='minmax', as GEM's heatmaps)."""
        cfg = self.model.config
        pixels = preprocess(list(images), size=self.size, mean=cfg.image_mean, std=cfg.image_std)
        grid = self.grid_cosine(pixels)
        out = []
        for g, hw in zip(grid, out_hws):
            m = resize_maps(g, hw)
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
    """Short side `size` keeping the aspect ratio, crop×crop windows every `stride`, averaged."""
    name = "sliding"

    def __init__(self, model, class_prompts, *, has_background: bool, size=336, crop=None,
                 stride=None, max_long_side: int | None = 2048, resample: str = "bicubic",
                 templates=IMAGENET_TEMPLATES, **kw):
        super().__init__(model, class_prompts, has_background=has_background,
                         templates=templates, **kw)
        self.size = int(size)
        self.crop = int(crop or size)
        self.stride = int(stride or default_stride(self.crop))
        if min(self.size, self.crop, self.stride) < 1:
            raise ValueError("size, crop and stride must be positive")
        if self.stride > self.crop:
            raise ValueError(f"stride {self.stride} > crop {self.crop} would leave pixels uncovered")
        self.max_long_side = max_long_side
        if resample not in ("bicubic", "bilinear"):
            raise ValueError(f"resample must be 'bicubic' or 'bilinear', got {resample!r}")
        self.resample = resample
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
            avg = slide_inference(pixels, self.window_fn, self.crop, self.stride,
                                  multiple=cfg.vision.patch_size, batch_size=self.batch_size)
            out.append(resize_maps(avg, hw))
        return out

    def knobs(self) -> dict:
        return dict(super().knobs(), size=self.size, crop=self.crop, stride=self.stride,
                    max_long_side=self.max_long_side,
                    resize=f"PIL {self.resample}, short side {self.size} keeping the aspect ratio")


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
                 gem_depth=7, ss_attn_iter=1, ss_attn_temp=None, use_ori: bool = False,
                 batch_size: int | None = None):
        if not 0.0 <= float(threshold) <= 1.0 and normalize:
            raise ValueError(f"threshold must be in [0, 1] for min-max normalized maps, got {threshold}")
        if template is not None and "{}" not in template:
            raise ValueError(f"template must contain '{{}}' where the class name goes, got {template!r}")
        check_knobs(model.config.vision, gem_depth, ss_attn_iter, ss_attn_temp)
        self.model = model
        self.size = int(size)
        vision.patch_grid(model.config.vision, self.size, self.size)
        self.template = template
        self.threshold = float(threshold)
        self.normalize = bool(normalize)
        self.lowercase = bool(lowercase)
        self.gem_depth, self.ss_attn_iter, self.ss_attn_temp = gem_depth, ss_attn_iter, ss_attn_temp
        self.use_ori = bool(use_ori)
        self.images_per_step = int(batch_size or (1 if jax.default_backend() == "cpu" else 8))

    def prompt(self, display_name: str) -> str:
        return display_name.lower() if self.lowercase else display_name

    def maps_batch(self, images, prompt_lists) -> list[np.ndarray]:
        """Per image, its classes' heatmaps [P_i, size, size] (float32)."""
        if len(images) != len(prompt_lists):
            raise ValueError("one prompt list per image")
        pixels = self.model.preprocess(list(images), size=self.size)
        maps = self.model.heatmaps(pixels, [[self.prompt(p) for p in ps] for ps in prompt_lists],
                                   gem_depth=self.gem_depth, ss_attn_iter=self.ss_attn_iter,
                                   ss_attn_temp=self.ss_attn_temp, normalize=self.normalize,
                                   return_ori=self.use_ori, template=self.template)
        return [np.asarray(m, np.float32) for m in maps]

    def knobs(self) -> dict:
        return {
            "protocol": self.name, "size": self.size, "template": self.template,
            "threshold": self.threshold, "scores": "minmax" if self.normalize else "cosine",
            "lowercase": self.lowercase, "gem_depth": self.gem_depth,
            "ss_attn_iter": self.ss_attn_iter,
            "ss_attn_temp": "adaptive" if self.ss_attn_temp is None else float(self.ss_attn_temp),
            "tokens": "original" if self.use_ori else "gem",
            "resize": "PIL bicubic to size x size; points sampled at size x size",
        }
