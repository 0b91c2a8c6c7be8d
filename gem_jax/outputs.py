"""Output directories that never lose data: the OUT rule, planned collision-free names, and
`manifest.json`.

The rule, for every command that writes (heatmap, segment, demo; convert for checkpoints):
OUT must be absent, an empty directory, or -- with --force -- a directory holding only a previous
gem-jax output (the files its manifest lists), of which only the files this run plans are
replaced.  A file at OUT, or a directory with files gem-jax did not write, is refused.

    plan = OutputPlan()                                   # names decided before computing
    stem = plan.stem("a", image="a.png")                  # per image: a, a-2, ... (case-insensitive)
    name = plan.claim(f"{stem}_cat.png", image="a.png", prompt="cat", kind="overlay")
    prev = check_out_dir(out, plan.names, force=False)    # refuses before anything is computed
    m = Manifest(out, header, images, collisions=plan.collisions, previous=prev.carried(plan.names, out))
    m.save(); ...; m.output_done(i, name); m.image_done(i, map_shape=...); m.maybe_save()
    m.finish("complete")

The manifest records, per image, its output files and whether each is complete; it is written
atomically (temp file + rename) when the run starts, as images complete (after every image for
runs up to 200 images, then every N/200 images), and when the run ends or is interrupted.

Exactly-once, resumable runs (one process or many, gem_jax.batch): each process appends one
line per finished image to its journal `manifest.part-IIIII-of-NNNNN.jsonl` (flushed per image,
so a crash loses at most the images in flight); when the run ends, process 0 merges the
journals into manifest.json and removes them.  `resume_state(out, header, images)` reads
manifest.json and any journals left by a crashed run and says which planned images are complete
(recorded done, same output names, files present): `--resume` skips those and redoes the rest.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

__all__ = ["MANIFEST", "OutIsAFileError", "OutputConflictError", "file_key", "OutputPlan",
           "Previous", "check_out_dir", "Manifest", "read_manifest", "manifest_files",
           "check_checkpoint_dir", "install_dir", "Journal", "journal_name", "is_journal",
           "read_journals", "remove_journals", "remove_temps", "resume_state", "VOLATILE_HEADER"]

MANIFEST = "manifest.json"
FORMAT = "gem_jax.manifest"
VERSION = 1
# Rewriting the whole manifest after every image costs O(N^2) for N images; saving once per
# N/_SAVES_PER_RUN finished images (and always at the start and the end) bounds a run's manifest
# writes to ~_SAVES_PER_RUN full rewrites, and is still every image for runs up to that size.
_SAVES_PER_RUN = 200


class OutIsAFileError(FileExistsError):
    """OUT names an existing file: a usage error (exit 2); never replaced, even with --force."""


class OutputConflictError(FileExistsError):
    """OUT holds files that this run may not write over (exit 1)."""


def file_key(name: str) -> str:
    """The key under which two file names are the same file on case-insensitive (macOS, Windows)
    and normalization-insensitive (APFS, HFS+) file systems: canonical caseless matching."""
    return unicodedata.normalize("NFD", unicodedata.normalize("NFD", name).casefold())


def _numbered(name: str, k: int) -> str:
    base, ext = os.path.splitext(name)
    return f"{base}-{k}{ext}"


class OutputPlan:
    """Unique output names, decided before anything is computed.  Duplicates (compared with
    `file_key`) get `-2`, `-3`, ... in the order they are claimed, and each rename is recorded in
    `collisions`, so the result is deterministic and nothing is ever overwritten."""

    def __init__(self, reserved: Iterable[str] = (MANIFEST,)):
        self._files: dict[str, str] = {file_key(r): r for r in reserved}
        self._stems: set[str] = set()
        self.names: list[str] = []
        self.collisions: list[dict] = []

    def stem(self, wanted: str, **who) -> str:
        """A unique per-image stem (so all of an image's files share it)."""
        wanted = wanted or "image"
        s, k = wanted, 2
        while file_key(s) in self._stems:
            s, k = f"{wanted}-{k}", k + 1
        self._stems.add(file_key(s))
        if s != wanted:
            self.collisions.append(dict(wanted_stem=wanted, stem=s, **who))
        return s

    def claim(self, wanted: str, **who) -> str:
        name, k = wanted, 2
        while file_key(name) in self._files:
            name, k = _numbered(wanted, k), k + 1
        self._files[file_key(name)] = name
        self.names.append(name)
        if name != wanted:
            self.collisions.append(dict(wanted=wanted, file=name, **who))
        return name


# ----------------------------------------------------------------------------- the OUT rule
def read_manifest(path: str | os.PathLike) -> dict | None:
    """A gem-jax manifest, or None if `path` is missing or is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("format") == FORMAT else None


def manifest_files(m: dict) -> list[dict]:
    """Every file a manifest says gem-jax wrote (or planned): outputs and carried `previous`."""
    entries = []
    for im in m.get("images", []) or []:
        for o in im.get("outputs", []) or []:
            if isinstance(o, dict) and isinstance(o.get("file"), str):
                entries.append(dict(o, image=im.get("image")))
    entries += [p for p in m.get("previous", []) or []
                if isinstance(p, dict) and isinstance(p.get("file"), str)]
    return entries


def _is_our_temp(name: str, known: set[str]) -> bool:
    """Leftovers of an interrupted atomic write: `.{name}.XXXX.tmp` (gem_jax.io.atomic_write)."""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return False
    return any(name.startswith(f".{k}.") for k in known)


@dataclass
class Previous:
    """What a previous gem-jax output in OUT holds (empty when OUT is new or empty)."""
    entries: list[dict] = field(default_factory=list)

    def carried(self, planned: Iterable[str], out: Path) -> list[dict]:
        """The previous files this run does not rewrite and that still exist: kept, and listed
        under `previous` in the new manifest so they stay mapped to their image and prompt."""
        keys = {file_key(n) for n in planned}
        seen, keep = set(), []
        for e in self.entries:
            k = file_key(e["file"])
            if k in keys or k in seen or not (out / e["file"]).is_file():
                continue
            seen.add(k)
            keep.append({key: e[key] for key in ("file", "image", "prompt", "kind") if key in e})
        return keep


def _listing(names: Sequence[str], n: int = 3) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def check_out_dir(out: str | os.PathLike, planned: Iterable[str], *, force: bool,
                  flag: str = "--out", manifest: str = MANIFEST) -> Previous:
    """Apply the OUT rule before anything is computed; see the module docstring.

    Raises OutIsAFileError (OUT is a file) or OutputConflictError (OUT holds other files, or a
    previous output without `force`)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutIsAFileError(f"{flag} {out} is a file; outputs go into a directory (new, empty, "
                              f"or a previous gem-jax output with --force)")
    if not out.exists():
        return Previous()
    entries = sorted(os.listdir(out))
    if not entries:
        return Previous()
    m = read_manifest(out / manifest)
    known_entries = manifest_files(m) if m is not None else []
    known = {manifest} | {e["file"] for e in known_entries}
    known_keys = {file_key(k) for k in known}
    foreign = [e for e in entries if (out / e).is_dir()
               or (file_key(e) not in known_keys and not _is_our_temp(e, known)
                   and not (m is not None and is_journal(e)))]
    if foreign:
        what = ("holds files gem-jax did not write" if m is not None else
                f"is not empty and holds no gem-jax {manifest}")
        raise OutputConflictError(
            f"{flag} {out} {what} ({_listing(foreign)}); gem-jax writes only into a new or empty "
            f"directory, or replaces a previous gem-jax output there with --force: choose "
            f"another {flag}")
    if not force:
        planned_keys = {file_key(p) for p in planned}
        clash = [e for e in entries if file_key(e) in planned_keys]
        what = (f"output {out / clash[0]} already exists"
                + (f" ({_listing(clash[1:])} too)" if len(clash) > 1 else "")
                if clash else f"{out} holds a previous gem-jax output ({manifest})")
        raise OutputConflictError(f"{what}; pass --force to replace the previous gem-jax output "
                                  f"(files it does not rewrite are kept), or choose another {flag}")
    return Previous(known_entries)


# ----------------------------------------------------------------------------- manifest
def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class Manifest:
    """`manifest.json` in OUT: the run's settings and, per image, its planned output files with
    a `complete` flag, the image's status (pending / done / failed) and any error."""

    def __init__(self, out: str | os.PathLike, header: dict, images: list[dict], *,
                 collisions: Sequence[dict] = (), previous: Sequence[dict] = (),
                 name: str = MANIFEST):
        from . import __version__
        self.path = Path(out) / name
        for im in images:
            im.setdefault("status", "pending")
            im.setdefault("error", None)
            for o in im["outputs"]:
                o.setdefault("complete", im["status"] == "done")
        reserved = {"format", "version", "gem_jax_version", "status", "started", "updated",
                    "counts", "collisions", "previous", "images"}
        if reserved & set(header):
            raise ValueError(f"manifest header keys {sorted(reserved & set(header))} are reserved")
        self.data = {"format": FORMAT, "version": VERSION, "gem_jax_version": __version__,
                     **header, "status": "running", "started": _now(), "updated": None,
                     "counts": {}, "collisions": list(collisions), "previous": list(previous),
                     "images": images}
        self._index = [{o["file"]: o for o in im["outputs"]} for im in images]
        self._every = max(1, len(images) // _SAVES_PER_RUN)
        self._finished_at_save = 0

    @property
    def images(self) -> list[dict]:
        return self.data["images"]

    def output_done(self, i: int, file: str) -> None:
        self._index[i][file]["complete"] = True

    def image_done(self, i: int, **info) -> None:
        self.images[i].update(info, status="done", error=None)

    def image_failed(self, i: int, error: str, **info) -> None:
        self.images[i].update(info, status="failed", error=error)

    def merge(self, entries: Iterable[dict]) -> int:
        """Fold journal entries (`Journal.record`'s dicts, in order) into the images they name;
        returns how many images changed."""
        where = {im["image"]: i for i, im in enumerate(self.images)}
        changed = 0
        for e in entries:
            i = where.get(e.get("image"))
            if i is None:
                continue
            info = {k: v for k, v in e.items() if k not in ("image", "status", "error", "outputs", "t")}
            if e.get("status") == "done":
                for f in e.get("outputs", []):
                    if f in self._index[i]:
                        self._index[i][f]["complete"] = True
                self.image_done(i, **info)
            elif e.get("status") == "failed" and self.images[i]["status"] != "done":
                self.image_failed(i, e.get("error") or "failed", **info)
            else:
                continue
            changed += 1
        return changed

    def counts(self) -> dict:
        st = [im["status"] for im in self.images]
        return {"images": len(st), "done": st.count("done"), "failed": st.count("failed"),
                "pending": st.count("pending")}

    def save(self) -> None:
        """Write atomically (temp file + rename: readers see the old or the new manifest)."""
        from .io import atomic_write
        counts = self.counts()
        self.data.update(updated=_now(), counts=counts)
        blob = json.dumps(self.data, indent=1, ensure_ascii=False).encode("utf-8")
        atomic_write(self.path, lambda f: f.write(blob), force=True)
        self._finished_at_save = counts["done"] + counts["failed"]

    def maybe_save(self) -> None:
        """Save if enough images finished since the last save (see _SAVES_PER_RUN)."""
        c = self.counts()
        if c["done"] + c["failed"] - self._finished_at_save >= self._every:
            self.save()

    def finish(self, status: str) -> None:
        self.data["status"] = status
        self.save()


# ----------------------------------------------------------------------------- journals, resume
JOURNAL_FORMAT = "gem_jax.journal"
_JOURNAL = re.compile(r"^manifest\.part-(\d{5})-of-(\d{5})\.jsonl$")
# Header keys that may differ between a run and its --resume (how it runs, not what it computes).
VOLATILE_HEADER = frozenset({"processes", "run", "batch_size", "workers"})


def journal_name(process: int, processes: int) -> str:
    return f"manifest.part-{process:05d}-of-{processes:05d}.jsonl"


def is_journal(name: str) -> bool:
    return _JOURNAL.match(name) is not None


class Journal:
    """One process's append-only record of finished images: a header line, then one JSON line
    per image (done or failed), each flushed as it is written (and fsynced at most every
    `sync_every` seconds), so a crash of the process loses at most the images in flight.
    Thread-safe (outputs are written by a pool of threads)."""

    def __init__(self, out: str | os.PathLike, process: int, processes: int, run: str,
                 sync_every: float = 2.0):
        self.path = Path(out) / journal_name(process, processes)
        self._f = open(self.path, "a", encoding="utf-8")
        self._lock = threading.Lock()
        self._sync_every, self._synced = sync_every, time.monotonic()
        self._write({"format": JOURNAL_FORMAT, "run": run, "process": process,
                     "processes": processes, "started": _now()})

    def _write(self, obj: dict) -> None:
        line = json.dumps(obj, ensure_ascii=False) + "\n"
        with self._lock:
            self._f.write(line)
            self._f.flush()
            if time.monotonic() - self._synced >= self._sync_every:
                os.fsync(self._f.fileno())
                self._synced = time.monotonic()

    def record(self, image: str, status: str, outputs: Sequence[str] = (), error: str | None = None,
               **info) -> None:
        self._write({"image": image, "status": status, "error": error, "outputs": list(outputs),
                     "finished": _now(), "t": round(time.time(), 6), **info})

    def close(self) -> None:
        with self._lock:
            if not self._f.closed:
                self._f.flush()
                os.fsync(self._f.fileno())
                self._f.close()


def read_journals(out: str | os.PathLike) -> list[dict]:
    """The image entries of every journal in OUT, file by file, in the order written.  A line
    cut short by a crash (the last one) is ignored."""
    out = Path(out)
    entries = []
    try:
        names = sorted(n for n in os.listdir(out) if is_journal(n))
    except OSError:
        return []
    for n in names:
        try:
            lines = (out / n).read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if isinstance(e, dict) and isinstance(e.get("image"), str) and "status" in e:
                entries.append(e)
    return sorted(entries, key=lambda e: e.get("t", 0.0) if isinstance(e.get("t"), (int, float))
                  else 0.0)  # stable: the order written, across processes and runs


def remove_temps(out: str | os.PathLike, names: Iterable[str]) -> list[str]:
    """Remove the temporary files that interrupted atomic writes of `names` left in OUT (a
    killed process cannot remove its own): `.{name}.XXXX.tmp`.  Returns what was removed."""
    out = Path(out)
    known = set(names) | {MANIFEST}
    gone = []
    try:
        entries = os.listdir(out)
    except OSError:
        return gone
    for e in entries:
        if _is_our_temp(e, known) and (out / e).is_file():
            try:
                os.unlink(out / e)
                gone.append(e)
            except FileNotFoundError:
                pass
    return gone


def remove_journals(out: str | os.PathLike) -> None:
    """Remove the journals (gem-jax's own files) once manifest.json holds what they said."""
    out = Path(out)
    for n in os.listdir(out):
        if is_journal(n):
            try:
                os.unlink(out / n)
            except FileNotFoundError:
                pass


def _settings_diff(old: dict, header: dict) -> list[str]:
    diffs = []
    for k in sorted(set(header) | {k for k in old if k not in _RESERVED}):
        if k in VOLATILE_HEADER:
            continue
        if json.dumps(old.get(k), sort_keys=True) != json.dumps(header.get(k), sort_keys=True):
            diffs.append(f"{k}: {old.get(k)!r} then, {header.get(k)!r} now")
    return diffs


def resume_state(out: str | os.PathLike, header: dict, images: Sequence[dict], *,
                 flag: str = "--out") -> tuple[Previous, dict[int, dict]]:
    """What `--resume` may skip: (previous output, {index in `images`: its recorded entry}).

    OUT absent or empty: nothing (a fresh run).  Otherwise OUT must hold a previous gem-jax
    output (the OUT rule's foreign-file check applies) of the same settings (`header`, except
    VOLATILE_HEADER keys), else OutputConflictError.  An image is complete when manifest.json
    or a journal records it done with exactly the output names planned now, and every one of
    those files exists; the others (pending, failed, partly written) are redone."""
    out = Path(out)
    prev = check_out_dir(out, [], force=True, flag=flag)
    m = read_manifest(out / MANIFEST)
    if m is None:
        return prev, {}
    diffs = _settings_diff(m, header)
    if diffs:
        raise OutputConflictError(
            f"{flag} {out} holds a gem-jax run with other settings ({'; '.join(diffs[:3])}); "
            f"--resume continues only the same run: repeat its options, or redo it with --force "
            f"(without --resume), or choose another {flag}")
    state: dict[str, dict] = {}
    for im in m.get("images", []) or []:
        outs = im.get("outputs", []) or []
        if im.get("status") == "done" and all(o.get("complete") for o in outs):
            entry = {k: v for k, v in im.items() if k not in ("outputs", "stem")}
            state[im.get("image")] = dict(entry, outputs=[o.get("file") for o in outs])
    for e in read_journals(out):
        if e.get("status") == "done":
            state[e["image"]] = e
        else:
            state.pop(e["image"], None)
    done = {}
    for i, im in enumerate(images):
        e = state.get(im["image"])
        files = [o["file"] for o in im["outputs"]]
        if e is not None and sorted(e.get("outputs", [])) == sorted(files) \
                and all((out / f).is_file() for f in files):
            done[i] = e
    return prev, done


_RESERVED = frozenset({"format", "version", "gem_jax_version", "status", "started", "updated",
                       "counts", "collisions", "previous", "images"})


# ----------------------------------------------------------------------------- checkpoint dirs
# Files a gem-jax checkpoint directory may hold: native (gem_jax_config.json, params.safetensors),
# an HF export (config.json, model.safetensors) and the tokenizer files both write.
TOKENIZER_FILES = frozenset({"vocab.json", "merges.txt", "tokenizer_config.json",
                             "special_tokens_map.json", "tokenizer.json"})
CONFIG_FILES = ("gem_jax_config.json", "config.json")
CHECKPOINT_FILES = TOKENIZER_FILES | {"gem_jax_config.json", "params.safetensors", "config.json",
                                      "model.safetensors"}


def check_checkpoint_dir(out: str | os.PathLike, *, force: bool, known: Iterable[str] = CHECKPOINT_FILES,
                         markers: Sequence[str] = CONFIG_FILES) -> list[str]:
    """The OUT rule for a checkpoint directory; returns its current entries.

    OUT may be absent or an empty directory; with `force`, a directory holding only checkpoint
    files (`known`) including one of `markers` (its config).  A file at OUT is always refused
    (OutIsAFileError); anything else raises OutputConflictError naming what is in the way."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutIsAFileError(f"{out} is a file; a checkpoint is a directory, and gem-jax never "
                              f"replaces a file with one: choose another OUT")
    if not out.exists():
        return []
    entries = sorted(os.listdir(out))
    if not entries:
        return []
    if not force:
        raise OutputConflictError(f"{out} already exists; pass --force to replace the gem-jax "
                                  f"checkpoint in it (only its own files), or choose another OUT")
    known = set(known)
    foreign = [e for e in entries if e not in known or not (out / e).is_file()]
    if foreign:
        raise OutputConflictError(
            f"{out} holds files that are not part of a gem-jax checkpoint ({_listing(foreign)}); "
            f"--force replaces only a previous checkpoint's own files: move them away or choose "
            f"another OUT")
    if not any(m in entries for m in markers):
        raise OutputConflictError(f"{out} holds no {' or '.join(markers)}, so it is not a previous "
                                  f"gem-jax checkpoint; --force replaces only one: choose another OUT")
    return entries


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def install_dir(tmp: str | os.PathLike, out: str | os.PathLike, *, force: bool) -> Path:
    """Move the files of a freshly written directory `tmp` (a sibling of `out`) to `out`.

    New `out`: one atomic rename.  Existing `out` (empty, or with `force` a previous checkpoint
    of the same kind, checked again here): each file is renamed into place (config last, so a
    crash leaves the old config, which then fails to load the new weights loudly), and the previous checkpoint's
    tokenizer files that this write no longer has are removed so they cannot pair with the new
    weights.  Permissions follow the umask like every other output (not mkdtemp's 0700/0600)."""
    tmp, out = Path(tmp), Path(out)
    mask = _umask()
    names = sorted(os.listdir(tmp))
    for n in names:
        os.chmod(tmp / n, 0o666 & ~mask)
    os.chmod(tmp, 0o777 & ~mask)
    markers = [m for m in CONFIG_FILES if m in names][:1] or list(CONFIG_FILES)
    entries = check_checkpoint_dir(out, force=force, known=set(names) | TOKENIZER_FILES,
                                   markers=markers)
    if not out.exists():
        tmp.rename(out)
        return out
    for n in sorted(names, key=lambda n: n in CONFIG_FILES):  # config last
        os.replace(tmp / n, out / n)
    for n in entries:
        if n in TOKENIZER_FILES and n not in names:
            os.unlink(out / n)
    tmp.rmdir()
    return out
