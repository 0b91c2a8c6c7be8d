"""Multi-process (multi-host) execution on JAX's multi-controller runtime (`jax.distributed`).

Every process runs the same program: it joins the others (`initialize`), builds the same global
mesh over all devices of all processes (`DataParallel`), and at each step contributes its own
host-local batch; the global batch is assembled with `jax.make_array_from_process_local_data`
(rows of process p on p's devices), the model runs once on it under `jax.jit(jax.shard_map(...))`
(params and text embeddings replicated, pixels sharded on the batch axis), and each process
reads back only its own rows (`addressable_shards`).  So one compiled SPMD program serves one
process or many, a process's images never leave its host, and no collective runs inside a step.

    cluster = initialize("10.0.0.1:1234", num_processes=2, process_id=0)   # or from JAX's env
    dp = DataParallel()
    step = heatmap_step(model, dp, ["cat"], normalize=False)
    maps = dp.local_rows(step(local_pixels))        # this process's rows, numpy

Every process must call `step` the same number of times with the same local batch size (pad
with zeros; the padded rows' outputs are dropped).  `allgather_bytes` / `allgather_json` /
`barrier` / `agree` are host-side collectives over the processes (no-ops with one process).

On CPU, cross-process collectives need gloo (`jax_cpu_collectives_implementation`), which
`initialize` selects before the backend starts; it has no effect on GPU or TPU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from typing import Any, Callable, Sequence

import numpy as np

__all__ = ["ENV", "Cluster", "initialize", "coordinator_address", "add_distributed_args",
           "cluster_from_args", "DataParallel", "heatmap_step", "allgather_bytes",
           "allgather_json", "barrier", "agree", "digest"]

# JAX reads JAX_COORDINATOR_ADDRESS itself; the process count and id are read here from the
# conventional names used by JAX's launch docs and multi-process test harnesses.
ENV = dict(coordinator="JAX_COORDINATOR_ADDRESS", num_processes="JAX_NUM_PROCESSES",
           process_id="JAX_PROCESS_ID")
HEARTBEAT_ENV = "GEM_JAX_HEARTBEAT_TIMEOUT"  # seconds before a silent process counts as dead


@dataclasses.dataclass(frozen=True)
class Cluster:
    process_id: int = 0
    num_processes: int = 1

    @property
    def multi(self) -> bool:
        return self.num_processes > 1

    def __str__(self) -> str:
        return f"process {self.process_id}/{self.num_processes}"


def coordinator_address(s: str) -> str:
    """HOST:PORT (argparse type; errors are usage errors)."""
    import argparse
    m = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[^:\s]+):(\d{1,5})", s.strip())
    if not m or not 0 < int(m.group(2)) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT (e.g. 10.0.0.1:1234), got {s!r}")
    return s.strip()


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    if v is None or not v.strip():
        return None
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"environment variable {name}={v!r} is not an integer") from None


def _already() -> bool:
    import jax
    f = getattr(jax.distributed, "is_initialized", None)
    if callable(f):
        return bool(f())
    from jax._src import distributed as d  # older JAX: the client is set once initialized
    return getattr(d.global_state, "client", None) is not None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto: bool = False) -> Cluster:
    """Join the other processes of this run (`jax.distributed.initialize`) and return where this
    process stands.  Missing values come from $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES and
    $JAX_PROCESS_ID; `auto` leaves the rest to JAX's cluster detection (Cloud TPU pods, SLURM,
    Open MPI).  Without any of them (or with one process) it is a single-process run and
    nothing is initialized.  Must run before JAX computes anything.  Raises ValueError for
    inconsistent values (usage errors)."""
    import jax
    if _already():
        return Cluster(jax.process_index(), jax.process_count())
    coordinator = coordinator or os.environ.get(ENV["coordinator"]) or None
    n = num_processes if num_processes is not None else _env_int(ENV["num_processes"])
    i = process_id if process_id is not None else _env_int(ENV["process_id"])
    if not auto and coordinator is None and n is None and i is None:
        return Cluster()
    if n is not None and n < 1:
        raise ValueError(f"--num-processes must be at least 1, got {n}")
    if not auto and n == 1 and i in (None, 0):
        return Cluster()  # one process: nothing to join
    if not auto:
        missing = [f for f, v in (("--coordinator HOST:PORT", coordinator),
                                  ("--num-processes N", n), ("--process-id I", i)) if v is None]
        if missing:
            raise ValueError(f"a multi-process run needs {', '.join(missing)} too (or "
                             f"{ENV['coordinator']}, {ENV['num_processes']}, {ENV['process_id']}; "
                             f"or --distributed on a TPU pod / SLURM / Open MPI)")
    if n is not None and i is not None and not 0 <= i < n:
        raise ValueError(f"--process-id must be in 0..{n - 1} for --num-processes {n}, got {i}")
    # Cross-process collectives on CPU go through gloo; GPU/TPU backends ignore this option.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kw: dict[str, Any] = {}
    hb = _env_int(HEARTBEAT_ENV)
    if hb:
        kw["heartbeat_timeout_seconds"] = hb
    jax.distributed.initialize(coordinator, n, i, **kw)
    return Cluster(jax.process_index(), jax.process_count())


def add_distributed_args(p) -> None:
    """--coordinator, --num-processes, --process-id, --distributed (one group)."""
    from .argtypes import nonneg_int, positive_int
    g = p.add_argument_group(
        "multi-process (JAX distributed; run the same command once per process)",
        f"each process reads only its share of the inputs and writes only its images'\n"
        f"outputs; --out must be on a file system all processes share.  Defaults come from\n"
        f"{ENV['coordinator']}, {ENV['num_processes']}, {ENV['process_id']}.")
    g.add_argument("--coordinator", type=coordinator_address, metavar="HOST:PORT",
                   help="address of process 0, where the processes meet (any free port)")
    g.add_argument("--num-processes", type=positive_int, metavar="N",
                   help="number of processes in the run")
    g.add_argument("--process-id", type=nonneg_int, metavar="I",
                   help="this process's id, 0..N-1 (process 0 hosts the coordinator)")
    g.add_argument("--distributed", action="store_true",
                   help="let JAX detect the cluster (Cloud TPU pod slices, SLURM, Open MPI) "
                        "instead of the three options above")


def cluster_from_args(parser, args) -> Cluster:
    """`initialize` from parsed arguments; inconsistent values are usage errors (exit 2)."""
    try:
        return initialize(getattr(args, "coordinator", None), getattr(args, "num_processes", None),
                          getattr(args, "process_id", None),
                          auto=bool(getattr(args, "distributed", False)))
    except ValueError as e:
        parser.error(str(e))


# ----------------------------------------------------------------------------- host collectives
def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def allgather_bytes(b: bytes) -> list[bytes]:
    """Every process's `b`, in process order ([b] with one process)."""
    import jax
    if jax.process_count() == 1:
        return [bytes(b)]
    from jax.experimental import multihost_utils as mu
    n = np.asarray(mu.process_allgather(np.array([len(b)], np.int32))).reshape(-1)
    width = _pow2(max(1, int(n.max())))  # few distinct shapes: few compilations
    buf = np.zeros(width, np.uint8)
    buf[:len(b)] = np.frombuffer(b, np.uint8)
    rows = np.asarray(mu.process_allgather(buf)).reshape(len(n), width)
    return [rows[k, :int(n[k])].tobytes() for k in range(len(n))]


def allgather_json(obj) -> list:
    return [json.loads(x.decode("utf-8")) for x in
            allgather_bytes(json.dumps(obj, sort_keys=True).encode("utf-8"))]


def barrier(name: str) -> None:
    import jax
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils as mu
        mu.sync_global_devices(name)


def agree(error: str | None) -> list[str | None]:
    """Exchange one optional error message per process (a barrier too): every process learns
    whether any failed, so all stop together instead of waiting on a dead peer."""
    return allgather_json(error)


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# ----------------------------------------------------------------------------- global data parallel
class DataParallel:
    """A 1-D mesh ("data") over all devices of all processes, and the moves between a
    process's host data and global arrays."""

    def __init__(self, devices: Sequence | None = None):
        import jax
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        devices = list(devices if devices is not None else jax.devices())
        self.mesh = Mesh(np.array(devices), ("data",))
        counts: dict[int, int] = {}
        for d in devices:
            counts[d.process_index] = counts.get(d.process_index, 0) + 1
        self.devices_per_process = [counts.get(p, 0) for p in range(jax.process_count())]
        self.local_devices = counts.get(jax.process_index(), 0)
        self.rows = NamedSharding(self.mesh, P("data"))
        self.replicated = NamedSharding(self.mesh, P())

    def rows_per_device(self, b: int) -> int:
        """Rows each device takes per step so that every process gets at least `b` images per
        step (the same on every device: a row-sharded global array needs equal shards)."""
        return -(-int(b) // max(1, min(self.devices_per_process)))

    def local_batch(self, b: int, process: int | None = None) -> int:
        """Rows of `process` (default this one) per step: rows_per_device(b) times its
        devices; `b` rounded up to a multiple of the local devices when all processes have
        as many devices."""
        import jax
        n = self.devices_per_process[jax.process_index() if process is None else process]
        return self.rows_per_device(b) * n

    def replicate(self, tree):
        """A pytree of host values → global arrays replicated on every device (None stays)."""
        import jax
        return jax.tree.map(lambda a: jax.device_put(np.asarray(a), self.replicated), tree)

    def shard(self, local: np.ndarray):
        """This process's rows [b, ...] → the global array [processes·b, ...] sharded by rows."""
        import jax
        return jax.make_array_from_process_local_data(self.rows, np.ascontiguousarray(local))

    @staticmethod
    def local_rows(arr) -> np.ndarray:
        """This process's rows of a row-sharded global array, in order (numpy; blocks)."""
        shards = sorted(arr.addressable_shards, key=lambda s: s.index[0].start or 0)
        return np.concatenate([np.asarray(s.data) for s in shards], axis=0)

    def map(self, fn: Callable, n_replicated: int):
        """jit(shard_map(fn)): the first `n_replicated` arguments replicated, the last one
        sharded by rows, the output sharded by rows; `fn` sees one device's rows."""
        import jax
        from jax.sharding import PartitionSpec as P
        return jax.jit(jax.shard_map(fn, mesh=self.mesh,
                                     in_specs=(P(),) * n_replicated + (P("data"),),
                                     out_specs=P("data")))


def heatmap_step(model, dp: DataParallel, prompts: Sequence[str], *, method: str = "gem",
                 knobs: dict | None = None, template: str | None = "a photo of a {}.",
                 normalize: bool = True, segment: bool = False,
                 background_threshold: float | None = None):
    """`step(local_pixels) -> global array` computing, for every row, what
    `model.heatmaps(pixels, prompts, method=..., normalize=..., template=..., **knobs)` gives
    ([P, H, W] float32), or with `segment` what `model.segment(..., background_threshold)`
    gives ([H, W] int32).  It calls the core's jitted `dense_heatmaps` on each device's rows,
    with the core's own data parallelism off (the mesh here already spans every device).
    Raises ValueError for knobs that do not apply to the method or are out of range."""
    import jax.numpy as jnp
    from . import maps as maps_lib
    from .model import bucket, dense_heatmaps
    m, kn = model._method(method, dict(knobs or {}))
    n = len(prompts)
    emb = model._prompt_embeddings(list(prompts), template)
    emb = jnp.pad(emb, ((0, bucket(n) - n), (0, 0)))
    ex = dataclasses.replace(model.execution, data_parallel=False)
    cfg = model.config

    def per_device(params, emb, kn, px):
        out = dense_heatmaps(params, px, emb, kn, cfg=cfg, method=m,
                             normalize=normalize or segment, ex=ex)[:, :n]
        return maps_lib.segment_from_scores(out, background_threshold) if segment else out

    f = dp.map(per_device, 3)
    shared = dp.replicate((model.params, emb, kn))
    return lambda local_pixels: f(*shared, dp.shard(local_pixels))
