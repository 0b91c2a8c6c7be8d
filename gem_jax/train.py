"""Contrastive (CLIP) training of our pure-function towers with optax.

    import optax
    from gem_jax import train
    tx = train.make_optimizer(lr=1e-3, steps=1000, warmup=50)
    opt_state = tx.init(params)
    step = train.make_train_step(cfg, tx)            # jitted; pure
    params, opt_state, metrics = step(params, opt_state, batch, key)

`batch` is a dict: ``pixels`` float [B, H, W, 3] (normalized, NHWC), ``ids`` int [B, C] (token ids
from `CLIPTokenizer`), and optionally ``groups`` int [B]: images whose groups are equal count as
positives of each other's captions (soft targets spread evenly over the positives); without it the
targets are the diagonal, i.e. exactly CLIP's (and `transformers.CLIPModel(return_loss=True)`'s)
symmetric cross-entropy.  `key` drives the augmentation (random horizontal flips when the step was
made with `flip=True`); with `flip=False` it is unused and the step is deterministic.

The optimizer is AdamW under a linear-warmup + cosine-decay schedule, after global-norm gradient
clipping; weight decay skips LayerNorm parameters, biases, the class token, positional embeddings
and the logit scale.  After each update the logit scale is clamped to log(100), as CLIP does.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import layers, text, vision
from .config import CLIPConfig

MAX_LOGIT_SCALE = float(np.log(100.0))


# ----------------------------------------------------------------------------- loss
def clip_logits(params, cfg: CLIPConfig, pixels, ids):
    """logits_per_image [B, T] = exp(logit_scale) · cos(image_b, text_t)."""
    img = vision.encode(params["vision"], cfg.vision, pixels)["pooled"]
    txt = text.encode(params["text"], cfg.text, ids)
    img = layers.l2_normalize(img)
    txt = layers.l2_normalize(txt)
    scale = jnp.exp(params["logit_scale"])
    return scale * jnp.einsum("be,te->bt", img, txt)


def _targets(groups, n):
    if groups is None:
        return jnp.eye(n, dtype=jnp.float32)
    pos = (groups[:, None] == groups[None, :]).astype(jnp.float32)
    return pos / pos.sum(-1, keepdims=True)


def contrastive_loss(params, cfg: CLIPConfig, pixels, ids, groups=None):
    """Symmetric cross-entropy of CLIP → (loss, aux metrics).  With `groups` the targets are spread
    over all positives (identical object sets); without it they are the diagonal."""
    logits = clip_logits(params, cfg, pixels, ids).astype(jnp.float32)
    t = _targets(groups, logits.shape[0])
    li = -(t * jax.nn.log_softmax(logits, axis=1)).sum(1).mean()
    lt = -(t.T * jax.nn.log_softmax(logits.T, axis=1)).sum(1).mean()
    loss = 0.5 * (li + lt)
    hit = jnp.take_along_axis(t, jnp.argmax(logits, axis=1)[:, None], axis=1)[:, 0] > 0
    return loss, dict(loss=loss, acc_i2t=hit.mean(), logit_scale=jnp.exp(params["logit_scale"]))


# ----------------------------------------------------------------------------- optimizer
def decay_mask(params) -> Any:
    """True for the tensors that get weight decay: matrices and token embeddings, not LN/biases/
    class token/positional embeddings/logit scale."""
    def keep(path, x):
        names = [getattr(k, "key", str(k)) for k in path]
        last = names[-1]
        return not (last in ("scale", "bias", "cls", "pos_embed", "logit_scale") or x.ndim < 2)
    return jax.tree_util.tree_map_with_path(keep, params)


def schedule(lr: float, steps: int, warmup: int, end_factor: float = 0.0):
    """Linear warmup from 0 to `lr` over `warmup` steps, then cosine decay to lr·end_factor."""
    warmup = max(0, min(int(warmup), int(steps) - 1))
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(int(steps), warmup + 1),
                                              end_value=lr * end_factor)


def make_optimizer(lr: float = 1e-3, steps: int = 1000, warmup: int = 50,
                   weight_decay: float = 0.1, clip_norm: float = 1.0, b2: float = 0.98):
    """AdamW (decoupled weight decay via `decay_mask`) with warmup + cosine, after clipping."""
    return optax.chain(
        optax.clip_by_global_norm(clip_norm),
        optax.adamw(schedule(lr, steps, warmup), b1=0.9, b2=b2, eps=1e-6,
                    weight_decay=weight_decay, mask=decay_mask),
    )


# ----------------------------------------------------------------------------- step
def _flip(pixels, key):
    flip = jax.random.bernoulli(key, 0.5, (pixels.shape[0], 1, 1, 1))
    return jnp.where(flip, pixels[:, :, ::-1, :], pixels)


def train_step(params, opt_state, batch, key, *, cfg: CLIPConfig, tx, flip: bool = False):
    """One optimizer step → (params, opt_state, metrics).  Pure; see `make_train_step`."""
    pixels = batch["pixels"]
    if flip:
        pixels = _flip(pixels, key)
    grad_fn = jax.value_and_grad(contrastive_loss, has_aux=True)
    (_, metrics), grads = grad_fn(params, cfg, pixels, batch["ids"], batch.get("groups"))
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    params = dict(params, logit_scale=jnp.minimum(params["logit_scale"], MAX_LOGIT_SCALE))
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
    return params, opt_state, metrics


def make_train_step(cfg: CLIPConfig, tx, *, flip: bool = False, donate: bool = True):
    """`train_step` bound to a config and optimizer, jitted (params and opt_state donated)."""
    fn = partial(train_step, cfg=cfg, tx=tx, flip=flip)
    return jax.jit(fn, donate_argnums=(0, 1) if donate else ())


# ----------------------------------------------------------------------------- data helpers
def normalize_pixels(images_uint8, cfg: CLIPConfig) -> np.ndarray:
    """uint8 [B, H, W, 3] → float32 normalized pixels (what `preprocess` does at native size)."""
    mean = np.asarray(cfg.image_mean, np.float32)
    std = np.asarray(cfg.image_std, np.float32)
    return (np.asarray(images_uint8, np.float32) / np.float32(255.0) - mean) / std
