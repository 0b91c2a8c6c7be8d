#!/usr/bin/env python
"""A/B inference speed of two source trees of gem-jax (e.g. a commit and its parent), same machine,
same run: each measurement in a fresh process, the trees alternated round by round so that load
on a shared machine hits both alike; medians after warm-up, compile time apart.

    git worktree add /tmp/base <commit>
    python benchmarks/ab.py --tree base=/tmp/base --tree new=. --cases b16-448-b1,b16-448-b8 \
        --rounds 3 --repeats 3 --out benchmarks/ab.json

Process CPU time is reported beside wall time: on a shared machine it is the steadier measure
of the work done.  Random ViT-B/16 weights (`gem_jax.params.init`), GEM defaults (depth 7, 1 iteration, adaptive τ),
2 prompts, fp32 (or --dtype bfloat16), `Execution.auto`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

WORKER = r"""
import json, sys, time
import numpy as np
import jax, jax.numpy as jnp
import gem_jax
from gem_jax import params as P
arch, size, batch, repeats, dtype = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
cfg = gem_jax.preset(arch)
dt = jnp.dtype(dtype)
params = jax.tree.map(lambda a: a.astype(dt), P.init(cfg, jax.random.PRNGKey(0)))
ex = gem_jax.Execution.auto(dtype=dtype)
px = jnp.asarray(np.random.default_rng(0).standard_normal((batch, size, size, 3)), jnp.float32)
emb = jnp.asarray(np.random.default_rng(1).standard_normal((2, cfg.embed_dim)), jnp.float32)
args = (params, px, emb, np.int32(7), np.int32(1), None)
t = time.perf_counter()
compiled = gem_jax.heatmaps_fn.lower(*args, cfg=cfg, ex=ex).compile()
compile_s = time.perf_counter() - t
compiled(*args).block_until_ready()
times, cpu = [], []
for _ in range(repeats):
    t, c = time.perf_counter(), time.process_time()
    out = compiled(*args).block_until_ready()
    times.append(time.perf_counter() - t)
    cpu.append(time.process_time() - c)
print(json.dumps(dict(times=times, cpu=cpu, compile_s=compile_s, checksum=float(jnp.abs(out).sum()))))
"""

CASES = {
    "b16-448-b1": ("ViT-B-16", 448, 1),
    "b16-448-b8": ("ViT-B-16", 448, 8),
    "b16-224-b1": ("ViT-B-16", 224, 1),
    "l14-448-b1": ("ViT-L-14", 448, 1),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", action="append", required=True, metavar="NAME=DIR[@DTYPE]",
                    help="a source tree to measure, optionally with its own compute dtype")
    ap.add_argument("--cases", default="b16-448-b1,b16-448-b8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    trees = [t.split("=", 1) for t in a.tree]
    res: dict = {}
    for r in range(a.rounds):
        for case in a.cases.split(","):
            arch, size, batch = CASES[case]
            order = trees if r % 2 == 0 else trees[::-1]
            for name, d in order:
                d, _, dtype = d.partition("@")
                env = dict(os.environ, PYTHONPATH=os.path.abspath(d))
                with tempfile.TemporaryDirectory() as tmp:  # never pick up an installed copy first
                    p = subprocess.run([sys.executable, "-c", WORKER, arch, str(size), str(batch),
                                        str(a.repeats), dtype or a.dtype], capture_output=True, text=True,
                                       env=env, cwd=tmp)
                if p.returncode:
                    print(p.stderr[-3000:], file=sys.stderr)
                    return 1
                m = json.loads(p.stdout.strip().splitlines()[-1])
                e = res.setdefault(case, {}).setdefault(name, dict(times=[], cpu=[], compile_s=[],
                                                                  checksum=[]))
                e["times"] += m["times"]
                e["cpu"] += m["cpu"]
                e["compile_s"].append(m["compile_s"])
                e["checksum"].append(m["checksum"])
                print(f"round {r} {case} {name}: median {statistics.median(m['times']):.3f} s "
                      f"(cpu {statistics.median(m['cpu']):.3f} s) compile {m['compile_s']:.2f} s",
                      flush=True)
    print()
    for case, per in res.items():
        meds = {n: statistics.median(v["times"]) for n, v in per.items()}
        cpus = {n: statistics.median(v["cpu"]) for n, v in per.items()}
        base, cbase = meds[trees[0][0]], cpus[trees[0][0]]
        line = ", ".join(f"{n} {m:.3f} s ({m / base - 1:+.1%}; process CPU {cpus[n]:.3f} s, "
                         f"{cpus[n] / cbase - 1:+.1%})" for n, m in meds.items())
        print(f"{case}: {line}; compile " +
              ", ".join(f"{n} {statistics.median(v['compile_s']):.2f} s" for n, v in per.items()))
    if a.out:
        with open(a.out + ".tmp", "w") as f:
            json.dump(res, f, indent=1)
        os.replace(a.out + ".tmp", a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
