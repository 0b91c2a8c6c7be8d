"""The streaming input pipeline (gem_jax.pipeline, on grain) and single-process resumable runs:
WebDataset-style tar shards, brace ranges, GEM's exact preprocessing in threads or worker
processes, per-record failures reported and skipped, `--resume` after an interruption."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import gem_jax
from gem_jax import cli
from gem_jax.io import InputError
from gem_jax.pipeline import Record, expand_records, load_record, stream
from gem_jax.preprocess import OPENAI_MEAN, OPENAI_STD, preprocess

from test_cli import tiny_checkpoint

KNOBS = ["--gem-depth", "3", "--size", "32"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory)


def _encoded(rng, h, w, fmt) -> bytes:
    b = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(b, format=fmt)
    return b.getvalue()


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two WebDataset shards: samples with a jpg or png image and json/cls side members, one
    sample without an image, one truncated image; the same key in both shards."""
    d = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    images = {}
    m0 = []
    for k, (h, w, fmt) in enumerate([(30, 50, "PNG"), (64, 20, "JPEG"), (25, 25, "PNG")]):
        ext = "png" if fmt == "PNG" else "jpg"
        images[f"s/{k:04d}.{ext}"] = _encoded(rng, h, w, fmt)
        m0 += [(f"s/{k:04d}.{ext}", images[f"s/{k:04d}.{ext}"]), (f"s/{k:04d}.json", b"{}")]
    m0.append(("s/0003.cls", b"7"))                       # no image: not a record
    write_shard(d / "shard-000.tar", m0)
    trunc = _encoded(rng, 40, 40, "PNG")
    m1 = [("0000.seg.png", _encoded(rng, 8, 8, "PNG")),   # ext "seg.png": not the image
          ("0000.webp", _encoded(rng, 33, 17, "WEBP")), ("0001.png", trunc[:len(trunc) // 2])]
    images["0000.webp"] = m1[1][1]
    write_shard(d / "shard-001.tar", m1)
    return d, images


def test_tar_shards_and_brace_ranges(shards, monkeypatch):
    d, images = shards
    monkeypatch.chdir(d)
    recs = expand_records(["shard-{000..001}.tar"])
    assert [r.key for r in recs] == ["shard-000.tar:s/0000.png", "shard-000.tar:s/0001.jpg",
                                     "shard-000.tar:s/0002.png", "shard-001.tar:0000.webp",
                                     "shard-001.tar:0001.png"]
    assert [r.stem for r in recs] == ["0000", "0001", "0002", "0000", "0001"]
    for r in recs[:4]:  # each member read by offset is its bytes, decoded as a file would be
        member = r.key.split(":", 1)[1]
        want = Image.open(io.BytesIO(images[member])).convert("RGB")
        assert np.array_equal(np.asarray(load_record(r)), np.asarray(want))


def test_stream_preprocesses_exactly_and_reports_failures(shards, tmp_path, monkeypatch):
    d, images = shards
    monkeypatch.chdir(d)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    gone = tmp_path / "gone.png"
    recs = expand_records(["shard-{000..001}.tar", str(bad)]) + [Record(str(gone), str(gone))]
    items = list(stream(list(enumerate(recs)), size=24, mean=OPENAI_MEAN, std=OPENAI_STD,
                        keep_image=True, threads=3, buffer=4))
    assert [it["index"] for it in items] == list(range(7))             # source order
    ok = items[:4]
    for it, r in zip(ok, recs):
        img = Image.open(io.BytesIO(images[r.key.split(":", 1)[1]]))
        want = preprocess([img], size=24)[0]                              # GEM's preprocessing
        assert it["error"] is None and it["pixels"].shape == (24, 24, 3)  # mixed sizes -> 24
        assert np.array_equal(it["pixels"], want)
        assert it["image_size"] == img.size and it["image"].shape == (img.size[1], img.size[0], 3)
    errs = [it["error"] for it in items[4:]]
    assert "shard-001.tar:0001.png" in errs[0] and "truncated" in errs[0]
    assert str(bad) in errs[1] and "not an image" in errs[1]
    assert str(gone) in errs[2] and "no such file" in errs[2]
    assert all(it["pixels"] is None for it in items[4:])


def test_worker_processes_give_the_same_items(shards, monkeypatch):
    """Decoding in 2 grain worker processes: same items, same order, same bytes as threads."""
    d, _ = shards
    monkeypatch.chdir(d)
    recs = list(enumerate(expand_records(["shard-{000..001}.tar"])))
    kw = dict(size=16, mean=OPENAI_MEAN, std=OPENAI_STD)
    a = list(stream(recs, workers=2, **kw))
    b = list(stream(recs, workers=0, **kw))
    assert [x["index"] for x in a] == [x["index"] for x in b] == list(range(5))
    for x, y in zip(a, b):
        assert x["error"] == y["error"]
        assert (x["pixels"] is None and y["pixels"] is None) or np.array_equal(x["pixels"],
                                                                               y["pixels"])


def test_bad_shards_are_usage_errors(tmp_path):
    write_shard(tmp_path / "empty.tar", [("a.json", b"{}")])
    with pytest.raises(InputError, match="no image members"):
        expand_records([str(tmp_path / "empty.tar")])
    with tarfile.open(tmp_path / "c.tar.gz", "w:gz"):
        pass
    with pytest.raises(InputError, match="compressed tar shards"):
        expand_records([str(tmp_path / "c.tar.gz")])
    (tmp_path / "junk.tar").write_bytes(b"x" * 10)
    with pytest.raises(InputError, match="junk.tar"):
        expand_records([str(tmp_path / "junk.tar")])
    with pytest.raises(InputError, match="no such file"):
        expand_records([str(tmp_path / "s-{0..1}.tar")])


def run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_heatmap_on_tar_shards(capsys, ckpt, shards, tmp_path, monkeypatch):
    d, images = shards
    monkeypatch.chdir(d)
    out = tmp_path / "o"
    rc, so, err = run(capsys, "heatmap", "shard-{000..001}.tar", "-p", "x", "--model", ckpt, *KNOBS,
                      "--format", "npy", "--out", out, "-b", "2")
    assert rc == 1 and "shard-001.tar:0001.png" in err   # the truncated member: reported, skipped
    names = sorted(p.name for p in out.iterdir())
    assert names == ["0000-2_raw.npy", "0000_raw.npy", "0001_raw.npy", "0002_raw.npy",
                     "manifest.json"]                    # same key in two shards: -2
    model = gem_jax.load(ckpt)
    px = model.preprocess([Image.open(io.BytesIO(images["0000.webp"]))], size=32)
    want = np.asarray(model.heatmaps(px, ["x"], gem_depth=3, normalize=False))[0]
    # Observed max |diff| 0.0; tolerance 1e-6.
    assert np.abs(np.load(out / "0000-2_raw.npy") - want).max() <= 1e-6
    m = json.loads((out / "manifest.json").read_text())
    assert [im["status"] for im in m["images"]] == ["done"] * 4 + ["failed"]
    assert m["images"][3]["image"] == "shard-001.tar:0000.webp"


# ----------------------------------------------------------------------------- resume, 1 process
def pictures(d: Path, n: int) -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    out = []
    for k in range(n):
        p = d / f"p{k}.png"
        Image.fromarray(rng.integers(0, 256, (20 + 3 * k, 30, 3), dtype=np.uint8)).save(p)
        out.append(p)
    return out


def test_resume_after_interruption(capsys, ckpt, tmp_path, monkeypatch):
    from gem_jax import io as gio
    src = pictures(tmp_path / "src", 5)
    out = tmp_path / "o"
    argv = ["heatmap", tmp_path / "src", "-p", "x", "--model", ckpt, *KNOBS, "--format", "npy",
            "--out", out, "-b", "1", "--writers", "1"]
    real, written, interrupt = gio.atomic_write, [], [True]

    def save(path, write, **kw):
        if Path(path).name != "manifest.json":
            written.append(Path(path).name)
            if len(written) == 3 and interrupt and interrupt.pop():  # Ctrl-C on the 3rd image
                raise KeyboardInterrupt
        return real(path, write, **kw)

    monkeypatch.setattr(gio, "atomic_write", save)
    rc, so, err = run(capsys, *argv)
    assert rc == 130
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "interrupted"
    assert [im["status"] for im in m["images"]] == ["done", "done", "pending", "pending", "pending"]
    first = {f: (out / f).stat().st_ino for f in ("p0_raw.npy", "p1_raw.npy")}
    # Without --resume (or --force) the previous output is not touched.
    rc, so, err = run(capsys, *argv)
    assert rc == 1 and "--force" in err and "--resume to continue" in err
    written.clear()
    rc, so, err = run(capsys, *argv, "--resume")
    assert rc == 0, err
    assert sorted(written) == ["p2_raw.npy", "p3_raw.npy", "p4_raw.npy"]   # only the rest
    assert {f: (out / f).stat().st_ino for f in first} == first
    assert "2 already complete (--resume)" in so
    m2 = json.loads((out / "manifest.json").read_text())
    assert m2["status"] == "complete" and m2["counts"]["done"] == 5
    assert [im["run"] for im in m2["images"]][:2] == [m["run"]] * 2 and m2["run"] != m["run"]
    # Resuming a complete run does nothing; other settings are refused.
    written.clear()
    assert run(capsys, *argv, "--resume")[0] == 0 and written == []
    rc, so, err = run(capsys, *argv[:-4], "--size", "48", "--resume")
    assert rc == 1 and "other settings" in err and "size" in err
    # --resume on a new --out is a fresh run.
    rc, so, err = run(capsys, *argv, "--out", tmp_path / "new", "--resume")
    assert rc == 0, err
    assert len(list((tmp_path / "new").glob("*.npy"))) == 5


def test_resume_reads_a_crashed_runs_journal(capsys, ckpt, tmp_path):
    """A crash leaves manifest.json 'running' and the journal: --resume trusts the journal's
    done images whose files exist, and redoes an image whose file is missing."""
    from gem_jax.outputs import Journal
    pictures(tmp_path / "src", 3)
    out = tmp_path / "o"
    argv = ["heatmap", tmp_path / "src", "-p", "x", "--model", ckpt, *KNOBS, "--format", "npy",
            "--out", out]
    assert run(capsys, *argv)[0] == 0
    m = json.loads((out / "manifest.json").read_text())
    for im in m["images"]:       # as process 0 wrote it at the start of the crashed run
        im["status"] = "pending"
        for o in im["outputs"]:
            o["complete"] = False
    m["status"] = "running"
    (out / "manifest.json").write_text(json.dumps(m))
    j = Journal(out, 0, 1, "crashed")
    j.record(m["images"][0]["image"], "done", ["p0_raw.npy"])
    j.record(m["images"][1]["image"], "done", ["p1_raw.npy"])
    j.close()
    with open(j.path, "a") as f:
        f.write('{"image": "cut sh')                       # a line cut short by the crash
    (out / "p1_raw.npy").unlink()                          # recorded done, file lost
    ino = (out / "p0_raw.npy").stat().st_ino
    rc, so, err = run(capsys, *argv, "--resume")
    assert rc == 0, err
    assert "1 already complete (--resume)" in so
    assert (out / "p0_raw.npy").stat().st_ino == ino and (out / "p1_raw.npy").is_file()
    assert not list(out.glob("*.jsonl"))
    assert json.loads((out / "manifest.json").read_text())["counts"]["done"] == 3


def test_summary_reports_throughput(capsys, ckpt, tmp_path):
    pictures(tmp_path / "src", 6)
    rc, so, err = run(capsys, "heatmap", tmp_path / "src", "-p", "x", "--model", ckpt, *KNOBS,
                      "--format", "npy", "--out", tmp_path / "o", "-b", "2")
    assert rc == 0, err
    line = so.splitlines()[0]
    assert line.startswith("6 image(s) in") and "images/s" in line and "after the first step" in line
    assert "host wait" in line and "0 failed" in line


def test_progress_bar_shows_rate_and_eta(capsys, ckpt, tmp_path):
    """The progress bar (stderr, one per process) counts images and shows images/s and the ETA
    (tqdm's "elapsed<remaining, rate img/s"); --quiet turns it off."""
    pictures(tmp_path / "src", 6)
    base = ["heatmap", tmp_path / "src", "-p", "x", "--model", ckpt, *KNOBS, "--format", "npy",
            "-b", "2"]
    rc, so, err = run(capsys, *base, "--out", tmp_path / "o")
    assert rc == 0, err
    assert "heatmap" in err and "/6" in err and "img/s" in err and "<" in err, err[-500:]
    rc, so, err = run(capsys, *base, "--out", tmp_path / "q", "--quiet")
    assert rc == 0 and "img/s" not in err
