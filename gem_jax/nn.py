"""Flax (linen) modules over the pure functions: the same maths, the same param tree.

    model = gem_jax.load("openai/clip-vit-base-patch16")
    clip = gem_jax.nn.CLIP(model.config)
    emb = clip.apply({"params": model.params}, pixels, method="encode_image")
    variables = clip.init(key, pixels, ids)      # {"params": tree with model.params' paths/shapes}

Each module creates its parameters with `self.param` as whole subtrees whose paths and shapes are
exactly `gem_jax.params.param_shapes(config)` (so a loaded tree plugs in with no conversion) and
then calls `gem_jax.vision.encode`, `gem_jax.text.encode`, `gem_jax.model.dense_heatmaps`, ...
on them: no second copy of the maths.  NNX users wrap `CLIP` with `flax.nnx.bridge.ToNNX`
(see the README and tests/test_nn.py).  Every projection goes through
`gem_jax.layers.linear`: set `linear_interceptor` (or use `gem_jax.layers.intercept_linear`)
to intercept Dense layers, e.g. for LoRA.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from . import layers, methods as methods_lib, model as model_lib, params as params_lib
from . import text, vision
from .config import CLIPConfig, TextConfig, VisionConfig
from .layers import Execution

__all__ = ["CLIP", "VisionTower", "TextTower"]


def _subtree_params(module: nn.Module, shapes: dict, prefix: str, dtype) -> dict:
    """self.param for each top-level entry of `shapes`, each one whole (nested) subtree."""
    def make(key, name):
        return params_lib.init_tree(shapes[name], key, dtype, f"{prefix}['{name}']")
    return {name: module.param(name, make, name) for name in shapes}


def _intercepting(fn: Optional[Callable]):
    return layers.intercept_linear(fn) if fn is not None else contextlib.nullcontext()


class VisionTower(nn.Module):
    """The CLIP ViT image tower.  `__call__(pixels)` → vision.encode's dict (tokens, pooled,
    hidden; with a dense `method` and its `knobs` also `dense`)."""
    config: VisionConfig
    embed_dim: int
    execution: Execution = Execution()
    param_dtype: Any = jnp.float32
    linear_interceptor: Optional[Callable] = None

    def setup(self):
        shapes = params_lib.param_shapes(CLIPConfig(vision=self.config, embed_dim=self.embed_dim))
        self.tree = _subtree_params(self, shapes["vision"], "['vision']", self.param_dtype)

    def __call__(self, pixels, *, method=None, knobs=None, with_ori: bool = True,
                 return_blocks: bool = False):
        with _intercepting(self.linear_interceptor):
            return vision.encode(dict(self.tree), self.config, pixels, method=method, knobs=knobs,
                                 with_ori=with_ori, return_blocks=return_blocks, ex=self.execution)


class TextTower(nn.Module):
    """The CLIP text tower.  `__call__(ids [T, C])` → projected embeddings [T, E]."""
    config: TextConfig
    embed_dim: int
    param_dtype: Any = jnp.float32
    linear_interceptor: Optional[Callable] = None

    def setup(self):
        shapes = params_lib.param_shapes(CLIPConfig(text=self.config, embed_dim=self.embed_dim))
        self.tree = _subtree_params(self, shapes["text"], "['text']", self.param_dtype)

    def __call__(self, ids):
        with _intercepting(self.linear_interceptor):
            return text.encode(dict(self.tree), self.config, ids)


class CLIP(nn.Module):
    """Both towers and the logit scale; params {"vision", "text", "logit_scale"} as `gem_jax.load`.

    `__call__(pixels, ids)` gives CLIP's logits_per_image [B, T] (for training);
    `encode_image`, `encode_text`, `image_tokens` and `heatmaps` are the inference entry points,
    called with `apply(variables, ..., method="heatmaps")`.  Knobs are traced values, as in
    `gem_jax.heatmaps_fn`; `dense_method` names a dense method ("gem", "naclip", ...)."""
    config: CLIPConfig
    execution: Execution = Execution()
    param_dtype: Any = jnp.float32
    linear_interceptor: Optional[Callable] = None

    def setup(self):
        c = self.config
        self.vision = VisionTower(c.vision, c.embed_dim, self.execution, self.param_dtype,
                                  self.linear_interceptor)
        self.text = TextTower(c.text, c.embed_dim, self.param_dtype, self.linear_interceptor)
        self.logit_scale = self.param(
            "logit_scale", lambda key: params_lib.init_leaf("['logit_scale']", (), key,
                                                            self.param_dtype))

    def _tree(self) -> dict:
        return {"vision": dict(self.vision.tree), "text": dict(self.text.tree),
                "logit_scale": self.logit_scale}

    def __call__(self, pixels, ids):
        img = layers.l2_normalize(self.encode_image(pixels))
        txt = layers.l2_normalize(self.encode_text(ids))
        return jnp.exp(self.logit_scale) * jnp.einsum("be,te->bt", img, txt)

    def encode_image(self, pixels):
        """Pooled, projected image embeddings [B, E]."""
        return self.vision(pixels)["pooled"]

    def encode_text(self, ids):
        """Projected text embeddings [T, E] from token ids [T, C]."""
        return self.text(ids)

    def image_tokens(self, pixels, *, dense_method: str = "gem", with_ori: bool = True, **knobs):
        """(method tokens, original tokens), each [B, 1+N, E].  `dense_method` names the method
        (not `method`: linen's `apply` takes that one); `knobs`: its knobs (GEM: gem_depth,
        ss_attn_iter, ss_attn_temp; traced) and static options (branches)."""
        m, kn = methods_lib.build(dense_method, **knobs)
        with _intercepting(self.linear_interceptor):
            return model_lib._dense_impl(self._tree(), pixels, kn, None, cfg=self.config,
                                         method=m, with_ori=with_ori, use_ori=False, maps=False,
                                         normalize=False, ex=self.execution)

    def heatmaps(self, pixels, text_emb, *, dense_method: str = "gem", normalize: bool = True,
                 use_ori: bool = False, **knobs):
        """Heatmaps [B, P, H, W] for text embeddings [P, E] (or [B, P, E]), e.g.
        `clip.apply(v, px, emb, method="heatmaps", dense_method="naclip")`."""
        m, kn = methods_lib.build(dense_method, **knobs)
        with _intercepting(self.linear_interceptor):
            return model_lib._dense_impl(self._tree(), pixels, kn, text_emb, cfg=self.config,
                                         method=m, with_ori=False, use_ori=use_ori, maps=True,
                                         normalize=normalize, ex=self.execution)
