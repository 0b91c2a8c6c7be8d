"""Training-free dense CLIP methods, each a small object over the block runner's intermediates
(`gem_jax.tower.run`): where its stream starts, what it does to one block, its knobs.

A method is a frozen (hashable, static under jit) dataclass with
    name, knob_names, defaults, per_image          class attributes
    start(n_layers, knobs) -> int | Array          first block of the method's stream
    valid(n_layers, knobs) -> bool Array            False: the tokens become NaN (traced knobs)
    block(bp, s, vars, knobs, cfg, ex) -> s         one block; vars = x, h, q, k, v
"""

from __future__ import annotations

from .gem import GEM

METHODS = {"gem": GEM}


def get(name: str, **static):
    """The method object for a name, e.g. get("gem", branches=("v",))."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name](**static)
