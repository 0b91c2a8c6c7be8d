"""Training-free dense CLIP methods, each a small object over the block runner's intermediates
(`gem_jax.tower.run`): where its stream starts, what it does to one block, its knobs.

A method is a frozen (hashable, static under jit) dataclass with
    name, knob_names, defaults, per_image          class attributes
    start(n_layers, knobs) -> int | Array          first block of the method's stream
    valid(n_layers, knobs) -> bool Array            False: the tokens become NaN (traced knobs)
    block(bp, s, vars, knobs, cfg, ex) -> s         one block; vars = x, h, q, k, v
    check(n_layers, knobs) -> None                  ValueError for concrete out-of-range knobs
    for_knobs(knobs) -> method                      the method adapted to concrete knobs (or self)
optional:
    pos_embed: str                                  positional-embedding resampling for
                                                    non-native grids (default "antialias")
    needs_ori: bool; finish(dense, ori) -> dense    post-process the final tokens with the
                                                    original stream's (e.g. CLIP Surgery's class
                                                    token)
    similarity(tokens, text_emb, grid) -> [B,P,gh,gw]   replaces the patch-text cosine
    for_grid(grid) -> method                        the method for this input's patch grid
                                                    (gh, gw) (NACLIP's Ω); vision.encode calls it

Methods (one file each, with its formula, knobs and upstream source in the module docstring):
    gem        GEM: self-self attention in the last gem_depth-1 blocks (Bousselham et al. 2024)
    maskclip   MaskCLIP: last block out_proj(v), no residual/FFN (residual=True: official code)
    surgery    CLIP Surgery: v-v attention path in the last 6 blocks + feature surgery
    sclip      SCLIP: last block x + out_proj((softmax(s·qqᵀ) + softmax(s·kkᵀ))·v), then MLP
    clearclip  ClearCLIP: last block out_proj(softmax(s·qqᵀ)·v), no residual/FFN
    naclip     NACLIP: last block out_proj(softmax(s·kkᵀ + Ω)·v), Ω a Gaussian on the patch grid
"""

from __future__ import annotations

from .clearclip import ClearCLIP
from .gem import GEM
from .maskclip import MaskCLIP
from .naclip import NACLIP
from .sclip import SCLIP
from .surgery import Surgery

METHODS = {"gem": GEM, "maskclip": MaskCLIP, "surgery": Surgery, "sclip": SCLIP,
           "clearclip": ClearCLIP, "naclip": NACLIP}


def _options(cls) -> set:
    """A method's static options: its dataclass fields, except private ones (set by hooks)."""
    import dataclasses
    return {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")}


def get(name: str, **static):
    """The method object for a name, e.g. get("gem", branches=("v",))."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name](**static)


def build(name: str, **kwargs):
    """(method object, knobs dict) from keyword arguments: the method's knob names become traced
    knobs (defaults filled in), every other keyword a static option of the method.  Arguments
    that do not apply to the method are an error naming the method's knobs and options."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    cls = METHODS[name]
    options = _options(cls)
    bad = sorted(k for k in kwargs if k not in cls.knob_names and k not in options)
    if bad:
        raise ValueError(f"{', '.join(bad)} do{'es' if len(bad) == 1 else ''} not apply to method "
                         f"{name!r} (its knobs: {', '.join(cls.knob_names) or 'none'}; options: "
                         f"{', '.join(sorted(options)) or 'none'})")
    knobs = {k: kwargs.get(k, cls.defaults[k]) for k in cls.knob_names}
    return cls(**{k: v for k, v in kwargs.items() if k in options}), knobs


def _scalar(text: str):
    low = text.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "adaptive"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip()


def parse_knob(text: str) -> tuple[str, object]:
    """A command-line ``KEY=VALUE`` (e.g. ``gaussian_std=3``, ``residual=true``,
    ``branches=q,k``) → (key, value): true/false → bool, none/adaptive → None, integers → int,
    other numbers → float, a comma-separated list → a tuple of those, anything else the string.
    Whether the key applies to the chosen method is `build`'s to say."""
    key, sep, value = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key or not value.strip():
        raise ValueError(f"expected KEY=VALUE (e.g. gaussian_std=3), got {text!r}")
    if "," in value:
        return key, tuple(_scalar(v) for v in value.split(",") if v.strip())
    return key, _scalar(value)
