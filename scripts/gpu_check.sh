#!/usr/bin/env bash
# GPU parity and speed in one prepared run (a lent NVIDIA machine; see README "GPU").
# Needs the image's jax[cuda], flax, torch; carries open_clip_torch 2.23.0, gem_torch 1.0.1, ftfy,
# wcwidth as wheels in .whl/.  Logs go to $OUT.  Steps are in priority order, each under its own
# timeout, so a slow step leaves the earlier results intact.
set -u
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
step() { local t0=$SECONDS; echo "== $1"; shift; "$@"; echo "   rc=$? in $((SECONDS - t0)) s"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
[ -e gem_jax/convert ] || ln -s ../convert gem_jax/convert   # what the editable install maps
python3 -c "import jax, flax, torch, open_clip, gem; print('jax', jax.__version__, 'flax', \
flax.__version__, 'torch', torch.__version__, jax.devices())" \
  | tee "$OUT/versions.txt"
step "cuDNN attention probe" timeout 60 python3 - <<'PY' 2>&1 | tee "$OUT/cudnn_probe.txt"
import jax, jax.numpy as jnp
for n in (197, 785, 1025):  # B/16 at 224, 448; B/14 at 448
    ks = jax.random.split(jax.random.PRNGKey(n), 3)
    q, k, v = (jax.random.normal(kk, (2, n, 12, 64), jnp.float32).astype(jnp.bfloat16) for kk in ks)
    ref = jax.nn.dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                       v.astype(jnp.float32), implementation="xla")
    try:
        o = jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
        print(n, "cudnn max |err| vs fp32", float(jnp.abs(o.astype(jnp.float32) - ref).max()))
    except Exception as e:  # noqa: BLE001  report and go on
        print(n, "cudnn FAILED:", type(e).__name__, str(e)[:300])
PY
# One process, -s: each case prints its errors as it finishes (under xdist nothing came back before
# the timeout).  fp32 at "highest" compiles slowly on the GPU (22 s for B16@448 b1 vs 7 s).
step "e2e parity (fp32 highest), bf16 + cuDNN vs fp32, any finite tau" timeout "${PARITY_S:-240}" \
  python3 -m pytest -q -s -rA -p no:cacheprovider tests/test_fidelity_e2e.py \
  -k "parity_with_gem_torch or bf16_close_to_fp32 or any_finite" 2>&1 | tee "$OUT/parity_e2e.log" \
  | grep -E "^(b16|b32|einsum|xla)|passed|failed|FAILED|Error"
step "fp32 parity, unpinned matmul precision" env GEM_JAX_TEST_MATMUL_PRECISION=default \
  timeout 80 python3 -m pytest -q -rA -p no:cacheprovider tests/test_fidelity_e2e.py \
  -k "parity_with_gem_torch" > "$OUT/parity_default_precision.log" 2>&1
tail -3 "$OUT/parity_default_precision.log"
step "bench: default precision, gem_torch on CUDA, bf16" timeout "${BENCH_S:-170}" python3 -m gem_jax \
  bench --cases 'B16@448 b1' 'B16@448 b8' 'L14@448 b1' --repeats 10 --half bfloat16 \
  --cache /tmp/benchcache --out "$OUT/bench_gpu"
step "bench: matmul precision highest" env JAX_DEFAULT_MATMUL_PRECISION=highest timeout 70 \
  python3 -m gem_jax bench --cases 'B16@448 b1' 'B16@448 b8' --repeats 10 --no-torch \
  --cache /tmp/benchcache --out "$OUT/bench_gpu_highest"
step "CPU bench on this host (bf16 vs fp32)" env JAX_PLATFORMS=cpu timeout 60 python3 -m gem_jax \
  bench --cases 'B16@448 b1' --repeats 3 --no-torch --half bfloat16 --cache /tmp/benchcache \
  --out "$OUT/bench_cpu"
