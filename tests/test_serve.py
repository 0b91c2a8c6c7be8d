"""`gem-jax serve`: started on 127.0.0.1 (a free port) in its own process and driven end to end
through its HTTP API with gradio_client, on the bundled toy model (offline); then stopped."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import gem_jax
from gem_jax import scenes, serve

STARTUP_S = 240   # loading jax + the model + gradio on a busy 2-core machine
CALL_S = 240      # first call compiles


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A running `gem-jax serve` (toy model) and a connected gradio_client.Client."""
    from gradio_client import Client
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    port = free_port()
    exe = Path(sys.executable).with_name("gem-jax")
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", JAX_PLATFORMS="cpu")
    with open(log, "wb") as f:
        proc = subprocess.Popen([str(exe), "serve", "--host", "127.0.0.1", "--port", str(port)],
                                stdout=f, stderr=subprocess.STDOUT, env=env)
    try:
        deadline, client = time.monotonic() + STARTUP_S, None
        while client is None:
            if proc.poll() is not None:
                pytest.fail(f"gem-jax serve exited with {proc.returncode}:\n{log.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"gem-jax serve did not answer within {STARTUP_S} s:\n{log.read_text()}")
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False,
                                download_files=str(tmp_path_factory.mktemp("downloads")))
            except Exception:
                time.sleep(1.0)
        yield client, proc, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def call(client, image_path, prompts, *, method="gem", depth=7, iters=1, temp="5", size=64,
         template="a photo of a {}.", contrast=True, alpha=0.5):
    from gradio_client import handle_file
    job = client.submit(handle_file(str(image_path)), prompts, method, depth, iters, temp, size,
                        template, contrast, alpha, api_name="/heatmaps")
    return job.result(timeout=CALL_S)


def test_serve_end_to_end(server, tmp_path):
    client, proc, log = server
    s = scenes.scene(3, seed=0, split="test", size=256)   # a purple cross, orange square, green star
    path = tmp_path / "scene.png"
    s.pil().save(path)
    prompts = [scenes.prompt(c, sh) for c, sh in s.objects]
    overlays, info = call(client, path, "\n".join(prompts))
    assert [o["caption"] for o in overlays] == prompts
    images = [np.asarray(Image.open(o["image"]).convert("RGB")) for o in overlays]
    assert all(im.shape == (256, 256, 3) for im in images)
    assert not np.array_equal(images[0], images[1])
    assert info["map_shape"] == [3, 64, 64] and info["image_size"] == [256, 256]
    assert info["ss_attn_temp"] == 5.0 and info["gem_depth"] == 7 and info["method"] == "gem"
    # The toy localizes by colour: each prompt's hottest point lies on its own object.
    for (x, y), mask, name in zip(info["peaks_xy"], s.masks, prompts):
        assert mask[int(y), int(x)], (name, x, y)
    # Knobs reach the model: adaptive temperature, comma-separated prompts, another depth.
    overlays2, info2 = call(client, path, "purple cross, green star", temp="adaptive", depth=4,
                            contrast=False)
    assert info2["prompts"] == ["purple cross", "green star"] and info2["ss_attn_temp"] is None
    assert info2["gem_depth"] == 4 and len(overlays2) == 2
    assert proc.poll() is None


def test_serve_reports_bad_input(server, tmp_path):
    from gradio_client.exceptions import AppError
    client, proc, log = server
    path = tmp_path / "i.png"
    Image.new("RGB", (30, 20), (200, 30, 30)).save(path)
    with pytest.raises(AppError, match="at least one prompt"):
        call(client, path, " , \n")
    with pytest.raises(AppError, match="smaller than one 8-pixel patch"):
        call(client, path, "red circle", size=4)
    with pytest.raises(AppError, match="temperature"):
        call(client, path, "red circle", temp="hot")
    assert proc.poll() is None                       # still serving


# ----------------------------------------------------------------------------- without a server
class StubModel:
    """Records the keywords model.heatmaps gets."""

    class config:
        class vision:
            patch_size, layers = 8, 6

    def __init__(self):
        self.calls = []

    def preprocess(self, images, size):
        return np.zeros((len(images), size, size, 3), np.float32)

    def heatmaps(self, pixels, texts, **kw):
        self.calls.append(kw)
        return np.random.default_rng(0).random((1, len(texts), 8, 8)).astype(np.float32)


def test_method_is_passed_only_when_not_gem():
    m = StubModel()
    demo = serve.Demo(m, "stub", toy=False)
    img = Image.new("RGB", (16, 16))
    demo.heatmaps(img, "a", "gem", 3, 1, "adaptive", 16, "{}", False, 0.5)
    demo.heatmaps(img, "a", "clip_surgery", 3, 1, "adaptive", 16, "{}", False, 0.5)
    assert "method" not in m.calls[0] and m.calls[1]["method"] == "clip_surgery"


def test_method_choices_come_from_the_library(monkeypatch):
    from gem_jax.cli import build_parser, method_names
    assert method_names() == tuple(getattr(gem_jax, "METHODS", ("gem",)))
    monkeypatch.setattr(gem_jax, "METHODS", ("gem", "maskclip", "clip_surgery"), raising=False)
    assert method_names() == ("gem", "maskclip", "clip_surgery")
    app = serve.build_app(serve.Demo(StubModel(), "stub", toy=False), size=64, gem_depth=3,
                          iters=1, temp=None)
    dropdowns = [b for b in app.blocks.values() if type(b).__name__ == "Dropdown"]
    assert [c[0] for c in dropdowns[0].choices] == ["gem", "maskclip", "clip_surgery"]
    args = build_parser().parse_args(["heatmap", "x.png", "-p", "a", "--method", "maskclip"])
    assert args.method == "maskclip"


def test_serve_without_gradio_says_how_to_install(capsys, monkeypatch):
    from gem_jax import cli
    monkeypatch.setitem(sys.modules, "gradio", None)     # import gradio -> ImportError
    rc = cli.main(["serve"])
    err = capsys.readouterr().err
    assert rc == 1 and 'pip install "gem-jax[demo]"' in err and "Traceback" not in err
