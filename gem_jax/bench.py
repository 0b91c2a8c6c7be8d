"""Side-by-side benchmark: gem-jax vs the PyTorch reference (gem_torch on open_clip).

    gem-jax bench [--cases NAME ...] [--repeats 5] [--half bfloat16] [--out benchmarks/results]

Each (case, implementation) runs in a fresh worker process, so its peak RSS is its own; both use
the same random-weight checkpoint (or `--model DIR`) and the same inputs, and the parent reports
the max abs difference of the outputs.  Latency is the median after warm-up; jax compile time is
reported apart.  GFLOP/s use the nominal GEM FLOP count (upstream's arithmetic, see `gem_flops`)
and are compared with this machine's jit matmul rate measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

PROMPTS = ["cat", "remote control", "a red car", "tree", "person"]


@dataclass(frozen=True)
class Case:
    name: str
    arch: str  # open_clip model name
    size: int
    batch: int
    prompts: int


CASES = [
    Case("B16@224 b1", "ViT-B-16", 224, 1, 2),
    Case("B16@448 b1", "ViT-B-16", 448, 1, 2),
    Case("B16@448 b8", "ViT-B-16", 448, 8, 5),
    Case("B16@672 b1", "ViT-B-16", 672, 1, 2),
    Case("L14@448 b1", "ViT-L-14", 448, 1, 2),
    Case("B32@448 b8", "ViT-B-32", 448, 8, 5),
]


def gem_flops(cfg, size: int, gem_depth: int = 7, iters: int = 1, prompts: int = 2) -> dict:
    """Nominal FLOPs per image (2 per multiply-add) of GEM on a ViT, as upstream computes it:
    the full ViT, plus per GEM block 3 branches × (iters+1 similarity products, iters refinement
    products, 1 product with v) and the output projection."""
    v = cfg.vision
    n = 1 + (size // v.patch_size) ** 2
    d, m = v.width, v.mlp_dim
    vit = 2 * n * 3 * v.patch_size ** 2 * d  # patch embedding
    vit += v.layers * (2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * m)
    g = gem_depth - 1
    gem = g * (3 * (2 * iters + 2) * 2 * n * n * d + 2 * n * d * d)
    head = 2 * 2 * n * d * cfg.embed_dim  # ln_post + proj on both streams
    return {"vit": vit + head, "gem": gem, "total": vit + head + gem}


def _peak_rss_mb() -> float:
    """This process's peak resident memory.  VmHWM, not getrusage's ru_maxrss: the latter
    survives exec, so a worker would report its parent's (larger) peak from before the fork."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _reset_peak_rss() -> None:
    """Start a new VmHWM window (Linux: writing 5 to clear_refs), to measure the run phase alone."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _pixels(case: Case, seed=0):
    return np.random.default_rng(seed).standard_normal(
        (case.batch, case.size, case.size, 3)).astype(np.float32)


def _prompts(case: Case):
    return PROMPTS[: case.prompts]


# ----------------------------------------------------------------------------- workers
def _work_jax(case: Case, ckpt: str, repeats: int, out: str, gem_depth: int = 7,
              dtype: str = "float32") -> dict:
    import jax
    import jax.numpy as jnp
    import gem_jax
    m = gem_jax.load(ckpt, dtype=jnp.dtype(dtype))
    px = jax.device_put(_pixels(case))
    emb = m.encode_text([f"a photo of a {p}." for p in _prompts(case)])
    fn = gem_jax.heatmaps_fn
    args = (m.params, px, emb, np.int32(gem_depth), np.int32(1), None)
    kw = dict(cfg=m.config, ex=m.execution)
    load_peak = _peak_rss_mb()
    t = time.perf_counter()
    compiled = fn.lower(*args, **kw).compile()
    compile_s = time.perf_counter() - t
    _reset_peak_rss()
    compiled(*args).block_until_ready()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        res = compiled(*args).block_until_ready()
        times.append(time.perf_counter() - t)
    np.save(out, np.asarray(res))
    return dict(times=times, compile_s=compile_s, load_peak_rss_mb=load_peak,
                run_peak_rss_mb=_peak_rss_mb())


def _work_torch(case: Case, ckpt: str, repeats: int, out: str) -> dict:
    import torch
    import gem as gem_torch
    import open_clip
    from safetensors.torch import load_file
    torch.set_num_threads(os.cpu_count() or 1)
    # On the same kind of device as gem-jax: a CUDA GPU when torch sees one (float32 matmuls,
    # torch's default: no TF32), else the CPU.
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = open_clip.create_model(case.arch, pretrained=None)
    model.load_state_dict(load_file(str(Path(ckpt) / "open_clip_model.safetensors")))
    wrapper = gem_torch.GEMWrapper(model.eval().to(dev), open_clip.get_tokenizer(case.arch))
    px = torch.from_numpy(_pixels(case)).permute(0, 3, 1, 2).contiguous().to(dev)
    prompts = _prompts(case)

    def run():
        with torch.no_grad():
            if case.batch == 1:
                out = wrapper(px, prompts)
            else:
                out = torch.stack(wrapper.batched_forward(px, [prompts] * case.batch))
        if dev == "cuda":
            torch.cuda.synchronize()
        return out
    load_peak = _peak_rss_mb()
    _reset_peak_rss()
    run()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        res = run()
        times.append(time.perf_counter() - t)
    np.save(out, res.cpu().numpy())
    return dict(times=times, compile_s=0.0, device=dev, load_peak_rss_mb=load_peak,
                run_peak_rss_mb=_peak_rss_mb())


def matmul_rate(sizes=(1024, 1536, 2048), repeats: int = 10, dtype: str = "float32") -> float:
    """This machine's jit matmul rate (GFLOP/s) in `dtype` (operands; accumulation and result in
    float32, as our half-precision path runs): the best over square sizes of the median of
    `repeats` runs (the rate varies with size; the best one is the demanding denominator)."""
    import jax
    import jax.numpy as jnp
    f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    if jax.default_backend() != "cpu":
        sizes = (4096, 8192)  # accelerators: sizes that fill the chip
    best = 0.0
    for n in sizes:
        a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
        f(a, a).block_until_ready()
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            f(a, a).block_until_ready()
            ts.append(time.perf_counter() - t)
        best = max(best, 2 * n ** 3 / float(np.median(ts)) / 1e9)
    return best


# ----------------------------------------------------------------------------- driver
def _checkpoint(arch: str, cache: Path) -> Path:
    """A random-weight open_clip checkpoint of `arch` in the OpenCLIP hub layout (cached)."""
    d = cache / arch
    if (d / "open_clip_model.safetensors").exists():
        return d
    import open_clip
    import torch
    from safetensors.torch import save_file
    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None)
    with torch.no_grad():  # no parameter left at a trivial init
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    tmp = Path(tempfile.mkdtemp(dir=cache))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(tmp / "open_clip_model.safetensors"))
    (tmp / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": open_clip.get_model_config(arch),
         "preprocess_cfg": {"mean": list(model.visual.image_mean), "std": list(model.visual.image_std)}}))
    tmp.rename(d)
    return d


def _spawn(impl: str, case: Case, ckpt: Path, repeats: int, out: Path,
           dtype: str = "float32") -> dict:
    cmd = [sys.executable, "-m", "gem_jax.bench", "--worker", impl, "--case", case.name,
           "--model", str(ckpt), "--repeats", str(repeats), "--npy", str(out), "--dtype", dtype]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{impl} worker failed on {case.name}:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_cases(cases, repeats: int, cache: Path, with_torch: bool = True, model: str | None = None,
              half: tuple = ()):
    """fp32 rows (gem-jax vs gem_torch) and, for each dtype in `half`, the same case in that
    compute dtype beside gem-jax fp32: speedup, share of that dtype's matmul rate, and accuracy
    of its normalized maps against fp32 (max |Δ|, share of pixels whose argmax prompt agrees)."""
    import gem_jax
    cache.mkdir(parents=True, exist_ok=True)
    rate = matmul_rate()
    rates = {dt: matmul_rate(dtype=dt) for dt in half}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            ckpt = Path(model) if model else _checkpoint(case.arch, cache)
            cfg = gem_jax.convert.read_config(ckpt, gem_jax.convert.detect(ckpt)[0])
            flops = gem_flops(cfg, case.size, prompts=case.prompts)
            row = dict(case=asdict(case), gflop_per_image=flops["total"] / 1e9)
            for impl in (["jax", "torch"] if with_torch else ["jax"]):
                out = Path(tmp) / f"{impl}.npy"
                res = _spawn(impl, case, ckpt, repeats, out)
                med = float(np.median(res["times"]))
                row[impl] = dict(res, median_s=med, images_per_s=case.batch / med,
                                 gflops=flops["total"] * case.batch / med / 1e9)
                row[impl]["share_of_matmul_rate"] = row[impl]["gflops"] / rate
            if with_torch:
                a, b = np.load(Path(tmp) / "jax.npy"), np.load(Path(tmp) / "torch.npy")
                row["max_abs_diff"] = float(np.abs(a - b).max())
                row["speedup"] = row["torch"]["median_s"] / row["jax"]["median_s"]
            ref = np.load(Path(tmp) / "jax.npy")
            for dt in half:
                out = Path(tmp) / f"jax-{dt}.npy"
                res = _spawn("jax", case, ckpt, repeats, out, dt)
                med = float(np.median(res["times"]))
                h = np.load(out).astype(np.float32)
                gf = flops["total"] * case.batch / med / 1e9
                row[dt] = dict(res, median_s=med, images_per_s=case.batch / med, gflops=gf,
                               share_of_matmul_rate=gf / rates[dt],
                               speedup_vs_fp32=row["jax"]["median_s"] / med,
                               max_abs_diff_vs_fp32=float(np.abs(h - ref).max()),
                               argmax_agreement=float((h.argmax(1) == ref.argmax(1)).mean()),
                               finite=bool(np.isfinite(h).all()))
            rows.append(row)
            print(_row_md(row), flush=True)
    return dict(machine=_machine(), matmul_gflops=rate, half_matmul_gflops=rates,
                repeats=repeats, rows=rows)


def _machine() -> dict:
    import jax
    cpu, model, flags = platform.processor() or "", None, None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model is None:
                cpu = model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and flags is None:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    out = dict(cpu=cpu, cores=os.cpu_count(), backend=jax.default_backend(),
               device=jax.devices()[0].device_kind, jax=jax.__version__,
               matmul_precision=str(jax.config.jax_default_matmul_precision or "default"),
               python=platform.python_version())
    if flags is not None:
        # Half precision is only fast on CPUs with native bf16 dot products; without them XLA
        # converts to float32 first and bf16 is slower than float32 (seen on an AVX2-only host).
        out["native_bf16"] = sorted(flags & {"avx512_bf16", "amx_bf16", "avx_ne_convert"})
        out["avx512"] = "avx512f" in flags
    return out


HEADER = ("| case | gem-jax median s | gem_torch median s | speedup | gem-jax img/s | compile s | "
          "GFLOP/s (share of matmul) | run peak RSS MB jax / torch | max abs diff |\n"
          "|---|---|---|---|---|---|---|---|---|")


def _row_md(row) -> str:
    j, t = row["jax"], row.get("torch")
    tm = f"{t['median_s']:.3f}" if t else "-"
    sp = f"{row['speedup']:.2f}x" if t else "-"
    rss = (f"{j['run_peak_rss_mb']:.0f} / {t['run_peak_rss_mb']:.0f}" if t
           else f"{j['run_peak_rss_mb']:.0f}")
    diff = f"{row['max_abs_diff']:.1e}" if t else "-"
    return (f"| {row['case']['name']} | {j['median_s']:.3f} | {tm} | {sp} | {j['images_per_s']:.2f} | "
            f"{j['compile_s']:.2f} | {j['gflops']:.0f} ({100 * j['share_of_matmul_rate']:.0f}%) | "
            f"{rss} | {diff} |")


def to_markdown(result) -> str:
    m = result["machine"]
    torch_dev = next((r["torch"]["device"] for r in result["rows"] if "device" in r.get("torch", {})),
                     None)
    where = f"backend {m['backend']} ({m.get('device', '?')})"
    if m["backend"] != "cpu":
        where += f", jax matmul precision {m.get('matmul_precision', 'default')}"
    if torch_dev:
        where += f", gem_torch on {torch_dev}"
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {where}, jax {m['jax']}; "
             f"jit fp32 matmul rate {result['matmul_gflops']:.0f} GFLOP/s; median of "
             f"{result['repeats']} runs after warm-up; GFLOP/s on the nominal GEM FLOP count; "
             f"run peak RSS = peak resident memory of the worker process while running (after "
             f"loading; load peaks are in the JSON).", "", HEADER]
    lines += [_row_md(r) for r in result["rows"]]
    for dt, r in result.get("half_matmul_gflops", {}).items():
        lines += ["", f"Half precision ({dt} operands, float32 accumulation, softmax and LayerNorm "
                      f"statistics; same run): {dt} matmul rate {r:.0f} GFLOP/s vs float32 "
                      f"{result['matmul_gflops']:.0f} GFLOP/s; CPU bf16 dot instructions: "
                      f"{', '.join(m.get('native_bf16') or ['none'])}.", "", HALF_HEADER]
        lines += [_half_md(row, dt) for row in result["rows"] if dt in row]
    return "\n".join(lines) + "\n"


HALF_HEADER = ("| case | fp32 median s | half median s | speedup | GFLOP/s (share of half matmul) | "
               "max abs diff of normalized maps vs fp32 | argmax agreement |\n"
               "|---|---|---|---|---|---|---|")


def _half_md(row, dt) -> str:
    h = row[dt]
    return (f"| {row['case']['name']} | {row['jax']['median_s']:.3f} | {h['median_s']:.3f} | "
            f"{h['speedup_vs_fp32']:.2f}x | {h['gflops']:.0f} ({100 * h['share_of_matmul_rate']:.0f}%) | "
            f"{h['max_abs_diff_vs_fp32']:.1e} | {100 * h['argmax_agreement']:.2f}% |")


# ----------------------------------------------------------------------------- CLI
def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="gem-jax bench")
    p.description = "Benchmark gem-jax against gem_torch on the same checkpoint and inputs."
    p.epilog = ("examples:\n  gem-jax bench\n  gem-jax bench --cases 'B16@448 b1' --repeats 3\n"
                "  gem-jax bench --no-torch --model ckpt/b16")
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--cases", nargs="*", default=None, choices=[c.name for c in CASES],
                   help="cases to run (default: all)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results", help="writes OUT.json and OUT.md")
    p.add_argument("--cache", default=os.path.expanduser("~/.cache/gem_jax/bench"),
                   help="where random-weight checkpoints are kept")
    p.add_argument("--model", default=None, help="use this checkpoint for every case")
    p.add_argument("--no-torch", action="store_true", help="run gem-jax only")
    p.add_argument("--half", nargs="*", default=[], choices=["bfloat16", "float16"],
                   help="also run gem-jax in these compute dtypes beside float32 (rows with "
                        "speedup, matmul-rate share and accuracy vs float32)")
    p.add_argument("--force", action="store_true", help="overwrite existing result files")
    # internal: one measurement in a fresh process
    p.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--npy", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    return p


def run(args) -> int:
    if args.worker:
        case = next(c for c in CASES if c.name == args.case)
        if args.worker == "jax":
            res = _work_jax(case, args.model, args.repeats, args.npy, dtype=args.dtype)
        else:
            res = _work_torch(case, args.model, args.repeats, args.npy)
        print(json.dumps(res))
        return 0
    out = Path(args.out)
    paths = [out.with_suffix(".json"), out.with_suffix(".md")]
    if not args.force and any(p.exists() for p in paths):
        print(f"error: {paths[0]} or {paths[1]} exists; pass --force to overwrite", file=sys.stderr)
        return 1
    cases = [c for c in CASES if args.cases is None or c.name in args.cases]
    print(HEADER, flush=True)
    try:
        result = run_cases(cases, args.repeats, Path(args.cache), not args.no_torch, args.model,
                           tuple(args.half))
    except (RuntimeError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((paths[0], json.dumps(result, indent=2)), (paths[1], to_markdown(result))):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    print(f"wrote {paths[0]} and {paths[1]}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmark against gem_torch")
    build_parser(p)
    p.set_defaults(func=run)


def main(argv=None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
