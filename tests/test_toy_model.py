"""The bundled toy CLIP (gem_jax/assets/toy_clip): size, zero-shot sanity, the localization
benchmark's margin, its HF export, and `gem-jax demo`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from gem_jax import demo, scenes

ROOT = Path(__file__).resolve().parents[1]
MAX_BYTES = 5_000_000


@pytest.fixture(scope="module")
def toy():
    return demo.toy_model()


def test_asset_is_small_fp16_and_documented():
    from safetensors.numpy import load_file
    d = demo.TOY_MODEL_DIR
    total = sum(p.stat().st_size for p in d.iterdir() if p.is_file())
    assert total <= MAX_BYTES, total
    tensors = load_file(str(d / "params.safetensors"))
    assert {t.dtype for t in tensors.values()} == {np.dtype(np.float16)}
    assert tensors["text.token_embed"].shape == (49408, 32)  # the full CLIP vocabulary
    readme = (d / "README.md").read_text()
    assert "toy" in readme and "train_toy.py" in readme and "seed" in readme
    meta = json.loads((d / "gem_jax_config.json").read_text())
    assert meta["config"]["vision"]["image_size"] == 64


def test_zero_shot_colour_and_shape(toy):
    """Single-object held-out scenes classified among the 30 class prompts."""
    ss = [s for s in scenes.scenes(120, seed=2, split="test") if len(s.objects) == 1]
    img = toy.encode_image(toy.preprocess([s.pil() for s in ss], size=64))
    txt = toy.encode_text(list(demo.CLASS_PROMPTS))
    img = img / np.linalg.norm(img, axis=-1, keepdims=True)
    txt = txt / np.linalg.norm(txt, axis=-1, keepdims=True)
    pred = np.asarray(img @ txt.T).argmax(1)
    names = [(c, s) for c in scenes.COLORS for s in scenes.SHAPES]
    colour = np.mean([names[p][0] == s.objects[0][0] for p, s in zip(pred, ss)])
    shape = np.mean([names[p][1] == s.objects[0][1] for p, s in zip(pred, ss)])
    assert colour >= 0.9, colour
    assert shape >= 0.3, shape  # chance is 0.2: shape is learned only weakly


def test_localization_benchmark_gem_beats_raw_tokens(toy, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import localization
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    res = localization.evaluate(toy, n=200, val=100)
    with capsys.disabled():
        print("\n" + localization.table(res))
    rows = {r["key"] if r["temp"] is not None or r["key"] == "ori" else "gem-adaptive": r
            for r in res["rows"]}
    assert res["settings"]["n"] >= 200
    gem, ori = rows["gem"]["subtract"], rows["ori"]["subtract"]
    assert gem["miou"] >= ori["miou"] + 0.2, (gem, ori)
    assert gem["pointing"] > ori["pointing"]


def test_toy_exports_to_transformers(toy, tmp_path):
    import torch
    import transformers
    from gem_jax.convert import save_hf
    out = save_hf(tmp_path / "hf", toy.config, toy.params, toy.tokenizer)
    ref = transformers.CLIPModel.from_pretrained(out).eval()
    s = scenes.scenes(2, seed=0, split="test")
    px = toy.preprocess([x.pil() for x in s], size=64)
    ids = toy.tokenize([x.caption for x in s])
    with torch.no_grad():
        fi = ref.get_image_features(pixel_values=torch.from_numpy(px).permute(0, 3, 1, 2))
        ft = ref.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64)))
    fi = fi.pooler_output if hasattr(fi, "pooler_output") else fi
    ft = ft.pooler_output if hasattr(ft, "pooler_output") else ft
    assert np.abs(np.asarray(toy.encode_image(px)) - fi.numpy()).max() <= 1e-4
    assert np.abs(np.asarray(toy.encode_text([x.caption for x in s])) - ft.numpy()).max() <= 1e-4


def test_demo_command(tmp_path, capsys):
    from gem_jax.cli import main
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--n", "2", "--quiet"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["manifest.json", "scene_0.png", "scene_0_grid.png", "scene_1.png",
                     "scene_1_grid.png"]
    assert main(["demo", "--out", str(out), "--n", "2"]) == 1  # refuses to overwrite
    assert "already exists" in capsys.readouterr().err
    assert main(["demo", "--out", str(out), "--n", "1", "--force", "--no-subtract-mean"]) == 0


def test_toy_heatmaps_subtract_option(toy):
    s = scenes.scene(0, seed=0, split="test")
    px = toy.preprocess(s.pil(), size=64)
    prompts = [demo.object_prompt(*o) for o in s.objects]
    a = demo.toy_heatmaps(toy, px, prompts)
    b = demo.toy_heatmaps(toy, px, prompts, subtract_class_mean=False)
    plain = toy.heatmaps(px, prompts, template=None, **demo.TOY_KNOBS)
    assert a.shape == b.shape == (1, len(prompts), 64, 64)
    np.testing.assert_allclose(b, np.asarray(plain), atol=1e-5)
    assert 0.0 <= a.min() and a.max() <= 1.0
