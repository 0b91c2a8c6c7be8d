"""Issue 14 acceptance: dataset-scale inference on 2 JAX processes (127.0.0.1, gloo collectives
on CPU) against the single-process run, on the tiny random-weight checkpoint.

* 24 images (mixed sizes, one corrupt) on 2 processes: every valid image's outputs written
  exactly once (every write is logged by an instrumented driver), equal to the single-process
  outputs, the corrupt image reported once;
* `eval` on 2 processes: the same confusion matrix and mIoU (and, on point labels, the same
  per-class point counts and p-mIoU) as on one process, exactly;
* one process SIGKILLed after its first outputs, then both rerun with --resume: the outputs are
  complete and equal to the single-process ones, and the images finished before the kill were
  not written again (same inode and mtime, same run id in the manifest).

Every subprocess has a timeout and is killed (by its pid) if it outlives it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gem_jax import cli
from test_cli import tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
KNOBS = ["--gem-depth", "3", "--size", "32"]
PROMPTS = ["-p", "a cat", "-p", "sky"]
TIMEOUT = 240  # seconds for one process of a run (imports + compile + 24 tiny images)

# A driver that logs every file written through gem_jax.io.atomic_write (the only way outputs
# are written) with the writing process's id, then runs the command line.
DRIVER = r"""
import os, sys
import gem_jax.io as io
real = io.atomic_write
log = os.environ["WRITE_LOG"]
def logged(path, write, **kw):
    r = real(path, write, **kw)
    with open(log, "a") as f:
        f.write(f"{os.environ.get('WRITER_ID', '-')} {os.fspath(path)}\n")
    return r
io.atomic_write = logged
from gem_jax.cli import main
sys.exit(main(sys.argv[1:]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(process: int, port: int, n: int = 2, devices: int = 1, **extra) -> dict:
    env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(n),
               JAX_PROCESS_ID=str(process), JAX_PLATFORMS="cpu", GEM_JAX_HEARTBEAT_TIMEOUT="10",
               PYTHONPATH=str(REPO), WRITER_ID=str(process), **extra)
    env.pop("XLA_FLAGS", None)
    if devices > 1:  # several CPU devices per process: a global mesh of n * devices
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def start(argv, envs, cwd):
    return [subprocess.Popen([sys.executable, "-c", DRIVER, *map(str, argv)], env=e, cwd=cwd,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for e in envs]


def finish(procs, timeout=TIMEOUT):
    """(returncode, stdout, stderr) of each process; a process past the timeout is killed."""
    res = []
    for p in procs:
        try:
            so, se = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            so, se = p.communicate()
        res.append((p.returncode, so, se))
    return res


def run2(argv, cwd, log, devices=1, flags=False):
    """`gem-jax ARGV` as 2 processes, joined through JAX's environment variables, or with
    `flags` through --coordinator/--num-processes/--process-id (the variables then unset)."""
    port = free_port()
    envs = [env_for(i, port, devices=devices, WRITE_LOG=str(log)) for i in range(2)]
    if not flags:
        return finish(start(argv, envs, cwd))
    procs = []
    for i, env in enumerate(envs):
        for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
            env.pop(k)
        procs += start([*argv, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                        "--process-id", i], [env], cwd)
    return finish(procs)


def make_images(d: Path, n: int = 24, corrupt: int = 23) -> dict:
    """n PNGs of random sizes (20..89 px a side), image `corrupt` not an image; returns the
    bytes of each file by name."""
    rng = np.random.default_rng(14)
    d.mkdir(parents=True, exist_ok=True)
    files = {}
    for k in range(n):
        h, w = (int(v) for v in rng.integers(20, 90, 2))
        name = f"im{k:02d}.png"
        if k == corrupt:
            (d / name).write_bytes(b"this is not a PNG")
        else:
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / name)
        files[name] = (d / name).read_bytes()
    return files


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mh")
    files = make_images(root / "imgs")
    return root, files


@pytest.fixture(scope="module")
def reference(data, ckpt):
    """The single-process run (in this process), the outputs to compare with."""
    root, _ = data
    out = root / "ref"
    rc = cli.main(["heatmap", str(root / "imgs"), *PROMPTS, "--model", str(ckpt), *KNOBS,
                   "--format", "both", "--out", str(out), "-b", "3", "--quiet"])
    assert rc == 1  # the corrupt image
    return out


def read_outputs(out: Path) -> dict:
    def read(p):
        try:
            return np.load(p) if p.suffix == ".npy" else np.asarray(Image.open(p))
        except OSError as e:
            raise AssertionError(f"{p} ({p.stat().st_size} bytes): {e}; ls: "
                                 f"{sorted(q.name for q in out.iterdir())}") from e
    return {p.name: read(p) for p in sorted(out.iterdir()) if p.name != "manifest.json"}


def assert_same_outputs(out: Path, ref: Path):
    got, want = read_outputs(out), read_outputs(ref)
    assert sorted(got) == sorted(want)
    assert len(want) == 23 * 4  # 23 valid images x (grid, 2 overlays, raw maps)
    worst = max(float(np.abs(got[k].astype(np.float64) - want[k]).max()) for k in want
                if k.endswith(".npy"))
    # Observed max |diff| of the raw cosine maps: 2.1e-7 (the reference runs here, batches of 3,
    # under conftest's matmul precision; the 2 processes batches of 4); tolerance 1e-6 from the
    # issue.  Those differences move a few rendered pixels by one or two levels after uint8
    # rounding (observed: 15 of 69 PNGs, at most 5 pixels each, at most 2 levels).
    assert worst <= 1e-6, worst
    for k in want:
        if k.endswith(".png"):
            d = np.abs(got[k].astype(int) - want[k].astype(int))
            assert got[k].shape == want[k].shape and d.max() <= 2 and (d > 0).mean() < 1e-3, k
    return worst


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def writes(log: Path) -> list[tuple[str, str]]:
    return [tuple(line.split(" ", 1)) for line in log.read_text().splitlines()] \
        if log.exists() else []


# ----------------------------------------------------------------------------- 2 processes
def test_two_processes_write_each_output_once_equal_to_one_process(data, ckpt, reference,
                                                                     tmp_path):
    root, _ = data
    out, log = tmp_path / "o2", tmp_path / "writes.log"
    # 2 CPU devices per process: one global mesh of 4 devices, 2 rows per device per step; each
    # process's last batch is partial (11 valid images on process 1).
    res = run2(["heatmap", root / "imgs", *PROMPTS, "--model", ckpt, *KNOBS, "--format", "both",
                "--out", out, "-b", "4"], root, log, devices=2, flags=True)
    for rc, so, se in res:
        assert rc == 1, se[-3000:]   # one image failed: the run's exit code, on both processes
    # Every valid image's outputs equal the single-process outputs.
    assert_same_outputs(out, reference)
    # ... and were written exactly once, by the process that owns the image (every 2nd image).
    m = manifest(out)
    owner = {im["image"]: k % 2 for k, im in enumerate(m["images"])}
    outs = [(int(p), Path(f).name) for p, f in writes(log) if Path(f).name != "manifest.json"]
    planned = {o["file"]: im["image"] for im in m["images"] for o in im["outputs"]
               if im["status"] == "done"}
    assert sorted(f for _, f in outs) == sorted(planned)          # each planned file once
    assert all(owner[planned[f]] == p for p, f in outs)            # by its image's owner
    assert {p for p, _ in outs} == {0, 1}
    assert all(p == "0" for p, f in writes(log) if Path(f).name == "manifest.json")
    # The manifest, merged by process 0: 23 done (each by its owner), the corrupt one failed.
    assert m["status"] == "incomplete" and m["processes"] == 2
    assert m["counts"] == {"images": 24, "done": 23, "failed": 1, "pending": 0}
    assert all(im["process"] == owner[im["image"]] for im in m["images"] if im["status"] == "done")
    assert not [p for p in out.iterdir() if p.name.startswith(".") or p.suffix == ".jsonl"]
    # The corrupt image: reported once (by its owner, process 1), failed once in the manifest.
    lines = [ln for _, _, se in res for ln in se.splitlines()
             if ln.startswith("error: ") and "im23.png:" in ln]
    assert len(lines) == 1 and "not an image" in lines[0]
    assert "im23.png: not an image" in res[1][2]
    assert [im["image"] for im in m["images"] if im["status"] == "failed"] == \
        [str(root / "imgs" / "im23.png")]
    # Throughput per process, and the whole run on process 0.
    for i, (_, so, _) in enumerate(res):
        assert f"process {i}/2:" in so and "images/s" in so and "host wait" in so
    assert "all 2 processes: 23 image(s) done, 1 failed" in res[0][1]


def test_uneven_shares_run_the_same_number_of_steps(ckpt, tmp_path):
    """3 images, one per step: process 0 has 2, process 1 has 1 and joins the second step of
    the SPMD program with padding only; every output is still the library's."""
    import gem_jax
    paths = [p for p in sorted(make_images(tmp_path / "imgs", n=3, corrupt=-1))]
    out = tmp_path / "o"
    res = run2(["heatmap", tmp_path / "imgs", "-p", "x", "--model", ckpt, *KNOBS, "--format", "npy",
                "--out", out, "-b", "1"], tmp_path, tmp_path / "w.log")
    for rc, so, se in res:
        assert rc == 0, se[-3000:]
    m = manifest(out)
    assert [im["process"] for im in m["images"]] == [0, 1, 0]
    model = gem_jax.load(ckpt)
    from gem_jax.io import read_image
    for name in paths:
        px = model.preprocess([read_image(tmp_path / "imgs" / name)], size=32)
        want = np.asarray(model.heatmaps(px, ["x"], gem_depth=3, normalize=False))[0]
        # Observed max |diff| 0.0 (library, in this process, vs the 2-process run); tol 1e-6.
        assert np.abs(np.load(out / f"{Path(name).stem}_raw.npy") - want).max() <= 1e-6


# ----------------------------------------------------------------------------- eval
def eval_one_and_two(args, tmp_path):
    """The results JSON of `gem-jax eval ARGS` in this process (one.json) and on 2 processes
    joined through the command-line flags (two.json); both must exit 0."""
    from gem_jax.eval.cli import main as eval_main
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert eval_main([str(a) for a in args[1:]] + ["--out", str(one)]) == 0
    res = run2([*args, "--out", two], tmp_path, tmp_path / "w.log", flags=True)
    for rc, so, se in res:
        assert rc == 0, se[-3000:]
    return json.loads(one.read_text()), json.loads(two.read_text())


def test_eval_two_processes_same_miou_exactly(ckpt, tmp_path):
    from test_eval_cli import make_dataset
    from gem_jax.eval.cli import main as eval_main
    make_dataset("voc21", tmp_path / "data", n=7, seed=3)
    args = ["eval", "--dataset", "voc21", "--root", tmp_path / "data", "--model", ckpt,
            "--size", "32", "--gem-depth", "3", "--background-threshold", "0.2", "--quiet"]
    a, b = eval_one_and_two(args, tmp_path)
    assert b["status"] == "complete" and b["counts"]["images"] == 7
    assert b["processes"]["images"] == [4, 3]       # each process evaluated its share
    assert b["confusion_matrix"] == a["confusion_matrix"]
    assert b["metrics"] == a["metrics"]              # mIoU, mAcc, aAcc: exactly equal
    # Teeth: the matrix is not trivial, and one process's share alone gives another mIoU.
    cm = np.asarray(a["confusion_matrix"])
    assert cm.sum() > 0 and (cm - np.diag(np.diag(cm))).sum() > 0
    part = tmp_path / "part.json"
    assert eval_main([str(a) for a in args[1:]] + ["--out", str(part), "--limit", "4"]) == 0
    assert json.loads(part.read_text())["metrics"]["mIoU"] != a["metrics"]["mIoU"]
    assert not list(tmp_path.glob("two.part-*"))   # the parts were folded into two.json


def test_eval_points_two_processes_same_p_miou_exactly(ckpt, tmp_path):
    """--dataset oiv7-points on 2 processes: each evaluates every 2nd image, the per-class point
    counts are summed by class, and the p-mIoU, per-class IoU and counts equal one process's."""
    from test_oiv7 import make_oiv7
    from gem_jax.eval.cli import main as eval_main
    make_oiv7(tmp_path / "oiv7", seed=4, n_images=7)
    args = ["eval", "--dataset", "oiv7-points", "--root", tmp_path / "oiv7", "--model", ckpt,
            "--size", "32", "--gem-depth", "3", "--quiet"]
    a, b = eval_one_and_two(args, tmp_path)
    assert b["status"] == a["status"] == "complete" and b["counts"]["images"] == 7
    assert b["processes"]["images"] == [4, 3]       # each process evaluated its share
    assert b["per_class"] == a["per_class"]         # tp, fp, fn, tn, unsure and IoU per class
    assert b["counts"] == a["counts"] and b["metrics"] == a["metrics"]   # p-mIoU exactly
    # Teeth: the counts are not trivial, and one process's share alone gives other counts.
    assert sum(r["tp"] for r in a["per_class"]) > 0 and sum(r["fp"] + r["fn"]
                                                            for r in a["per_class"]) > 0
    part = tmp_path / "part.json"
    assert eval_main([str(a) for a in args[1:]] + ["--out", str(part), "--limit", "4"]) == 0
    assert json.loads(part.read_text())["per_class"] != a["per_class"]
    assert not list(tmp_path.glob("two.part-*"))   # the parts were folded into two.json


# ----------------------------------------------------------------------------- crash + resume
def test_sigkill_then_resume_completes_without_recomputing(data, ckpt, reference, tmp_path):
    root, files = data
    src = tmp_path / "imgs"
    src.mkdir()
    for name, blob in files.items():
        (src / name).write_bytes(blob)
    # Process 1 takes images 1, 3, 5, ... two per step (-b 2); image 9 is a FIFO nobody writes,
    # so process 1 writes its first outputs and then waits on that image until it is killed.
    stuck = src / "im09.png"
    stuck.unlink()
    os.mkfifo(stuck)
    out, log = tmp_path / "o", tmp_path / "writes.log"
    argv = ["heatmap", src, *PROMPTS, "--model", ckpt, *KNOBS, "--format", "both", "--out", out,
            "-b", "2"]
    port = free_port()
    procs = start(argv, [env_for(i, port, WRITE_LOG=str(log)) for i in range(2)], tmp_path)
    journal = out / "manifest.part-00001-of-00002.jsonl"
    deadline = time.monotonic() + TIMEOUT
    try:
        while time.monotonic() < deadline:
            if journal.exists() and '"status": "done"' in journal.read_text():
                break
            assert procs[1].poll() is None, procs[1].communicate()[1][-3000:]
            time.sleep(0.05)
        else:
            pytest.fail("process 1 wrote no output in time")
        procs[1].send_signal(signal.SIGKILL)
    finally:
        res = finish(procs, timeout=120)   # process 0 fails once its peer is gone
    assert res[1][0] == -signal.SIGKILL
    assert res[0][0] != 0
    from gem_jax.outputs import read_journals
    before = {e["image"]: e for e in read_journals(out) if e["status"] == "done"}
    mine1 = [k for k in before if int(Path(k).stem[2:]) % 2 == 1]
    assert 1 <= len(mine1) < 11     # process 1 finished some of its images, not all
    m0 = manifest(out)
    stat = {o["file"]: _stat(out / o["file"]) for im in m0["images"] if im["image"] in before
            for o in im["outputs"]}
    first_run = m0["run"]

    # The host is back: the image is readable again; rerun both processes with --resume.
    stuck.unlink()
    stuck.write_bytes(files["im09.png"])
    log2 = tmp_path / "writes2.log"
    res = run2([*argv, "--resume"], tmp_path, log2)
    for rc, so, se in res:
        assert rc == 1, se[-3000:]   # the corrupt image fails again
    assert_same_outputs(out, reference)
    m = manifest(out)
    assert m["counts"] == {"images": 24, "done": 23, "failed": 1, "pending": 0}
    assert m["run"] != first_run
    # The images finished before the kill were not recomputed: not written by the resumed run,
    # files untouched (inode and mtime), and recorded with the first run's id.
    rewritten = {Path(f).name for _, f in writes(log2)}
    assert not rewritten & set(stat)
    assert all(_stat(out / f) == st for f, st in stat.items())
    by_image = {im["image"]: im for im in m["images"]}
    assert all(by_image[k]["run"] == first_run for k in before)
    redone = [im for im in m["images"] if im["status"] == "done" and im["image"] not in before]
    assert redone and all(im["run"] == m["run"] for im in redone)
    assert len(before) + len(redone) == 23
    import re
    assert re.search(rf"\b{len(before)} already complete \(--resume\)", res[0][1]), res[0][1]
    assert not list(out.glob("*.jsonl"))
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # killed writes' temps


def _stat(p: Path):
    st = p.stat()
    return st.st_ino, st.st_mtime_ns
