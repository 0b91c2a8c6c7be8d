"""`gem_jax.load(src)` and the `GEMModel` user-facing object.

The model object only holds data (config, params pytree, tokenizer) and calls the pure jitted
functions below; everything it does can be done with those functions directly.
"""

from __future__ import annotations

import os
from collections import OrderedDict
import functools
from functools import partial
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import gem, layers, text, vision
from . import maps as _maps
from . import methods as methods_lib
from .config import CLIPConfig, VisionConfig
from .layers import Execution
from .convert import CheckpointError, load_checkpoint
from .preprocess import preprocess as _preprocess
from .tokenizer import CLIPTokenizer

DEFAULT_TEMPLATE = "a photo of a {}."


# ----------------------------------------------------------------------------- pure jitted functions
def _jit(static_argnames=()):
    """jax.jit whose cache is also keyed by the installed `layers.intercept_linear` functions
    (interception happens at trace time: a trace made without them must not be reused)."""
    def wrap(fn):
        def keyed(*args, _linear=(), **kwargs):
            return fn(*args, **kwargs)
        jitted = jax.jit(keyed, static_argnames=tuple(static_argnames) + ("_linear",))

        @functools.wraps(fn)
        def call(*args, **kwargs):
            return jitted(*args, _linear=layers.interceptors(), **kwargs)
        call._cache_size = jitted._cache_size
        call.lower = lambda *a, **k: jitted.lower(*a, _linear=layers.interceptors(), **k)
        return call
    return wrap


@_jit(static_argnames=("cfg", "ex"))
def encode_image(params, pixels, *, cfg: CLIPConfig, ex: Execution = Execution()):
    """Pooled, projected image embeddings [B, E] (CLIP's image features, not normalized)."""
    return vision.encode(params["vision"], cfg.vision, pixels, ex=ex)["pooled"]


@_jit(static_argnames=("cfg",))
def encode_text(params, ids, *, cfg: CLIPConfig):
    """Projected text embeddings [T, E] from token ids [T, C] (not normalized)."""
    return text.encode(params["text"], cfg.text, ids)


TEXT_CHUNK = 8


def bucket(n: int, minimum: int = 8) -> int:
    """Padded size for n prompts/texts: the next power of two, at least `minimum`, so that prompt
    counts 1..8 share one compilation (9..16 the next, ...)."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def _microbatched(fn, per_image, pixels, microbatch: int):
    """fn(per_image, pixels) in chunks of `microbatch` images with lax.map (bounded working set:
    one ViT-B/16 @448 score tensor is 30 MB per image); 0 = the whole batch at once.
    per_image: a pytree of arrays with the batch as leading axis, chunked with the pixels."""
    b = pixels.shape[0]
    if not microbatch or microbatch >= b:
        return fn(per_image, pixels)
    pad = (-b) % microbatch
    chunk = lambda a: jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1)).reshape(
        (-1, microbatch) + a.shape[1:])
    out = jax.lax.map(lambda a: fn(*a), jax.tree.map(chunk, (per_image, pixels)))
    return jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:])[:b], out)


def _resolve(ex: Execution, cfg: CLIPConfig, pixels) -> Execution:
    gh, gw = vision.patch_grid(cfg.vision, pixels.shape[1], pixels.shape[2])
    per_device = -(-pixels.shape[0] // (jax.local_device_count() if ex.data_parallel else 1))
    return ex.resolve(per_device, 1 + gh * gw, cfg.vision.heads)


def _run_batch(fn, shared, per_image, pixels, ex: Execution):
    """fn(shared, per_image, pixels) over the batch: in microbatches, and data-parallel over the
    devices this process addresses (batch and per-image values sharded, `shared` replicated).
    Only local devices: the pixels are this process's own, so with several processes each one
    computes its share without cross-host traffic."""
    devices = jax.local_devices()
    n = len(devices)
    local = lambda sh, per, px: _microbatched(lambda pr, p: fn(sh, pr, p), per, px, ex.microbatch)
    if n == 1 or not ex.data_parallel:
        return local(shared, per_image, pixels)
    from jax.sharding import Mesh, PartitionSpec as P
    b = pixels.shape[0]
    pad = lambda a: jnp.pad(a, ((0, (-b) % n),) + ((0, 0),) * (a.ndim - 1))
    per_image, px = jax.tree.map(pad, (per_image, pixels))
    mesh = Mesh(np.array(devices), ("data",))
    out = jax.shard_map(local, mesh=mesh, in_specs=(P(), P("data"), P("data")),
                        out_specs=P("data"))(shared, per_image, px)
    return jax.tree.map(lambda a: a[:b], out)


def _split_knobs(method, knobs: dict, batch: int):
    """(shared, per_image): knobs the method allows per image that hold one value per image
    (ndim ≥ 1) travel with their images through microbatching and sharding."""
    shared, per = {}, {}
    for k, v in knobs.items():
        if v is not None and k in method.per_image and jnp.ndim(v) >= 1:
            if jnp.shape(v) != (batch,):
                raise ValueError(f"{k} has shape {tuple(jnp.shape(v))}: give a scalar or one value "
                                 f"per image ({batch} images)")
            per[k] = v
        else:
            shared[k] = v
    return shared, per


def _dense_impl(params, pixels, knobs, text_emb, *, cfg, method, with_ori, use_ori, maps,
                normalize, ex):
    """The one image path: tower + method → (dense, original) tokens, or → maps."""
    ex = _resolve(ex, cfg, pixels)
    grid = vision.patch_grid(cfg.vision, pixels.shape[1], pixels.shape[2])
    shared, per = _split_knobs(method, knobs, pixels.shape[0])
    if text_emb is not None and text_emb.ndim == 3:  # one prompt set per image
        per = dict(per, _text=text_emb)
    else:
        shared = dict(shared, _text=text_emb)

    def fn(sh, pr, px):
        kn = {**sh, **pr}
        emb = kn.pop("_text")
        out = vision.encode(params["vision"], cfg.vision, px, method=method, knobs=kn,
                            with_ori=with_ori or use_ori, ex=ex)
        if not maps:
            return out["dense"], out.get("tokens")
        tok = out["tokens"] if use_ori else out["dense"]
        sim = _maps.patch_similarity if use_ori else getattr(method, "similarity",
                                                               _maps.patch_similarity)
        return _maps.heatmaps(tok, emb, grid, tuple(pixels.shape[1:3]), normalize, sim)
    return _run_batch(fn, shared, per, pixels, ex)


@_jit(static_argnames=("cfg", "method", "with_ori", "ex"))
def dense_tokens(params, pixels, knobs, *, cfg: CLIPConfig, method, with_ori: bool = False,
                 ex: Execution = Execution()):
    """(method tokens, original tokens or None), each [B, 1+N, E], for any dense method:
    `method` a static method object (`gem_jax.methods.get(name)`), `knobs` its traced knobs."""
    return _dense_impl(params, pixels, knobs, None, cfg=cfg, method=method, with_ori=with_ori,
                       use_ori=False, maps=False, normalize=False, ex=ex)


@_jit(static_argnames=("cfg", "method", "use_ori", "normalize", "ex"))
def dense_heatmaps(params, pixels, text_emb, knobs, *, cfg: CLIPConfig, method,
                   use_ori: bool = False, normalize: bool = True, ex: Execution = Execution()):
    """Heatmaps [B, P, H, W] (float32) of any dense method; text_emb [P, E] or [B, P, E]."""
    return _dense_impl(params, pixels, knobs, text_emb, cfg=cfg, method=method, with_ori=False,
                       use_ori=use_ori, maps=True, normalize=normalize, ex=ex)


def _gem_knobs(gem_depth, ss_attn_iter, ss_attn_temp):
    return dict(gem_depth=gem_depth, ss_attn_iter=ss_attn_iter, ss_attn_temp=ss_attn_temp)


@_jit(static_argnames=("cfg", "branches", "with_ori", "max_iter", "ex"))
def image_tokens(params, pixels, gem_depth=7, ss_attn_iter=1, ss_attn_temp=None, *,
                 cfg: CLIPConfig, branches=gem.BRANCHES, with_ori: bool = True,
                 max_iter: int = gem.MAX_ITER, ex: Execution = Execution()):
    """(gem, original) projected token features, each [B, 1+N, E] (original None without with_ori).

    gem_depth, ss_attn_iter and ss_attn_temp are traced: changing their values does not recompile
    (ss_attn_temp None selects the adaptive temperature, a separate compilation; a traced
    ss_attn_iter above the static `max_iter` gives NaN, as do depths outside [2, L+1])."""
    return _dense_impl(params, pixels, _gem_knobs(gem_depth, ss_attn_iter, ss_attn_temp), None,
                       cfg=cfg, method=gem.GEM(branches, max_iter), with_ori=with_ori,
                       use_ori=False, maps=False, normalize=False, ex=ex)


@_jit(static_argnames=("cfg", "branches", "use_ori", "normalize", "max_iter", "ex"))
def heatmaps_fn(params, pixels, text_emb, gem_depth=7, ss_attn_iter=1, ss_attn_temp=None, *,
                cfg: CLIPConfig, branches=gem.BRANCHES, use_ori: bool = False,
                normalize: bool = True, max_iter: int = gem.MAX_ITER, ex: Execution = Execution()):
    """GEM heatmaps [B, P, H, W] (float32) for pixels [B, H, W, 3] and text embeddings [P, E]
    (or [B, P, E], one prompt set per image).  Differentiable w.r.t. params, pixels, text_emb
    and ss_attn_temp; the knobs are traced (see `image_tokens`)."""
    return _dense_impl(params, pixels, _gem_knobs(gem_depth, ss_attn_iter, ss_attn_temp),
                       text_emb, cfg=cfg, method=gem.GEM(branches, max_iter), with_ori=False,
                       use_ori=use_ori, maps=True, normalize=normalize, ex=ex)


# ----------------------------------------------------------------------------- input checks
def check_pixels(pixels, cfg: VisionConfig):
    if isinstance(pixels, (list, tuple)) or not hasattr(pixels, "shape"):
        raise TypeError(f"pixels must be an array [B, H, W, 3]; got {type(pixels).__name__}. "
                        f"Use model.preprocess(images) to turn PIL images into pixels.")
    if pixels.ndim != 4 or pixels.shape[-1] != 3:
        hint = " (channels-first? gem_jax uses NHWC)" if pixels.ndim == 4 and pixels.shape[1] == 3 else ""
        raise ValueError(f"pixels must have shape [B, H, W, 3], got {tuple(pixels.shape)}{hint}")
    if pixels.shape[0] == 0:
        raise ValueError("pixels is an empty batch (B = 0)")
    if not jnp.issubdtype(pixels.dtype, jnp.floating):
        raise TypeError(f"pixels must be floating point (normalized), got dtype {pixels.dtype}; "
                        f"use model.preprocess(images)")
    vision.patch_grid(cfg, pixels.shape[1], pixels.shape[2])
    if isinstance(pixels, np.ndarray) and not np.isfinite(pixels).all():
        raise ValueError("pixels contain NaN or infinite values")
    return pixels


def check_prompts(prompts, what="prompts") -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, Sequence):
        raise TypeError(f"{what} must be a list of strings, got {type(prompts).__name__}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError(f"empty {what} list: give at least one text prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"{what}[{i}] must be a string, got {type(p).__name__}")
        if not p.strip():
            raise ValueError(f"{what}[{i}] is empty or whitespace only")
    return prompts


MAX_SS_ATTN_TEMP = gem.MAX_SS_ATTN_TEMP


def check_knobs(cfg: VisionConfig, gem_depth, ss_attn_iter, ss_attn_temp):
    """GEM's concrete knob checks (kept for callers of the GEM-named API)."""
    gem.GEM().check(cfg.layers, dict(gem_depth=gem_depth, ss_attn_iter=ss_attn_iter,
                                     ss_attn_temp=ss_attn_temp))


def _as_arrays(knobs: dict) -> dict:
    """Python knob values → arrays (ints int32, floats float32), so new values reuse the
    compiled function; None stays None (it selects a code path, e.g. adaptive τ)."""
    def conv(v):
        if v is None or isinstance(v, jax.Array):
            return v
        a = np.asarray(v)
        return jnp.asarray(a, jnp.int32 if np.issubdtype(a.dtype, np.integer) else jnp.float32)
    return {k: conv(v) for k, v in knobs.items()}


def _is_tracer(tree) -> bool:
    return any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------- model object
class GEMModel:
    """A loaded CLIP model with GEM methods.  Holds `config`, `params` (nested dict of arrays)
    and `tokenizer`; see the module-level pure functions for the jittable pieces.

    Every method works inside jax.jit, vmap and grad (pixels, knobs and even `params` may be
    traced).  Text embeddings are cached only when computed from concrete params, keyed by the
    texts and by the identity of the text-tower arrays, so a params swap never returns stale
    embeddings and no tracer is ever stored."""

    _TEXT_CACHE_SIZE = 64

    def __init__(self, config: CLIPConfig, params, tokenizer: CLIPTokenizer, source: str = "",
                 execution: Execution | None = None):
        self.config = config
        self.params = jax.tree.map(jnp.asarray, params)
        dtype = str(jnp.dtype(self.params["vision"]["proj"].dtype))
        # How to run (attention implementation, microbatching, compute dtype); see Execution.
        self.execution = execution or Execution.auto(dtype=dtype)
        self.tokenizer = tokenizer
        self.source = source
        self._text_cache: OrderedDict = OrderedDict()

    def __repr__(self):
        v = self.config.vision
        return (f"GEMModel({self.config.name or self.source!r}, ViT {v.layers}x{v.width} "
                f"patch {v.patch_size}, embed {self.config.embed_dim})")

    @property
    def logit_scale(self) -> float:
        return float(jnp.exp(self.params["logit_scale"]))

    # -- inputs
    def preprocess(self, images, size=448):
        """PIL image(s) of any mode → float32 pixels [B, H, W, 3] (GEM's resize + normalization)."""
        return _preprocess(images, size=size, mean=self.config.image_mean, std=self.config.image_std)

    def tokenize(self, texts) -> np.ndarray:
        return self.tokenizer(texts, context_length=self.config.text.context_length)

    # -- CLIP
    def encode_image(self, pixels):
        """Pooled, projected image embeddings [B, E]."""
        return encode_image(self.params, check_pixels(pixels, self.config.vision), cfg=self.config,
                            ex=self.execution)

    def encode_text(self, texts):
        """Projected text embeddings [T, E] of texts used verbatim (no template), not normalized.

        Distinct texts are encoded in fixed chunks of TEXT_CHUNK (8) rows, or 256 beyond 64
        texts, so every prompt count up to 64 runs one compiled text function."""
        texts = check_prompts(texts, "texts")
        tp = self.params["text"]
        leaves = jax.tree.leaves(tp)
        key = tuple(texts)
        hit = self._text_cache.get(key)
        if hit is not None and len(hit[0]) == len(leaves) and all(
                a is b for a, b in zip(hit[0], leaves)):
            self._text_cache.move_to_end(key)
            return hit[1]
        unique = list(dict.fromkeys(texts))
        ids = self.tokenize(unique)
        n = len(unique)
        chunk = TEXT_CHUNK if n <= 8 * TEXT_CHUNK else 32 * TEXT_CHUNK
        ids = np.concatenate([ids, np.repeat(ids[:1], (-n) % chunk, axis=0)])
        emb = jnp.concatenate([encode_text(self.params, jnp.asarray(ids[i:i + chunk]),
                                           cfg=self.config) for i in range(0, len(ids), chunk)])
        if n < len(texts):
            pos = {t: i for i, t in enumerate(unique)}
            emb = emb[np.asarray([pos[t] for t in texts])]
        else:
            emb = emb[:n]
        if not _is_tracer(leaves) and not isinstance(emb, jax.core.Tracer):
            # The cache holds the arrays it was computed from: identity cannot be reused.
            self._text_cache[key] = (leaves, emb)
            if len(self._text_cache) > self._TEXT_CACHE_SIZE:
                self._text_cache.popitem(last=False)
        return emb

    # -- dense methods (GEM and the others in gem_jax.methods)
    def _method(self, method: str, knobs: dict):
        """(method object, knob arrays) for a method name and the caller's keyword arguments;
        concrete knob values are checked here with a clear error."""
        m, kn = methods_lib.build(method, **knobs)
        m.check(self.config.vision.layers, kn)
        return m.for_knobs(kn), _as_arrays(kn)

    def image_tokens(self, pixels, *, method: str = "gem", with_ori: bool = True,
                     execution: Execution | None = None, **knobs):
        """(method tokens, original tokens), each [B, 1+N, E] after LN_post and the projection.
        `knobs`: the method's knobs and options (GEM: gem_depth, ss_attn_iter, ss_attn_temp,
        branches)."""
        pixels = check_pixels(pixels, self.config.vision)
        m, kn = self._method(method, knobs)
        return dense_tokens(self.params, pixels, kn, cfg=self.config, method=m, with_ori=with_ori,
                            ex=execution or self.execution)

    def _prompt_embeddings(self, prompts, template):
        if template is not None and "{}" not in template:
            raise ValueError(f"template must contain '{{}}' where the prompt goes, got {template!r}")
        texts = [template.format(p) if template else p for p in prompts]
        return self.encode_text(texts)

    def heatmaps(self, pixels, prompts, *, method: str = "gem", normalize=True, return_ori=False,
                 template=DEFAULT_TEMPLATE, execution: Execution | None = None, **knobs):
        """Heatmaps of a dense method (default GEM; see `gem_jax.methods.METHODS`).

        prompts: a list of strings shared by all images → array [B, P, H, W]; or a list of lists,
        one per image → list of [P_i, H, W] arrays.  Min-max normalized per map if `normalize`
        (a constant map gives zeros); raw cosine similarities otherwise.  `return_ori` uses the
        original CLIP tokens instead of the method's.  `knobs` are the method's (GEM:
        gem_depth=7, ss_attn_iter=1, ss_attn_temp=None (adaptive; or one value per image [B]),
        branches=("q","k","v")); a knob that does not apply to the method is an error.

        Prompts are padded to `bucket(P)` (powers of two, at least 8) with a mask, so prompt
        counts 1..8 -- shared or ragged, in any mix -- run one compiled function.
        """
        pixels = check_pixels(pixels, self.config.vision)
        m, kn = self._method(method, knobs)
        ragged = not isinstance(prompts, str) and isinstance(prompts, Sequence) and len(prompts) > 0 \
            and all(isinstance(p, (list, tuple)) for p in prompts)
        if ragged:
            if len(prompts) != pixels.shape[0]:
                raise ValueError(f"got {len(prompts)} prompt lists for {pixels.shape[0]} images; "
                                 f"give one list per image")
            per_image = [check_prompts(p, f"prompts[{i}]") for i, p in enumerate(prompts)]
            flat = [p for ps in per_image for p in ps]
        else:
            flat = check_prompts(prompts)
        emb = self._prompt_embeddings(flat, template)
        if ragged:
            # One prompt set per image, padded with zero embeddings (their maps are dropped).
            width = bucket(max(len(ps) for ps in per_image))
            idx = np.zeros((len(per_image), width), np.int32)
            mask = np.zeros((len(per_image), width), bool)
            start = 0
            for i, ps in enumerate(per_image):
                idx[i, :len(ps)] = np.arange(start, start + len(ps))
                mask[i, :len(ps)] = True
                start += len(ps)
            emb = jnp.where(mask[..., None], emb[idx], 0)
        else:
            emb = jnp.pad(emb, ((0, bucket(len(flat)) - len(flat)), (0, 0)))
        maps = dense_heatmaps(self.params, pixels, emb, kn, cfg=self.config, method=m,
                              use_ori=return_ori, normalize=normalize,
                              ex=execution or self.execution)
        if ragged:
            return [maps[i, :len(ps)] for i, ps in enumerate(per_image)]
        return maps[:, :len(flat)]

    def segment(self, pixels, class_names, *, background_threshold=None, normalize=True,
                template=DEFAULT_TEMPLATE, **knobs):
        """Per-pixel class ids [B, H, W] (int32) from a method's heatmaps over `class_names`
        (`method=` and its knobs as in `heatmaps`).

        Without a threshold ids are 0..C-1 (argmax).  With `background_threshold`, classes are
        numbered from 1 and 0 is background wherever the highest softmax probability over the
        classes' heatmaps is below the threshold (upstream GEM's recipe).
        """
        if background_threshold is not None and not 0.0 <= float(background_threshold) <= 1.0:
            raise ValueError(f"background_threshold must be in [0, 1], got {background_threshold}")
        if isinstance(class_names, Sequence) and not isinstance(class_names, str) and class_names \
                and all(isinstance(c, (list, tuple)) for c in class_names):
            raise TypeError("segment takes one list of class names shared by all images")
        scores = self.heatmaps(pixels, class_names, normalize=normalize, template=template, **knobs)
        return _maps.segment_from_scores(scores, background_threshold)


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path:
    """Persist XLA compilations on disk so later processes skip compiling (JAX's persistent
    compilation cache).  Default path: $GEM_JAX_CACHE or ~/.cache/gem_jax/xla."""
    p = Path(path or os.environ.get("GEM_JAX_CACHE") or Path.home() / ".cache" / "gem_jax" / "xla")
    p.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(p))
    # Cache every compilation, however quick: ours take ~1 s, under JAX's default threshold.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return p


# ----------------------------------------------------------------------------- loading
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.msgpack"]


def resolve(src: str | os.PathLike) -> Path:
    """A local checkpoint directory for `src`: a directory, or a hub id (HF cache, then download)."""
    p = Path(src).expanduser()
    if p.exists():
        if not p.is_dir():
            raise CheckpointError(f"{p} is a file; pass the checkpoint directory that contains it")
        return p
    s = str(src)
    if s.count("/") != 1 or s.startswith((".", "/", "~")):
        raise CheckpointError(f"{s!r} is neither an existing directory nor a Hugging Face hub id "
                              f"(owner/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError("huggingface_hub is required to load hub ids") from None
    try:
        return Path(snapshot_download(s, allow_patterns=_HUB_PATTERNS, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(s, allow_patterns=_HUB_PATTERNS))
    except Exception as e:
        raise CheckpointError(
            f"could not load {s!r}: it is not in the local Hugging Face cache and downloading it "
            f"failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). If you are "
            f"offline, pass a local checkpoint directory instead (HF transformers, OpenCLIP, or one "
            f"written by `python -m gem_jax.convert`).") from None


def load(src: str | os.PathLike, *, dtype=jnp.float32, execution: Execution | None = None) -> GEMModel:
    """Load a CLIP checkpoint: hub id, HF transformers dir, OpenCLIP hub-layout dir, or native dir.

    `dtype` is the parameter dtype and the vision tower's matmul-operand dtype (bfloat16 on
    accelerators, or on CPUs with bf16 dot instructions; elsewhere it is slower than float32):
    accumulation, residual streams, LayerNorm statistics, softmax, the final projection and the
    text tower stay float32 (see `gem_jax.layers`); `execution` overrides how it runs (see
    `Execution.auto`)."""
    d = resolve(src)
    cfg, params, _ = load_checkpoint(d, dtype=np.float32)
    if dtype != jnp.float32:
        params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
    tok = CLIPTokenizer.from_dir(d, context_length=cfg.text.context_length)
    return GEMModel(cfg, params, tok, source=str(src), execution=execution)
