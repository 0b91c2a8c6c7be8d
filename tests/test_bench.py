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


def test_half_precision_rows_speedup_and_accuracy(hf_tiny, tmp_path, monkeypatch):
    """--half bfloat16 adds a row per case: speedup vs gem-jax fp32, the share of the bf16 matmul
    rate, max |Δ| of normalized maps vs fp32 and the share of pixels whose argmax prompt agrees."""
    import numpy as np
    _, ckpt = hf_tiny
    monkeypatch.setattr(bench, "CASES", [bench.Case("tiny@8 b1", "none", 8, 1, 2)])
    monkeypatch.setattr(bench, "gem_flops", lambda cfg, size, **kw: {"total": 1e9})
    ref = np.zeros((1, 2, 2, 2), np.float32)
    ref[0, 0] = 1.0                                     # prompt 0 wins everywhere in fp32
    half = ref.copy()
    half[0, 1, 0, 0] = 2.0                              # one of 4 pixels flips in bf16
    monkeypatch.setattr(bench, "matmul_rate", lambda dtype="float32", **kw: 100.0 if dtype == "float32" else 200.0)

    def spawn(impl, case, ck, repeats, out, dtype="float32"):
        np.save(out, half if dtype == "bfloat16" else ref)
        t = [0.1, 0.1, 0.1] if dtype == "bfloat16" else [0.3, 0.3, 0.3]
        return dict(times=t, compile_s=0.5, load_peak_rss_mb=10.0, run_peak_rss_mb=12.0)
    monkeypatch.setattr(bench, "_spawn", spawn)
    out = tmp_path / "r"
    assert bench.main(["--no-torch", "--model", str(ckpt), "--out", str(out), "--half",
                       "bfloat16"]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    h = res["rows"][0]["bfloat16"]
    assert abs(h["speedup_vs_fp32"] - 3.0) < 1e-9 and h["max_abs_diff_vs_fp32"] == 2.0
    assert h["argmax_agreement"] == 0.75 and res["half_matmul_gflops"] == {"bfloat16": 200.0}
    assert abs(h["share_of_matmul_rate"] - 0.05) < 1e-9     # 10 GFLOP/s of 200
    assert "| tiny@8 b1 | 0.300 | 0.100 | 3.00x |" in out.with_suffix(".md").read_text()


def test_worker_runs_in_bfloat16(hf_tiny, tmp_path):
    import numpy as np
    _, ckpt = hf_tiny
    case = bench.Case("tiny", "none", 64, 1, 2)
    res = bench._work_jax(case, str(ckpt), 1, str(tmp_path / "o.npy"), gem_depth=3,
                          dtype="bfloat16")
    out = np.load(tmp_path / "o.npy")
    assert out.dtype == np.float32 and np.isfinite(out).all() and len(res["times"]) == 1
