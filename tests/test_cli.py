"""The `gem-jax` command line, end to end on a tiny random-weight native checkpoint."""

from __future__ import annotations

import importlib.util
import os
import argparse
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from gem_jax import cli

REPO = Path(__file__).resolve().parents[1]
KNOBS = ["--gem-depth", "3", "--size", "32"]


def _script():
    spec = importlib.util.spec_from_file_location("make_tiny_checkpoint",
                                                  REPO / "scripts" / "make_tiny_checkpoint.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tiny_checkpoint(tmp_path_factory) -> Path:
    """One tiny checkpoint per test session, shared by the test files that need it."""
    path = tmp_path_factory.getbasetemp() / "gem_jax_tiny_ckpt"
    if not (path / "gem_jax_config.json").exists():
        _script().make_tiny_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    a = Image.new("RGB", (60, 40), (30, 120, 200))
    ImageDraw.Draw(a).ellipse([5, 5, 30, 30], fill=(250, 200, 0))
    a.save(d / "a.png")
    Image.new("L", (25, 50), 128).save(d / "b.jpg")
    return d


def run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def leftovers(d: Path):
    return [p.name for p in d.iterdir() if p.name.startswith(".")]


# ----------------------------------------------------------------------------- help
@pytest.mark.parametrize("cmd", [[], ["heatmap"], ["segment"], ["convert"], ["models"]])
def test_help_shows_examples(capsys, cmd):
    rc, out, err = run(capsys, *cmd, "--help")
    assert rc == 0 and "examples:" in out and "usage: gem-jax" in out
    assert "Traceback" not in out + err


def test_every_registered_command_has_help(capsys):
    """Including the optional eval/bench commands, once those modules are installed."""
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert {"heatmap", "segment", "convert", "models"} <= set(sub.choices)
    for name in sub.choices:
        rc, out, err = run(capsys, name, "--help")
        assert rc == 0 and f"usage: gem-jax {name}" in out, (name, err)


def test_console_script_installed(tmp_path):
    exe = Path(sys.executable).with_name("gem-jax")
    assert exe.exists(), "run `pip install -e .` to create the gem-jax console script"
    r = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "gem-jax" in r.stdout


# ----------------------------------------------------------------------------- heatmap
def test_heatmap_end_to_end(capsys, ckpt, images, tmp_path):
    out = tmp_path / "out"
    rc, so, err = run(capsys, "heatmap", images / "a.png", images / "b.jpg", "-p", "a sun",
                      "-p", "the sea", "--model", ckpt, *KNOBS, "--out", out, "--save-raw",
                      "--batch-size", "1")
    assert rc == 0, err
    assert "wrote 8 file(s)" in so
    for stem, size in (("a", (60, 40)), ("b", (25, 50))):
        for slug in ("a-sun", "the-sea"):
            png = Image.open(out / f"{stem}_{slug}.png")
            assert png.mode == "RGB" and png.size == size
        raw = np.load(out / f"{stem}_raw.npy")   # raw cosines [P, size, size] (test_outputs.py)
        assert raw.dtype == np.float32 and raw.shape == (2, 32, 32) and np.isfinite(raw).all()
        grid = Image.open(out / f"{stem}_grid.png")
        assert grid.mode == "RGB" and grid.width > 3 * 64
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{s}_{n}" for s in "ab" for n in ("a-sun.png", "the-sea.png", "raw.npy", "grid.png")]
        + ["manifest.json"])


def test_heatmap_many_images_in_batches_quiet(capsys, ckpt, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        Image.new("RGB", (20 + i, 20), (40 * i, 0, 0)).save(src / f"im{i}.png")
    out = tmp_path / "out"
    rc, so, err = run(capsys, "heatmap", *sorted(src.iterdir()), "-p", "red", "-p", "red",
                      "--model", ckpt, *KNOBS, "--out", out, "-b", "2", "--quiet",
                      "--dtype", "bfloat16", "--cmap", "turbo")
    assert rc == 0, err
    assert so == ""
    names = {p.name for p in out.iterdir()}
    assert {f"im{i}_red.png" for i in range(5)} <= names
    assert {f"im{i}_red-2.png" for i in range(5)} <= names  # duplicate prompts get unique names
    assert len(names) == 16 and "manifest.json" in names


def test_force(capsys, ckpt, images, tmp_path):
    out = tmp_path / "out"
    args = ["heatmap", images / "a.png", "-p", "cat", "--model", ckpt, *KNOBS, "--out", out]
    assert run(capsys, *args)[0] == 0
    target = out / "a_cat.png"
    target.write_bytes(b"sentinel")
    rc, so, err = run(capsys, *args)
    assert rc == 1
    assert err.startswith("error:") and "--force" in err and "a_cat.png" in err
    assert target.read_bytes() == b"sentinel"  # untouched
    rc, so, err = run(capsys, *args, "--force")
    assert rc == 0, err
    assert Image.open(target).size == (60, 40)
    assert leftovers(out) == []


# ----------------------------------------------------------------------------- segment
@pytest.mark.parametrize("threshold", [None, "0.5"])
def test_segment_end_to_end(capsys, ckpt, images, tmp_path, threshold):
    out = tmp_path / "seg"
    extra = ["--background-threshold", threshold] if threshold else []
    rc, so, err = run(capsys, "segment", images / "a.png", images / "b.jpg", "-c", "sun", "-c", "sea",
                      "-c", "sky", "--model", ckpt, *KNOBS, "--out", out, "--save-raw", *extra)
    assert rc == 0, err
    n_ids = 4 if threshold else 3
    for stem, size in (("a", (60, 40)), ("b", (25, 50))):
        seg = Image.open(out / f"{stem}_seg.png")
        assert seg.mode == "P" and seg.size == size
        ids = np.asarray(seg)
        assert ids.min() >= 0 and ids.max() < n_ids
        raw = np.load(out / f"{stem}_seg.npy")
        assert raw.dtype == np.int32 and np.array_equal(raw, ids)
        ov = Image.open(out / f"{stem}_seg_overlay.png")
        assert ov.mode == "RGB" and ov.width > size[0] and ov.height >= size[1]  # + legend
    assert leftovers(out) == []


# ----------------------------------------------------------------------------- convert, models
def test_convert(capsys, ckpt, tmp_path):
    out = tmp_path / "native"
    rc, so, err = run(capsys, "convert", ckpt, out)
    assert rc == 0, err
    assert (out / "gem_jax_config.json").exists() and (out / "params.safetensors").exists()
    rc, so, err = run(capsys, "convert", ckpt, out)
    assert rc == 1 and err.startswith("error:") and "--force" in err
    assert run(capsys, "convert", ckpt, out, "--force")[0] == 0
    rc, so, err = run(capsys, "convert", tmp_path / "missing", tmp_path / "x")
    assert rc == 2 and "no such directory" in err   # a path typo is a usage error
    rc, so, err = run(capsys, "convert", tmp_path, tmp_path / "x")   # not a checkpoint
    assert rc == 1 and err.startswith("error:")


def test_converted_checkpoint_loads(capsys, ckpt, images, tmp_path):
    out = tmp_path / "native"
    assert run(capsys, "convert", ckpt, out)[0] == 0
    rc, so, err = run(capsys, "heatmap", images / "a.png", "-p", "x", "--model", out, *KNOBS,
                      "--out", tmp_path / "o")
    assert rc == 0, err


def test_models(capsys):
    rc, so, err = run(capsys, "models")
    assert rc == 0
    assert "ViT-B-16" in so and "openai/clip-vit-base-patch16" in so and "ViT-L-14-336" in so


# ----------------------------------------------------------------------------- exit codes
@pytest.mark.parametrize("argv", [
    [],
    ["nosuchcommand"],
    ["heatmap", "a.png"],                                  # no prompt
    ["heatmap", "a.png", "-p", ""],                        # empty prompt
    ["heatmap", "a.png", "-p", "   "],                     # whitespace prompt
    ["heatmap", "a.png", "-p", "x", "--size", "0"],
    ["heatmap", "a.png", "-p", "x", "--iters", "-1"],
    ["heatmap", "a.png", "-p", "x", "--temp", "nan"],
    ["heatmap", "a.png", "-p", "x", "--template", "no braces"],
    ["heatmap", "missing.png", "-p", "x"],                 # no such input
    ["heatmap", "a.png", "-p", "x", "--temp", "-1"],
    ["heatmap", "a.png", "-p", "x", "--format", "jpg"],
    ["heatmap", "a.png", "-p", "x", "--model", "./no/such/dir"],
    ["segment", "a.png"],                                  # no class
    ["segment", "a.png", "-c", "x", "--background-threshold", "1.5"],
    ["heatmap", "a.png", "-p", "x", "--dtype", "int8"],
])
def test_usage_errors_exit_2(capsys, argv):
    rc, so, err = run(capsys, *argv)
    assert rc == 2
    assert "Traceback" not in err
    if argv:
        assert "error:" in err


def test_errors_before_computing_exit_2(capsys, ckpt, images, tmp_path):
    """Usage errors that need the file system or the model: exit 2, nothing written."""
    out = tmp_path / "o"
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["heatmap", tmp_path / "missing.png", "-p", "x", "--model", ckpt, *KNOBS], "no such file"),
        (["heatmap", empty, "-p", "x", "--model", ckpt, *KNOBS], "no image files"),
        (["heatmap", images / "a.png", "-p", "x", "--model", ckpt, "--gem-depth", "9",
          "--size", "32"], "--gem-depth 9 is too large"),
        (["heatmap", images / "a.png", "-p", "x", "--model", ckpt, "--gem-depth", "3",
          "--size", "4"], "--size 4 is smaller than one 8-pixel patch"),
        (["heatmap", images / "a.png", "-p", "x", "--model", tmp_path / "no-model"],
         "no such directory"),
    ]
    for argv, needle in cases:
        rc, so, err = run(capsys, *argv, "--out", out)
        assert rc == 2, (argv, err)
        assert "error:" in err and needle in err, (argv, err)
        assert "Traceback" not in err
    assert not out.exists()


def test_runtime_errors_exit_1(capsys, ckpt, images, tmp_path):
    out = tmp_path / "o"
    rc, so, err = run(capsys, "segment", images / "a.png", "-c", "x", "--model", tmp_path,
                      "--out", out)
    assert rc == 1 and err.startswith("error:") and "cannot load model" in err, err
    assert "Traceback" not in err
    assert not out.exists()


def test_offline_uncached_model_message(tmp_path, images):
    """Default model, offline and not cached: one clear line, exit 1, no traceback."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               HF_HUB_CACHE=str(tmp_path / "hf" / "hub"))
    env.pop("GEM_JAX_TRACEBACK", None)
    exe = Path(sys.executable).with_name("gem-jax")
    r = subprocess.run([str(exe), "heatmap", str(images / "a.png"), "-p", "cat",
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error:") and "openai/clip-vit-base-patch16" in lines[0]
    assert "cache" in lines[0] and "--model" in lines[0] and "make_tiny_checkpoint" in lines[0]


def test_bad_image_among_good_ones(capsys, ckpt, images, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    out = tmp_path / "o"
    rc, so, err = run(capsys, "heatmap", images / "a.png", bad, "-p", "x", "--model", ckpt, *KNOBS,
                      "--out", out)
    assert rc == 1
    assert "error:" in err and "bad.png" in err and "not an image" in err and "Traceback" not in err
    assert (out / "a_x.png").exists() and not (out / "bad_x.png").exists()


# ----------------------------------------------------------------------------- atomic writes
def test_atomic_write_never_leaves_partial_files(tmp_path):
    from gem_jax.io import atomic_write, save_image

    def boom(f):
        f.write(b"half")
        raise RuntimeError("disk on fire")

    target = tmp_path / "x.png"
    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert list(tmp_path.iterdir()) == []
    target.write_bytes(b"old")
    with pytest.raises(FileExistsError, match="--force"):
        save_image(Image.new("RGB", (2, 2)), target)
    with pytest.raises(RuntimeError):
        atomic_write(target, boom, force=True)
    assert target.read_bytes() == b"old" and len(list(tmp_path.iterdir())) == 1
    save_image(Image.new("RGB", (2, 2)), target, force=True)
    assert Image.open(target).size == (2, 2) and len(list(tmp_path.iterdir())) == 1


def test_interrupted_run_leaves_no_partial_file(capsys, ckpt, images, tmp_path, monkeypatch):
    from gem_jax import viz
    real = viz.grid

    def interrupted(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(viz, "grid", interrupted)
    out = tmp_path / "o"
    rc, so, err = run(capsys, "heatmap", images / "a.png", "-p", "x", "--model", ckpt, *KNOBS,
                      "--out", out)
    assert rc == 130 and "interrupted" in err
    assert leftovers(out) == [] and not (out / "a_grid.png").exists()


# ----------------------------------------------------------------------------- optional commands
def test_optional_commands_register(capsys, monkeypatch):
    def register(sub):
        p = sub.add_parser("bench", help="benchmarks")
        p.add_argument("--n", type=int, default=1)
        p.set_defaults(func=lambda args: print(f"bench n={args.n}") or 0)

    monkeypatch.setitem(sys.modules, "gem_jax.bench", types.SimpleNamespace(register=register))
    rc, so, err = run(capsys, "bench", "--n", "3")
    assert rc == 0 and "bench n=3" in so


def test_broken_optional_command_does_not_break_cli(capsys, monkeypatch):
    import importlib
    real = importlib.import_module

    def fake(name, *a, **k):
        if name == "gem_jax.eval.cli":
            raise ImportError("missing dependency foo")
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake)
    assert run(capsys, "models")[0] == 0
    rc, so, err = run(capsys, "eval")
    assert rc == 1 and err.startswith("error:") and "foo" in err
