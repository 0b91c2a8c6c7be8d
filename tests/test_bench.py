"""The benchmark harness (the measurements themselves run with `gem-jax bench`, not in tests)."""

import json

import gem_jax
from gem_jax import bench


def test_nominal_flop_count_matches_upstream_arithmetic():
    f = bench.gem_flops(gem_jax.preset("ViT-B-16"), 448)
    # ViT-B/16 @448: 785 tokens; ≈158 GFLOP in the ViT and ≈74 in GEM's extra attention.
    assert abs(f["vit"] / 1e9 - 158) < 2 and abs(f["gem"] / 1e9 - 74) < 1
    assert abs(f["total"] / 1e9 - 232) < 2


def test_jax_only_run_writes_json_and_markdown(hf_tiny, tmp_path, monkeypatch):
    _, ckpt = hf_tiny
    monkeypatch.setattr(bench, "CASES", [bench.Case("tiny@64 b2", "none", 64, 2, 2)])
    monkeypatch.setattr(bench, "gem_flops", lambda cfg, size, **kw: {"total": 1e9})
    monkeypatch.setattr(bench, "_spawn", lambda impl, case, ck, repeats, out: (
        __import__("numpy").save(out, __import__("numpy").zeros(3)),
        dict(times=[0.1, 0.2, 0.3], compile_s=0.5, load_peak_rss_mb=10.0, run_peak_rss_mb=12.0))[1])
    out = tmp_path / "r"
    assert bench.main(["--no-torch", "--model", str(ckpt), "--out", str(out), "--repeats", "3"]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    row = res["rows"][0]
    assert row["jax"]["median_s"] == 0.2 and row["jax"]["images_per_s"] == 10.0
    assert res["matmul_gflops"] > 0
    assert "| tiny@64 b2 | 0.200 |" in out.with_suffix(".md").read_text()
    assert bench.main(["--no-torch", "--model", str(ckpt), "--out", str(out)]) == 1  # no overwrite


def test_worker_measures_a_real_run(hf_tiny, tmp_path):
    _, ckpt = hf_tiny
    case = bench.Case("tiny", "none", 64, 1, 2)
    res = bench._work_jax(case, str(ckpt), 2, str(tmp_path / "o.npy"), gem_depth=3)
    assert len(res["times"]) == 2 and res["compile_s"] > 0 and res["run_peak_rss_mb"] > 0
