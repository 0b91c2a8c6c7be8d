"""Checkpoint conversion: HF transformers (safetensors, sharded, Flax msgpack, torch .bin),
OpenCLIP hub layout, and gem_jax's own native layout -> (CLIPConfig, params).

Installed as `gem_jax.convert`.  Run `python -m gem_jax.convert SRC OUT` to write a native
checkpoint that loads without torch or transformers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

import numpy as np

from ..config import CLIPConfig, from_hf_config, from_openclip_config
from ..params import is_shape, param_shapes
from .tables import IGNORED, LAYOUTS, TRANSFORMS, Rule

NATIVE_CONFIG = "gem_jax_config.json"
NATIVE_WEIGHTS = "params.safetensors"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be turned into params; the message lists every problem found."""


# ----------------------------------------------------------------------------- tables -> params
def _get(tree, path: str):
    for part in path.split("."):
        tree = tree[part]
    return tree


def _set(tree, path: str, value):
    *head, last = path.split(".")
    for part in head:
        tree = tree.setdefault(part, {})
    tree[last] = value


def _flat_shapes(cfg: CLIPConfig) -> dict[str, tuple]:
    import jax
    out = {}
    for pth, shape in jax.tree_util.tree_flatten_with_path(param_shapes(cfg), is_leaf=is_shape)[0]:
        out[".".join(k.key for k in pth)] = shape
    return out


def _expand(rules: list[Rule], cfg: CLIPConfig):
    """Concrete (key, dst, slot, tf) rows, with "{i}" expanded to each layer of its tower."""
    layers = {"vision": cfg.vision.layers, "text": cfg.text.layers}
    for r in rules:
        if "{i}" in r.key:
            for i in range(layers[r.dst.split(".")[0]]):
                yield r.key.replace("{i}", str(i)), r.dst, tuple(i if s == "i" else s for s in r.slot), r.tf
        else:
            yield r.key, r.dst, r.slot, r.tf


def native_rules(cfg: CLIPConfig) -> list[Rule]:
    return [Rule(path, path) for path in _flat_shapes(cfg)]


def params_from_tensors(tensors: Mapping[str, np.ndarray], layout: str, cfg: CLIPConfig,
                        dtype=np.float32, source: str = "checkpoint") -> dict:
    """Apply a layout table.  Every missing, unexpected or misshaped key is collected and reported
    together in one CheckpointError."""
    rules = native_rules(cfg) if layout == "native" else LAYOUTS[layout]
    shapes = _flat_shapes(cfg)
    params = {path: np.zeros(shape, dtype) for path, shape in shapes.items()}
    missing, misshaped, expected = [], [], set()
    for key, dst, slot, tf in _expand(rules, cfg):
        expected.add(key)
        target = shapes[dst][len(slot):]
        want = tuple(TRANSFORMS[tf].src_shape(target))
        if key not in tensors:
            missing.append(f"{key} (expected shape {want})")
            continue
        w = np.asarray(tensors[key])
        if tuple(w.shape) != want:
            misshaped.append(f"{key}: shape {tuple(w.shape)}, expected {want}")
            continue
        params[dst][slot] = TRANSFORMS[tf].fn(w, target).astype(dtype)
    ignored = [re.compile(p) for p in IGNORED[layout]]
    unexpected = sorted(k for k in tensors if k not in expected and not any(p.match(k) for p in ignored))
    if missing or misshaped or unexpected:
        lines = [f"{source} does not match the {layout!r} layout of this config "
                 f"(vision {cfg.vision.layers}x{cfg.vision.width}, text {cfg.text.layers}x{cfg.text.width}):"]
        for title, items in (("missing", missing), ("misshaped", misshaped), ("unexpected", unexpected)):
            if items:
                lines.append(f"  {len(items)} {title}:")
                lines += [f"    {s}" for s in items[:50]]
                if len(items) > 50:
                    lines.append(f"    ... and {len(items) - 50} more")
        raise CheckpointError("\n".join(lines))
    tree: dict = {}
    for path, value in params.items():
        _set(tree, path, value)
    return tree


def _contiguous(a: np.ndarray) -> np.ndarray:
    # np.ascontiguousarray would turn 0-d arrays (logit_scale) into shape (1,).
    return np.array(a, order="C", copy=True)


def flatten_params(params) -> dict[str, np.ndarray]:
    import jax
    return {".".join(k.key for k in pth): np.asarray(v)
            for pth, v in jax.tree_util.tree_flatten_with_path(params)[0]}


# ----------------------------------------------------------------------------- readers
def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    try:
        return load_file(str(path))
    except Exception as e:  # bf16 tensors cannot be read by the numpy backend; use flax's reader
        try:
            from safetensors.flax import load_file as load_flax
            return {k: np.asarray(v, np.float32) for k, v in load_flax(str(path)).items()}
        except Exception:
            raise CheckpointError(f"could not read safetensors file {path}: {e}") from None


def _read_torch_bin(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{path.name} is a PyTorch pickle and torch is not installed; install torch, or use a "
            f"checkpoint with safetensors weights, or convert it once elsewhere with "
            f"`python -m gem_jax.convert`") from None
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    return {k.removeprefix("module."): v.float().numpy() if v.is_floating_point() else v.numpy()
            for k, v in sd.items()}


def _read_flax_msgpack(path: Path) -> dict[str, np.ndarray]:
    from flax.serialization import msgpack_restore
    tree = msgpack_restore(path.read_bytes())
    if "params" in tree and len(tree) == 1:
        tree = tree["params"]
    out = {}

    def walk(t, prefix):
        for k, v in t.items():
            if isinstance(v, dict):
                walk(v, prefix + k + ".")
            else:
                out[prefix + k] = np.asarray(v)
    walk(tree, "")
    return out


def _read_sharded(index: Path, reader) -> dict[str, np.ndarray]:
    weight_map = json.loads(index.read_text())["weight_map"]
    out = {}
    for shard in sorted(set(weight_map.values())):
        f = index.parent / shard
        if not f.exists():
            raise CheckpointError(f"shard {shard} listed in {index.name} is missing from {index.parent}")
        out.update(reader(f))
    return out


_HF_WEIGHTS = (
    ("model.safetensors", _read_safetensors),
    ("model.safetensors.index.json", lambda p: _read_sharded(p, _read_safetensors)),
    ("flax_model.msgpack", _read_flax_msgpack),
    ("pytorch_model.bin", _read_torch_bin),
    ("pytorch_model.bin.index.json", lambda p: _read_sharded(p, _read_torch_bin)),
)
_OPENCLIP_WEIGHTS = (
    ("open_clip_model.safetensors", _read_safetensors),
    ("open_clip_pytorch_model.bin", _read_torch_bin),
)


def detect(directory: str | os.PathLike) -> tuple[str, Path]:
    """(layout, weights file) of a checkpoint directory, or a CheckpointError saying what was sought."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"{d} is not a directory")
    if (d / NATIVE_CONFIG).exists():
        return "native", d / NATIVE_WEIGHTS
    if (d / "open_clip_config.json").exists():
        for name, _ in _OPENCLIP_WEIGHTS:
            if (d / name).exists():
                return "openclip", d / name
        raise CheckpointError(f"{d} has open_clip_config.json but no weights: looked for "
                              + ", ".join(n for n, _ in _OPENCLIP_WEIGHTS))
    if (d / "config.json").exists():
        for name, _ in _HF_WEIGHTS:
            if (d / name).exists():
                return ("hf_flax" if name.endswith("msgpack") else "hf"), d / name
        raise CheckpointError(f"{d} has config.json but no weights: looked for "
                              + ", ".join(n for n, _ in _HF_WEIGHTS))
    found = sorted(p.name for p in d.iterdir())[:20]
    raise CheckpointError(
        f"no recognizable CLIP checkpoint in {d}. Looked for: {NATIVE_CONFIG} + {NATIVE_WEIGHTS} "
        f"(gem_jax native); open_clip_config.json + open_clip_model.safetensors or "
        f"open_clip_pytorch_model.bin (OpenCLIP hub layout); config.json + model.safetensors, "
        f"model.safetensors.index.json, flax_model.msgpack or pytorch_model.bin (HF transformers). "
        f"Found: {', '.join(found) or 'nothing'}")


def read_config(directory: str | os.PathLike, layout: str) -> CLIPConfig:
    d = Path(directory)
    if layout == "native":
        meta = json.loads((d / NATIVE_CONFIG).read_text())
        if meta.get("format") != "gem_jax" or meta.get("version") != FORMAT_VERSION:
            raise CheckpointError(f"{d / NATIVE_CONFIG}: not a gem_jax v{FORMAT_VERSION} checkpoint")
        return CLIPConfig.from_dict(meta["config"])
    if layout == "openclip":
        return from_openclip_config(json.loads((d / "open_clip_config.json").read_text()), name=d.name)
    return from_hf_config(json.loads((d / "config.json").read_text()), name=d.name)


def load_checkpoint(directory: str | os.PathLike, dtype=np.float32) -> tuple[CLIPConfig, dict, str]:
    """Read a local checkpoint directory → (config, params as nested dict of numpy, layout)."""
    layout, weights = detect(directory)
    cfg = read_config(directory, layout)
    if layout == "native":
        tensors = _read_safetensors(weights)
    else:
        reader = dict(_HF_WEIGHTS + _OPENCLIP_WEIGHTS)[weights.name]
        tensors = reader(weights)
    return cfg, params_from_tensors(tensors, layout, cfg, dtype, source=str(weights)), layout


# ----------------------------------------------------------------------------- writer
def save_native(out: str | os.PathLike, cfg: CLIPConfig, params, tokenizer=None, *, force=False,
                dtype=None) -> Path:
    """Write a native checkpoint directory atomically (temp dir, then rename).

    Refuses an existing `out` unless `force`.  `dtype` (e.g. np.float16) casts the weights.
    """
    from safetensors.numpy import save_file

    def write(tmp: Path):
        flat = flatten_params(params)
        if dtype is not None:
            flat = {k: v.astype(dtype) for k, v in flat.items()}
        save_file({k: _contiguous(v) for k, v in flat.items()}, str(tmp / NATIVE_WEIGHTS))
        meta = {"format": "gem_jax", "version": FORMAT_VERSION, "config": cfg.to_dict()}
        (tmp / NATIVE_CONFIG).write_text(json.dumps(meta, indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
    return _atomic_dir(out, write, force)


def tensors_from_params(params, layout: str, cfg: CLIPConfig) -> dict[str, np.ndarray]:
    """The inverse of `params_from_tensors`: our params as checkpoint tensors of `layout`."""
    flat = flatten_params(params)
    shapes = _flat_shapes(cfg)
    out = {}
    for key, dst, slot, tf in _expand(LAYOUTS[layout], cfg):
        t = TRANSFORMS[tf]
        piece = np.asarray(flat[dst][slot])
        w = t.inv(piece) if t.inv is not None else piece.reshape(t.src_shape(shapes[dst][len(slot):]))
        out[key] = _contiguous(w)
    return out


def hf_config_dict(cfg: CLIPConfig) -> dict:
    """A transformers `config.json` (CLIPModel) describing `cfg`."""
    v, t = cfg.vision, cfg.text
    if t.pooling == "argmax" and t.eos_token_id != t.vocab_size - 1:
        raise ValueError("argmax text pooling equals HF's first-eos rule only when end-of-text is "
                         "the largest token id")
    return {
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": cfg.embed_dim,
        "logit_scale_init_value": 2.6592,
        "vision_config": {"hidden_size": v.width, "intermediate_size": v.mlp_dim,
                          "num_hidden_layers": v.layers, "num_attention_heads": v.heads,
                          "image_size": v.image_size, "patch_size": v.patch_size,
                          "hidden_act": v.act, "layer_norm_eps": v.ln_eps,
                          "projection_dim": cfg.embed_dim, "num_channels": 3},
        "text_config": {"hidden_size": t.width, "intermediate_size": t.mlp_dim,
                        "num_hidden_layers": t.layers, "num_attention_heads": t.heads,
                        "max_position_embeddings": t.context_length, "vocab_size": t.vocab_size,
                        "hidden_act": t.act, "layer_norm_eps": t.ln_eps,
                        "projection_dim": cfg.embed_dim, "bos_token_id": 49406,
                        "eos_token_id": t.eos_token_id, "pad_token_id": 1},
    }


def save_hf(out: str | os.PathLike, cfg: CLIPConfig, params, tokenizer=None, *, force=False) -> Path:
    """Export to the Hugging Face transformers layout (config.json + model.safetensors + tokenizer
    files), loadable by `transformers.CLIPModel.from_pretrained` and by `gem_jax.load`."""
    from safetensors.numpy import save_file

    def write(tmp: Path):
        tensors = tensors_from_params(params, "hf", cfg)
        save_file({k: v.astype(np.float32) for k, v in tensors.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config_dict(cfg), indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
    return _atomic_dir(out, write, force)


def _atomic_dir(out, write, force: bool) -> Path:
    """Create directory `out` by filling a temp sibling with `write(tmp)`, then moving it in.

    Never deletes or replaces what gem-jax did not write (gem_jax.outputs.check_checkpoint_dir):
    `out` must be absent or empty, or with `force` hold only a previous checkpoint's files, of
    which only the ones written now are replaced; a file at `out` is always refused."""
    from ..outputs import check_checkpoint_dir, install_dir
    out = Path(out)
    check_checkpoint_dir(out, force=force)  # before writing anything
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(tmp)
        install_dir(tmp, out, force=force)
    finally:
        if tmp.exists():  # our own temp directory (mkdtemp), left only on failure
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def convert(src: str, out: str | os.PathLike, *, force: bool = False, dtype=None) -> Path:
    """Convert any loadable source (hub id or directory) into a native checkpoint at `out`."""
    from ..model import load
    from ..outputs import check_checkpoint_dir
    check_checkpoint_dir(out, force=force)  # the OUT rule, before the (slow) load
    m = load(src)
    return save_native(out, m.config, m.params, m.tokenizer, force=force, dtype=dtype)
