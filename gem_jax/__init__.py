"""gem-jax: GEM (Grounding Everything Module) open-vocabulary localization on a pure-JAX CLIP.

    model = gem_jax.load("openai/clip-vit-base-patch16")   # or a local HF / OpenCLIP / native dir
    pixels = model.preprocess(images)                       # [B, 448, 448, 3]
    maps = model.heatmaps(pixels, ["cat", "remote control"])  # [B, 2, 448, 448]
"""

from . import config, gem, layers, maps, methods, params, text, tower, vision
from .config import CLIPConfig, TextConfig, VisionConfig, preset
from .convert import CheckpointError
from .layers import Execution
from .model import (GEMModel, dense_heatmaps, dense_tokens, enable_compilation_cache, encode_image,
                    encode_text, heatmaps_fn,
                    image_tokens, load)
from .preprocess import preprocess
from .tokenizer import CLIPTokenizer

METHODS = tuple(methods.METHODS)

__version__ = "0.1.0"

__all__ = [
    "METHODS", "CLIPConfig", "CLIPTokenizer", "CheckpointError", "Execution", "GEMModel", "TextConfig", "VisionConfig",
    "config", "dense_heatmaps", "dense_tokens", "enable_compilation_cache", "encode_image", "encode_text", "gem", "heatmaps_fn", "image_tokens", "layers", "load",
    "maps", "methods", "params", "preprocess", "preset", "text", "tower", "vision",
]
