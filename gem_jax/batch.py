"""Dataset-scale image jobs (`gem-jax heatmap` / `segment`): one process or many, streaming,
resumable, each image's outputs written exactly once.

Every process runs `run_task` with the same arguments:

1. expands the inputs (files, directories, globs, @lists, `.tar` shards) and plans every output
   name, identically on every process (checked: processes that see different inputs stop);
2. applies the OUT rule, or with `resume` finds the images already complete (gem_jax.outputs);
3. loads the model and builds one SPMD step over all devices of all processes
   (gem_jax.distributed);
4. takes its share of the images still to do (every N-th, from its id), streams them through
   grain (decoding + GEM's preprocessing in workers, prefetched), and runs the same number of
   steps as every other process (batches padded); while step k computes, the host prepares
   step k+1 and writes step k-1's outputs in a thread pool;
5. records each finished image in its journal (flushed per image) -- process 0 keeps
   manifest.json -- and, when all are done, process 0 merges the journals into manifest.json.

A per-process progress bar shows images/s and the ETA; the summary gives images/s, the share of
device time spent waiting for the host (input or output), and the failures.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import math
import os
import secrets
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

__all__ = ["Task", "Options", "Stats", "run_task", "run", "default_workers"]


@dataclasses.dataclass
class Task:
    """What a command computes and writes.

    plan_image(plan, record, stem) -> list of output dicts (file, kind, ...), names claimed
    build_step(model, dp) -> step(local_pixels [b, S, S, 3]) -> global array (gem_jax.distributed)
    write(image | None, image_size, result, outputs, done) -> extra manifest fields; calls
        done(file) after each file.  `image` is the decoded RGB PIL image when keep_image.
    """
    command: str
    header: dict
    plan_image: Callable
    build_step: Callable
    write: Callable
    keep_image: bool = True


@dataclasses.dataclass
class Options:
    images: Sequence[str]
    out: Path
    size: int
    batch_size: int = 4
    force: bool = False
    resume: bool = False
    workers: int = 0
    writers: int = 2
    quiet: bool = False


@dataclasses.dataclass
class Stats:
    process: int
    processes: int
    images: int = 0          # this process's share this run
    done: int = 0
    failed: int = 0
    skipped: int = 0         # complete before this run (--resume), all processes
    files: int = 0
    steps: int = 0
    seconds: float = 0.0     # first step dispatched -> last output written
    first_step: float = 0.0  # dispatch -> ready of step 0 (includes compilation)
    steady_images: int = 0   # images after step 0 ...
    steady_seconds: float = 0.0  # ... and the time from step 0 ready to the last output written
    device_busy: float = 0.0
    host_wait: float = 0.0   # device idle between steps: waiting for the host
    failures: list = dataclasses.field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else float("nan")

    @property
    def steady_images_per_s(self) -> float:
        """Images/s once compiled: after the first step."""
        if self.steady_seconds <= 0 or self.steady_images <= 0:
            return float("nan")
        return self.steady_images / self.steady_seconds

    @property
    def host_wait_share(self) -> float:
        span = self.host_wait + self.device_busy
        return self.host_wait / span if span > 0 else float("nan")


def default_workers(n_images: int) -> int:
    """Decoding workers: processes only when there is enough to decode to pay their start-up
    (each imports gem_jax and grain, about a second); threads otherwise (0)."""
    if n_images < 256:
        return 0
    return max(1, min(8, (os.cpu_count() or 2) // 2))


class _ReadyWatch:
    """Records when each dispatched step's result becomes ready (a background thread), so the
    device's idle gaps between steps can be measured without blocking the main loop."""

    def __init__(self):
        self.ready: dict[int, float] = {}
        self._q: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._t = threading.Thread(target=self._run, daemon=True, name="gem-jax-ready-watch")
        self._stop = False
        self._t.start()

    def watch(self, k: int, arr) -> None:
        with self._cv:
            self._q.append((k, arr))
            self._cv.notify()

    def _run(self):
        while True:
            with self._cv:
                while not self._q and not self._stop:
                    self._cv.wait()
                if not self._q:
                    return
                k, arr = self._q.popleft()
            try:
                arr.block_until_ready()
            except Exception:
                pass
            self.ready[k] = time.perf_counter()

    def close(self):
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._t.is_alive():
            self._t.join()


def run_task(task: Task, opts: Options, cluster, *, load_model: Callable,
             check_model: Callable, usage_error: Callable, fail: Callable):
    """Run `task` on this process's share; returns (exit code, this process's Stats, every
    process's Stats).  The exit code is the run's, the same on every process: 1 if any image
    failed anywhere, else 0.

    load_model() -> model; check_model(model) raises usage errors; usage_error(msg) and
    fail(msg) never return (exit 2 / exit 1 in the caller's terms)."""
    from . import distributed as dist
    from .io import InputError
    from .outputs import (MANIFEST, Journal, Manifest, OutIsAFileError, OutputPlan,
                          check_out_dir, read_journals, read_manifest, remove_journals,
                          remove_temps, resume_state)
    from .pipeline import expand_records, stream
    pid, n = cluster.process_id, cluster.num_processes
    out = Path(opts.out)

    # 1. inputs and planned names: the same on every process.
    try:
        records = expand_records(opts.images, exclude=[out])
    except InputError as e:
        usage_error(str(e))
    plan = OutputPlan()
    images = []
    for r in records:
        stem = plan.stem(r.stem, image=r.key)
        images.append(dict(image=r.key, stem=stem, outputs=task.plan_image(plan, r, stem)))
    plan_digest = dist.digest([(im["image"], [o["file"] for o in im["outputs"]]) for im in images])
    if len(set(dist.allgather_json(plan_digest))) > 1:
        fail("the processes see different inputs (the same INPUT arguments expand to different "
             "files): every process must see the same files at the same paths")

    # 2. the OUT rule, or what --resume may skip.
    err, done_before, previous = None, {}, None
    try:
        if opts.resume:
            previous, done_before = resume_state(out, task.header, images)
        else:
            previous = check_out_dir(out, plan.names, force=opts.force)
    except OutIsAFileError as e:
        usage_error(str(e))
    except FileExistsError as e:
        err = str(e)
        if not opts.resume and "--force" in err:
            err += "; or --resume to continue it (skipping the images already complete)"
    _stop_if_any(dist.agree(err), fail)

    # 3. the model and the step function (usage errors are the same on every process).
    err = None
    try:
        model = load_model()
    except Exception as e:
        err = str(e)
    _stop_if_any(dist.agree(err), fail)
    check_model(model)
    dp = dist.DataParallel()
    try:
        step = task.build_step(model, dp)
    except (TypeError, ValueError) as e:
        usage_error(str(e))

    done_keys = sorted(done_before)
    if len(set(dist.allgather_json(dist.digest(done_keys)))) > 1:
        fail("the processes disagree on which images are complete: --out must be on a file "
             "system shared by all processes")

    # 4. one run id (process 0's), manifest.json by process 0, then everyone checks they see it.
    run_id = dist.allgather_json(secrets.token_hex(8))[0]
    header = dict(task.header, processes=n, run=run_id)
    manifest = None
    if pid == 0:
        out.mkdir(parents=True, exist_ok=True)
        # Temporary files of writes a killed run left behind (ours, by their names): nothing
        # writes outputs before the barrier below, so none of them is in use.
        remove_temps(out, plan.names)
        for i, e in done_before.items():
            im = images[i]
            im.update({k: v for k, v in e.items()
                       if k not in ("image", "outputs", "status", "error", "stem", "t")})
            im.update(status="done", error=None)
        carried = previous.carried(plan.names, out) if previous is not None else []
        manifest = Manifest(out, header, images, collisions=plan.collisions, previous=carried)
        manifest.save()
    dist.barrier("gem_jax.batch.manifest")
    if n > 1:
        seen = read_manifest(out / MANIFEST)
        if dist.agree(None if seen is not None and seen.get("run") == run_id else
                      f"process {pid} cannot see {out / MANIFEST} written by process 0") != [None] * n:
            fail(f"--out {out} must be on a file system shared by all processes "
                 f"(process 0's manifest.json is not visible to every process)")

    # 5. this process's share, and the common number of steps.
    todo = [i for i in range(len(images)) if i not in done_before]
    mine = todo[pid::n]
    b = dp.local_batch(opts.batch_size)
    steps = max(math.ceil(len(todo[p::n]) / dp.local_batch(opts.batch_size, p))
                for p in range(n)) if todo else 0
    stats = Stats(pid, n, images=len(mine), skipped=len(done_before), steps=steps)
    journal = Journal(out, pid, n, run_id)
    workers = opts.workers if opts.workers >= 0 else default_workers(len(mine))
    mean, std = model.config.image_mean, model.config.image_std
    items = None
    bar = _progress(len(mine), opts, task.command, cluster)
    lock = threading.Lock()

    # With one process manifest.json is also kept up to date as images finish: after every
    # image in small runs, at most once a second in large ones (each save rewrites the whole
    # file; the journal is the per-image record either way).
    last_save = [time.monotonic()]

    def save_manifest():
        if len(images) <= 64 or time.monotonic() - last_save[0] >= 1.0:
            manifest.maybe_save()
            last_save[0] = time.monotonic()

    def record_done(i, row, files, info):
        journal.record(images[i]["image"], "done", files, process=pid, run=run_id,
                       image_size=list(row["image_size"]), **info)
        if manifest is not None and n == 1:
            with lock:
                manifest.image_done(i, image_size=list(row["image_size"]), process=pid,
                                    run=run_id, **info)
                save_manifest()

    def record_failed(i, error):
        bar.write(f"error: {error}", file=sys.stderr)  # on its own line, above the bar
        stats.failed += 1
        stats.failures.append(images[i]["image"])
        journal.record(images[i]["image"], "failed", error=error, process=pid, run=run_id)
        if manifest is not None and n == 1:
            with lock:
                manifest.image_failed(i, error)
                save_manifest()

    stop = threading.Event()  # set by the first failed write: no further writes start

    def write_one(i, row, result):
        if stop.is_set():
            return 0
        try:
            return _write_one(i, row, result)
        except BaseException:
            stop.set()
            raise

    def _write_one(i, row, result):
        from PIL import Image
        img = Image.fromarray(row["image"]) if row.get("image") is not None else None
        files = []

        def done(file):
            files.append(file)
            if manifest is not None and n == 1:
                with lock:
                    manifest.output_done(i, file)
        info = task.write(img, tuple(row["image_size"]), result, images[i]["outputs"], done) or {}
        record_done(i, row, files, info)
        return len(files)

    status = "failed"
    pool = cf.ThreadPoolExecutor(max_workers=max(1, opts.writers),
                                 thread_name_prefix="gem-jax-writer")
    writes: collections.deque = collections.deque()
    watch = _ReadyWatch()
    submitted: dict[int, float] = {}
    try:
        items = iter(stream(
            [(i, records[i]) for i in mine], size=opts.size, mean=mean, std=std,
            keep_image=task.keep_image, workers=workers, threads=2,
            buffer=max(8, 2 * b)))

        def take_batch():
            rows = []
            while len(rows) < b:
                item = next(items, None)
                if item is None:
                    break
                if item["error"] is not None:
                    record_failed(item["index"], item["error"])
                    bar.update(1)
                    continue
                rows.append(item)
            px = np.zeros((b, opts.size, opts.size, 3), np.float32)
            for k, r in enumerate(rows):
                px[k] = r["pixels"]
                r["pixels"] = None
            return rows, px

        def harvest(block: bool):
            while writes and (block or writes[0].done()):
                stats.files += writes.popleft().result()   # re-raises a writer's error
                stats.done += 1
                bar.update(1)

        def finish(k, out_arr, rows):
            res = dp.local_rows(out_arr)
            for r, row in enumerate(rows):
                writes.append(pool.submit(write_one, row["index"], row, res[r]))
            harvest(False)
            while len(writes) > 4 * b:   # bounded memory: wait for the writers
                stats.files += writes.popleft().result()
                stats.done += 1
                bar.update(1)

        pending = collections.deque()
        t_start = None
        first_rows = 0
        for k in range(steps):
            rows, px = take_batch()
            if k == 0:
                first_rows = len(rows)
            submitted[k] = time.perf_counter()
            if t_start is None:
                t_start = submitted[k]
            out_arr = step(px)
            watch.watch(k, out_arr)
            if pending:
                finish(*pending.popleft())
            pending.append((k, out_arr, rows))
        while pending:
            finish(*pending.popleft())
        # The decoder may still hold failed records after the last full batch (never a good
        # one: `steps` covers every record of every process).
        for item in items:
            if item["error"] is None:
                raise RuntimeError(f"internal error: {item['key']} was left unprocessed")
            record_failed(item["index"], item["error"])
            bar.update(1)
        harvest(True)
        t_end = time.perf_counter()
        stats.seconds = t_end - t_start if t_start is not None else 0.0
        watch.close()
        if 0 in watch.ready and steps > 1:
            stats.steady_seconds = t_end - watch.ready[0]
            stats.steady_images = stats.done - first_rows
        status = "complete"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        watch.close()
        bar.close()
        journal.close()
        _timings(stats, submitted, watch.ready)
        if manifest is not None and n == 1:
            # One process: manifest.json knows everything; the journal is redundant now.
            manifest.finish(status if status != "complete" else
                            ("incomplete" if stats.failed else "complete"))
            if status != "failed":
                remove_journals(out)

    # 6. all processes done: process 0 merges the journals into manifest.json.
    all_stats = [Stats(**s) for s in dist.allgather_json(dataclasses.asdict(stats))]
    if n > 1 and pid == 0:
        manifest.merge(read_journals(out))
        failed_any = any(s.failed for s in all_stats)
        manifest.finish("incomplete" if failed_any else "complete")
        remove_journals(out)
    dist.barrier("gem_jax.batch.merged")
    return (1 if any(s.failed for s in all_stats) else 0), stats, all_stats


def _stop_if_any(errors: list, fail: Callable) -> None:
    bad = [(p, e) for p, e in enumerate(errors) if e]
    if bad:
        p, e = bad[0]
        fail(e if len(errors) == 1 else f"{e} (process {p})")


def _timings(stats: Stats, submitted: dict, ready: dict) -> None:
    """Device busy and idle time from when each step was submitted and became ready: the
    device waits for the host between the end of step k-1 and the submission of step k."""
    ks = sorted(k for k in submitted if k in ready)
    if not ks:
        return
    stats.first_step = ready[ks[0]] - submitted[ks[0]]
    for k in ks[1:]:
        start = max(submitted[k], ready.get(k - 1, submitted[k]))
        stats.host_wait += max(0.0, submitted[k] - ready.get(k - 1, submitted[k]))
        stats.device_busy += max(0.0, ready[k] - start)


def _progress(total: int, opts: Options, command: str, cluster):
    from tqdm.auto import tqdm
    desc = command if not cluster.multi else f"{command} [{cluster}]"
    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True,
                disable=opts.quiet or total < 4, leave=False, smoothing=0.1)


def run(command: str, inputs: Sequence[str], *, prompts: Sequence[str] = (),
        classes: Sequence[str] = (), **options) -> int:
    """Python entry point: the same as the command line `gem-jax COMMAND INPUTS ...` (heatmap,
    segment or eval), options by their long names with `_` for `-` (True: a flag; a list:
    the option repeated; None: left out).  Returns the exit code.  For example, on each of two
    hosts (process_id 0 and 1):

        gem_jax.batch.run("heatmap", ["shards-{000..099}.tar"], prompts=["cat", "dog"],
                          out="/shared/maps", model="openai/clip-vit-base-patch16",
                          coordinator="10.0.0.1:1234", num_processes=2, process_id=0,
                          resume=True)
    """
    from .cli import main
    argv = [command, *map(str, inputs)]
    argv += [a for p in prompts for a in ("-p", str(p))]
    argv += [a for c in classes for a in ("-c", str(c))]
    for k, v in options.items():
        flag = "--" + k.replace("_", "-")
        if v is None or v is False:
            continue
        if v is True:
            argv.append(flag)
        elif isinstance(v, (list, tuple)):
            argv += [a for x in v for a in (flag, str(x))]
        else:
            argv += [flag, str(v)]
    return main(argv)
