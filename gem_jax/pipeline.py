"""The streaming input pipeline: records from files, directories, globs, @lists and
WebDataset-style `.tar` shards, decoded and preprocessed by grain (in worker processes or
threads), in order, with per-record failures reported and skipped.

    records = expand_records(["photos/", "shards-{000..099}.tar"])   # every process, same list
    for item in stream(records[mine], size=448, mean=..., std=..., workers=4):
        item["index"], item["pixels"]        # float32 [size, size, 3]: gem_jax.preprocess exactly
        item["error"]                        # None, or "<record>: <what is wrong>" (pixels None)

Why grain: it is the JAX ecosystem's maintained loader (Google's, used by MaxText and Flax
examples), it runs Python transforms in worker processes (`mp_prefetch`, spawn, so forking a
process that holds a JAX runtime never happens) or threads (`ReadOptions.num_threads`) with
bounded prefetch buffers, and it keeps the source order, which the exactly-once bookkeeping
needs.  A transform never raises: an unreadable record becomes an item with `error` set.

Tar shards follow WebDataset's convention: members `dir/key.ext` sharing `key` form one sample;
the sample's image is its first member whose extension (everything after the key's first dot)
is an image extension (`jpg`, `png`, `webp`, ...); other members (`json`, `cls`, ...) are
ignored.  Shards are indexed once (tar headers only) and members are read by offset, so any
process or worker reads any record directly.  Compressed shards (`.tar.gz`) cannot be read by
offset and are refused.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tarfile
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from .io import IMAGE_EXTENSIONS, ImageReadError, InputError, decode_image, expand_inputs, read_image

__all__ = ["Record", "index_tar", "expand_records", "load_record", "Decode", "stream",
           "TAR_SUFFIXES"]

TAR_SUFFIXES = (".tar",)
_COMPRESSED_TAR = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")
_IMAGE_EXTS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)


@dataclasses.dataclass(frozen=True)
class Record:
    """One input image.  `key` names it in manifests, messages and `--resume` (a path, or
    `shard.tar:member` for a tar member); `offset`/`size` locate a tar member's bytes in
    `path` (offset -1: the whole file is the image)."""
    key: str
    path: str
    offset: int = -1
    size: int = 0

    @property
    def stem(self) -> str:
        """The wanted stem of its output files (made unique by the OutputPlan)."""
        if self.offset < 0:
            p = Path(self.path)
            return p.stem or p.name
        member = self.key.rsplit(":", 1)[-1]
        base = member.rsplit("/", 1)[-1]
        return base.split(".", 1)[0] or base


def _is_tar(path: str) -> bool:
    return path.lower().endswith(TAR_SUFFIXES)


def index_tar(path: str) -> list[Record]:
    """The image records of one WebDataset-style shard, in member order (headers only)."""
    try:
        tf = tarfile.open(path, mode="r:")  # uncompressed only: members are read by offset
    except tarfile.ReadError as e:
        raise InputError(f"{path}: not a readable uncompressed tar shard ({e})") from None
    except OSError as e:
        raise InputError(f"{path}: cannot open ({e})") from None
    samples: dict[str, list[tarfile.TarInfo]] = {}
    with tf:
        for m in tf:
            if not m.isfile():
                continue
            d, _, base = m.name.rpartition("/")
            if base.startswith("."):
                continue
            key = (d + "/" if d else "") + base.split(".", 1)[0]
            samples.setdefault(key, []).append(m)
    records = []
    for key, members in samples.items():
        image = None
        for m in members:
            base = m.name.rpartition("/")[2]
            ext = base.split(".", 1)[1].lower() if "." in base else ""
            if ext in _IMAGE_EXTS:
                image = m
                break
        if image is not None:
            records.append(Record(f"{path}:{image.name}", path, image.offset_data, image.size))
    return records


def expand_records(args: Iterable[str], *, exclude: Iterable[str | os.PathLike] = ()) -> list[Record]:
    """Records from command-line inputs: files, directories, globs, `@list.txt` and brace
    ranges as `gem_jax.io.expand_inputs`; every `.tar` among them is a WebDataset shard whose
    image members become records.  Raises InputError for an input that names nothing."""
    out: list[Record] = []
    for p in expand_inputs(args, exclude=exclude):
        low = p.lower()
        if low.endswith(_COMPRESSED_TAR):
            raise InputError(f"{p}: compressed tar shards cannot be read by offset; use "
                             f"uncompressed .tar shards (WebDataset's default)")
        if _is_tar(p):
            recs = index_tar(p)
            if not recs:
                raise InputError(f"{p}: no image members in this tar shard (looked for "
                                 f"{', '.join(_IMAGE_EXTS)} members)")
            out += recs
        else:
            out.append(Record(p, p))
    return out


def load_record(rec: Record):
    """The record's image as a PIL RGB image, or ImageReadError naming the record."""
    if rec.offset < 0:
        return read_image(rec.path)
    try:
        with open(rec.path, "rb") as f:
            f.seek(rec.offset)
            data = f.read(rec.size)
    except OSError as e:
        raise ImageReadError(f"{rec.key}: cannot read the shard ({e})") from None
    if len(data) != rec.size:
        raise ImageReadError(f"{rec.key}: the shard ends early (truncated tar?)")
    return decode_image(data, rec.key)


@dataclasses.dataclass(frozen=True)
class Decode:
    """grain map transform: (index, Record) → item dict; decodes and applies GEM's exact
    preprocessing (`gem_jax.preprocess.preprocess`).  Never raises."""
    size: int
    mean: tuple
    std: tuple
    keep_image: bool = False

    def __call__(self, element):
        from .preprocess import preprocess
        index, rec = element
        try:
            img = load_record(rec)
            px = preprocess([img], size=self.size, mean=self.mean, std=self.std)[0]
        except ImageReadError as e:
            return dict(index=index, key=rec.key, pixels=None, image=None, image_size=None,
                        error=str(e))
        except Exception as e:  # anything else about one record must not stop the run
            return dict(index=index, key=rec.key, pixels=None, image=None, image_size=None,
                        error=f"{rec.key}: {type(e).__name__}: {e}")
        return dict(index=index, key=rec.key, pixels=px,
                    image=np.asarray(img, np.uint8) if self.keep_image else None,
                    image_size=(img.width, img.height), error=None)


def _worker_init(i: int, n: int) -> None:
    """In each grain worker: die with the parent process (a SIGKILLed run must not leave
    workers behind), and keep numpy/BLAS single-threaded (the workers are the parallelism)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            import signal
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
            if os.getppid() == 1:  # the parent died before prctl took effect
                os._exit(1)
        except Exception:
            pass


def stream(items: Sequence[tuple[int, Record]], *, size: int, mean, std, keep_image: bool = False,
           workers: int = 0, threads: int = 2, buffer: int = 16) -> Iterator[dict]:
    """Decoded items for `items` ((index, Record) pairs), in order.

    workers > 0: decoding in that many grain worker processes (spawned; each imports gem_jax,
    about a second, so it pays off from a few hundred images); 0: in `threads` threads of this
    process.  `buffer`: items decoded ahead (per worker process, or in total for threads)."""
    if not items:
        return iter(())
    import grain
    decode = Decode(int(size), tuple(float(m) for m in mean), tuple(float(s) for s in std),
                    bool(keep_image))
    ds = grain.MapDataset.source(list(items)).map(decode)
    if workers > 0:
        from absl import flags  # grain reads absl flags in mp_prefetch; a CLI never parses them
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        workers = min(workers, len(items))
        it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
        it_ds = it_ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=workers,
                                         per_worker_buffer_size=max(1, buffer // workers)),
            worker_init_fn=_worker_init)
    else:
        it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, threads),
                                                     prefetch_buffer_size=max(buffer, threads)))
    return _closing(iter(it_ds))


def _closing(it) -> Iterator[dict]:
    """Iterate, then close the grain iterator (stops its workers) however the loop ends."""
    try:
        yield from it
    finally:
        close = getattr(it, "close", None)
        if callable(close):
            try:
                close()
            except Exception:
                pass
