#!/usr/bin/env python
"""Is the input pipeline hidden behind compute?  End-to-end images/s of `gem-jax heatmap` (grain
decoding + GEM preprocessing, the SPMD step, writing outputs) against the model-only images/s
of the same compiled step on the same batches, already decoded and in memory.

    python benchmarks/pipeline.py                     # 200 generated JPEGs, toy model @160, ~5 min
    python benchmarks/pipeline.py --size 112 --repeats 5 --formats npy,png --json out.json

Images: `--images` generated scenes (gem_jax.scenes, "test" split) of mixed sizes (about
240..640 px a side), saved as JPEG (quality 90) in a temporary folder.  Model: the bundled toy
CLIP by default (`--model DIR` for another checkpoint), GEM at its defaults, two prompts.

Each repeat runs, in an order that rotates between repeats (this machine is shared):
* model: the step (`gem_jax.distributed.heatmap_step`, the same compiled program the command
  runs) over the same batches, preprocessed beforehand and in memory: the first batch apart
  (compilation), then each next batch dispatched while the previous one computes, as the
  command does, until the last is ready;
* pipeline (npy): `gem-jax heatmap --format npy` in this process (`gem_jax.cli.run_images`),
  its images/s after the first step (which includes compiling) until the last output is
  written, outputs = raw maps;
* pipeline (png), with `--formats npy,png`: the same with `--format png` (overlays and a grid per
  image; rendering PNGs is CPU work that a CPU-only machine shares with the model).

On a CPU backend the "device" is the host's own cores: decoding (about 5 ms of CPU per
240..640 px JPEG here) competes with the model for them, so the ratio is bounded by
1 / (1 + decode time / model time) even when the device never waits for input (host wait 0%).
Medians over the repeats; ratio = pipeline / model.  Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "gem_jax" / "assets" / "toy_clip"
PROMPTS = ["a photo of a red circle.", "a photo of a blue square."]


def make_images(d: Path, n: int, seed: int = 0) -> list[Path]:
    from PIL import Image
    from gem_jax import scenes
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        side = int(rng.integers(240, 640))
        s = scenes.scene(i, seed=seed, split="test", size=256)
        w, h = side, int(side * rng.uniform(0.6, 1.4))
        p = d / f"scene_{i:04d}.jpg"
        Image.fromarray(s.image).resize((w, h), Image.BICUBIC).save(p, quality=90)
        paths.append(p)
    return paths


def model_only(model, paths, size: int, batch: int, prompts) -> float:
    """Images/s of the compiled step alone on the same batches (pixels already in memory)."""
    from gem_jax.distributed import DataParallel, heatmap_step
    from gem_jax.io import read_image
    dp = DataParallel()
    step = heatmap_step(model, dp, prompts, normalize=False)
    b = dp.local_batch(batch)
    px = model.preprocess([read_image(p) for p in paths], size=size)
    batches = [px[i:i + b] for i in range(0, len(px), b)]
    batches[-1] = np.concatenate([batches[-1], np.zeros((b - len(batches[-1]),) + px.shape[1:],
                                                        px.dtype)])
    # As the command measures itself: the first batch (compilation) apart, then the others
    # dispatched as it dispatches them (the next one queued while the previous one computes).
    step(batches[0]).block_until_ready()
    t = time.perf_counter()
    pending = None
    for x in batches[1:]:
        out = step(x)
        if pending is not None:
            pending.block_until_ready()
        pending = out
    pending.block_until_ready()
    return (len(paths) - b) / (time.perf_counter() - t)


def pipeline(src: Path, out: Path, model: str, size: int, batch: int, fmt: str, workers: int):
    """`gem-jax heatmap` in this process: (images/s after the first step, host-wait share)."""
    from gem_jax import cli
    argv = ["heatmap", str(src), *[a for p in PROMPTS for a in ("-p", p)], "--template", "{}",
            "--model", model, "--size", str(size), "-b", str(batch), "--format", fmt,
            "--out", str(out), "--quiet", "--workers", str(workers)]
    args = cli.build_parser().parse_args(argv)
    code, stats, _ = cli.run_images(args, cli.heatmap_task(args))
    if code != 0:
        raise RuntimeError(f"gem-jax heatmap failed ({code})")
    return stats.steady_images_per_s, stats.host_wait_share


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(TOY))
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=-1,
                    help="decoding workers for the pipeline (default: the command's default)")
    ap.add_argument("--formats", default="npy", help="npy, png or npy,png")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--device-threads", type=int, default=0,
                    help="XLA CPU threads for the model (0: all cores, XLA's default; 1: one "
                         "core, leaving the others to the input pipeline, as an accelerator "
                         "would)")
    a = ap.parse_args(argv)
    if a.device_threads:  # before JAX starts its CPU client
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_multi_thread_eigen=false "
                                   f"intra_op_parallelism_threads={a.device_threads}")
    import jax
    import gem_jax
    model = gem_jax.load(a.model)
    runs = {"model": [], **{f"pipeline_{f}": [] for f in a.formats.split(",")}}
    waits = {k: [] for k in runs if k != "model"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "src").mkdir()
        paths = make_images(tmp / "src", a.images)
        mb = sum(p.stat().st_size for p in paths) / 1e6
        print(f"{a.images} JPEGs ({mb:.1f} MB) in {tmp / 'src'}; model {a.model}; size "
              f"{a.size}; batch {a.batch_size}; backend {jax.default_backend()}; "
              f"{os.cpu_count()} cores; device threads {a.device_threads or 'all'}; "
              f"workers {a.workers}", file=sys.stderr)
        order = list(runs)
        for r in range(a.repeats):
            for name in order[r % len(order):] + order[:r % len(order)]:   # rotate the order
                if name == "model":
                    v = model_only(model, paths, a.size, a.batch_size,
                                   [p for p in PROMPTS])
                else:
                    fmt = name.split("_", 1)[1]
                    v, w = pipeline(tmp / "src", tmp / f"out_{r}_{fmt}", a.model, a.size,
                                    a.batch_size, fmt, a.workers)
                    waits[name].append(w)
                runs[name].append(v)
                print(f"repeat {r}: {name} {v:.1f} images/s", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(f"\n| run | images/s (median of {a.repeats}) | all repeats | vs model | host wait |")
    print("|---|---|---|---|---|")
    for k, v in runs.items():
        ratio = "" if k == "model" else f"{med[k] / med['model']:.0%}"
        wait = "" if k == "model" else f"{statistics.median(waits[k]):.0%}"
        print(f"| {k} | {med[k]:.1f} | {', '.join(f'{x:.1f}' for x in v)} | {ratio} | {wait} |")
    if a.json:
        Path(a.json).write_text(json.dumps(dict(
            config=dict(model=a.model, images=a.images, size=a.size, batch_size=a.batch_size,
                        repeats=a.repeats, workers=a.workers, backend=jax.default_backend(),
                        device_threads=a.device_threads,
                        cores=os.cpu_count(), jax=jax.__version__),
            images_per_s=runs, median=med, host_wait=waits), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
