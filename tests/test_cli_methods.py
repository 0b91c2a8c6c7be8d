"""`--method NAME` in `gem-jax heatmap` and `segment`: every method of gem_jax.METHODS runs from
the command line and gives what `model.heatmaps(method=...)` / `model.segment(method=...)` give;
GEM's knobs apply to gem only (given with another method: usage error, exit 2); an unknown
method is a usage error.  On a 6-block random checkpoint (GEM's default depth 7 and CLIP
Surgery's 6 blocks are valid)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

import gem_jax
from gem_jax import cli
from gem_jax.io import read_image

from test_cli import _script

SIZE = 32


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / "gem_jax_tiny6_ckpt"
    if not (path / "gem_jax_config.json").exists():
        _script().make_tiny_checkpoint(path, layers=6, seed=3)
    return path


@pytest.fixture(scope="module")
def model(ckpt):
    return gem_jax.load(ckpt)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    p = tmp_path_factory.mktemp("img") / "a.png"
    im = Image.new("RGB", (48, 40), (30, 120, 200))
    ImageDraw.Draw(im).ellipse([4, 4, 30, 26], fill=(250, 200, 0))
    im.save(p)
    return p


def run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("method", gem_jax.METHODS)
def test_every_method_runs_heatmap_and_segment(capsys, ckpt, model, image, tmp_path, method):
    prompts = ["a sun", "the sea"]
    px = model.preprocess([read_image(image)], size=SIZE)
    out = tmp_path / "h"
    rc, so, err = run(capsys, "heatmap", image, "-p", prompts[0], "-p", prompts[1], "--model", ckpt,
                      "--size", SIZE, "--method", method, "--format", "both", "--out", out)
    assert rc == 0, err
    raw = np.load(out / "a_raw.npy")
    want = np.asarray(model.heatmaps(px, prompts, method=method, normalize=False))[0]
    # Observed max |diff| 0.0 for every method (the same core function on the same pixels);
    # tolerance 1e-6.
    assert raw.shape == (2, SIZE, SIZE) and np.abs(raw - want).max() <= 1e-6
    assert (out / "a_grid.png").is_file() and (out / "a_the-sea.png").is_file()
    m = json.loads((out / "manifest.json").read_text())
    assert m["method"] == method
    cls = gem_jax.methods.METHODS[method]
    assert {k: m["knobs"][k] for k in cls.knob_names} == dict(cls.defaults)
    assert ("gem_depth" in m["knobs"]) == (method == "gem")

    seg = tmp_path / "s"
    rc, so, err = run(capsys, "segment", image, "-c", "sun", "-c", "sea", "-c", "sky", "--model", ckpt,
                      "--size", SIZE, "--method", method, "--format", "npy", "--out", seg,
                      "--background-threshold", "0.4")
    assert rc == 0, err
    ids = np.load(seg / "a_seg.npy")
    assert ids.shape == (40, 48) and ids.dtype == np.int32 and 0 <= ids.min() and ids.max() <= 3
    assert json.loads((seg / "manifest.json").read_text())["method"] == method
    if method in ("gem", "naclip"):  # the library's segment (one more compilation per method)
        want = np.asarray(model.segment(px, ["sun", "sea", "sky"], method=method,
                                        background_threshold=0.4))[0]
        want = np.asarray(Image.fromarray(want).resize((48, 40), Image.NEAREST))
        # The CLI's class ids equal the library's (on this random tiny model the background
        # threshold may leave a single class, so no assertion on how many classes appear;
        # test_methods_differ checks that --method reaches the model).
        assert np.array_equal(ids, want)


def test_methods_differ(capsys, ckpt, image, tmp_path):
    """Teeth: --method reaches the model (GEM's and MaskCLIP's maps differ far beyond 1e-6)."""
    maps = {}
    for method in ("gem", "maskclip"):
        out = tmp_path / method
        assert run(capsys, "heatmap", image, "-p", "x", "--model", ckpt, "--size", SIZE,
                   "--method", method, "--format", "npy", "--out", out)[0] == 0
        maps[method] = np.load(out / "a_raw.npy")
    assert np.abs(maps["gem"] - maps["maskclip"]).max() > 1e-3


@pytest.mark.parametrize("flag,value", [("--gem-depth", "3"), ("--iters", "2"),
                                        ("--temp", "adaptive")])
@pytest.mark.parametrize("command,target", [("heatmap", "-p"), ("segment", "-c")])
def test_gem_knob_with_another_method_is_a_usage_error(capsys, ckpt, image, tmp_path, flag,
                                                      value, command, target):
    out = tmp_path / "o"
    rc, so, err = run(capsys, command, image, target, "x", "--model", ckpt, "--size", SIZE,
                      "--method", "maskclip", flag, value, "--out", out)
    assert rc == 2 and f"{flag} does not apply to method 'maskclip'" in err, err
    assert "Traceback" not in err and not out.exists()


def test_gem_knobs_apply_to_gem(capsys, ckpt, image, tmp_path):
    out = tmp_path / "o"
    rc, so, err = run(capsys, "heatmap", image, "-p", "x", "--model", ckpt, "--size", SIZE,
                      "--method", "gem", "--gem-depth", "3", "--iters", "2", "--temp", "1.5",
                      "--out", out)
    assert rc == 0, err
    k = json.loads((out / "manifest.json").read_text())["knobs"]
    assert (k["gem_depth"], k["ss_attn_iter"], k["ss_attn_temp"]) == (3, 2, 1.5)


@pytest.mark.parametrize("command,target", [("heatmap", "-p"), ("segment", "-c")])
def test_unknown_method_exit_2(capsys, image, command, target):
    rc, so, err = run(capsys, command, image, target, "x", "--method", "nosuch")
    assert rc == 2 and "invalid choice: 'nosuch'" in err and "maskclip" in err


def test_knob_flag_sets_the_methods_own_knobs(capsys, ckpt, model, image, tmp_path):
    px = model.preprocess([read_image(image)], size=SIZE)
    out = tmp_path / "n"
    rc, so, err = run(capsys, "heatmap", image, "-p", "x", "--model", ckpt, "--size", SIZE,
                      "--method", "naclip", "--knob", "gaussian_std=2", "--format", "npy",
                      "--out", out)
    assert rc == 0, err
    want = np.asarray(model.heatmaps(px, ["x"], method="naclip", gaussian_std=2.0,
                                     normalize=False))[0]
    default = np.asarray(model.heatmaps(px, ["x"], method="naclip", normalize=False))[0]
    raw = np.load(out / "a_raw.npy")
    # Observed max |diff| 0.0; tolerance 1e-6.  Teeth: the default std gives other maps.
    assert np.abs(raw - want).max() <= 1e-6 and np.abs(raw - default).max() > 1e-4
    assert json.loads((out / "manifest.json").read_text())["knobs"]["gaussian_std"] == 2.0
    rc, so, err = run(capsys, "heatmap", image, "-p", "x", "--model", ckpt, "--size", SIZE,
                      "--method", "maskclip", "--knob", "gaussian_std=2", "--out", tmp_path / "m")
    assert rc == 2 and "gaussian_std does not apply to method 'maskclip'" in err, err
    assert not (tmp_path / "m").exists()
    rc, so, err = run(capsys, "heatmap", image, "-p", "x", "--knob", "gaussian_std")
    assert rc == 2 and "expected KEY=VALUE" in err
