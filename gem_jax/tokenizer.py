"""Pure-Python CLIP byte-level BPE tokenizer.

Produces token ids identical to open_clip 2.23.0's ``SimpleTokenizer`` (the
``clean='lower'`` variant used by every OpenAI/OpenCLIP CLIP model) without
depending on torch or transformers. Runtime dependencies: numpy, regex, ftfy.

Special-token handling follows open_clip on purpose: the literal strings
``<start_of_text>`` / ``<end_of_text>`` inside a prompt map to the sot/eot ids,
whatever file the vocabulary was loaded from. The Hugging Face spellings
(``<|startoftext|>`` / ``<|endoftext|>``) are only used as vocabulary keys in
``vocab.json`` / ``tokenizer.json``.
"""

from __future__ import annotations

import gzip
import html
import json
import operator
import warnings
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Union

import ftfy
import numpy as np
import regex

__all__ = ["CLIPTokenizer", "DEFAULT_CONTEXT_LENGTH", "default_bpe_path"]

DEFAULT_CONTEXT_LENGTH = 77

# Hugging Face spellings (vocab.json keys) and open_clip spellings (text form).
HF_SOT, HF_EOT = "<|startoftext|>", "<|endoftext|>"
OC_SOT, OC_EOT = "<start_of_text>", "<end_of_text>"

# open_clip reads exactly this many merges from the gz file: 49152 - 256 (bytes)
# - 2 (specials), giving a 49408-token vocabulary.
_NUM_GZ_MERGES = 49152 - 256 - 2
_EOW = "</w>"
# Bound the per-word cache so a long-running process tokenizing unbounded
# vocabulary (e.g. random strings) cannot grow memory without limit.
_CACHE_MAX = 200_000

# Same alternation as open_clip (specials first, then contractions, letter runs,
# single digits, punctuation runs). IGNORECASE is kept for parity even though
# the text is already lowercased.
_PAT = regex.compile(
    regex.escape(OC_SOT)
    + "|"
    + regex.escape(OC_EOT)
    + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
# Must be the `regex` module's \s (Unicode White_Space), not `re`'s: they
# disagree on e.g. U+001C..U+001F, and open_clip uses `regex`.
_WS = regex.compile(r"\s+")

TextInput = Union[str, Sequence[str]]


def default_bpe_path() -> Path:
    """Path of the packaged OpenAI CLIP merges file."""
    return Path(__file__).resolve().parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"


@lru_cache()
def bytes_to_unicode() -> dict[int, str]:
    """Reversible byte -> printable-unicode map used by CLIP/GPT-2 BPE."""
    # Printable bytes map to themselves; the rest are shifted above U+00FF so
    # that no BPE symbol is whitespace or a control character.
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _clean(text: str) -> str:
    """open_clip's 'lower' clean: ftfy, double html unescape, whitespace collapse, lowercase."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WS.sub(" ", text).strip().lower()


def _split_merge(line: str) -> tuple[str, str]:
    parts = line.split()
    if len(parts) != 2:
        raise ValueError(f"malformed BPE merge line: {line!r}")
    return parts[0], parts[1]


class CLIPTokenizer:
    """CLIP BPE tokenizer with open_clip-identical ids.

    Build it with :meth:`from_bpe_gz`, :meth:`from_hf_files`,
    :meth:`from_tokenizer_json` or :meth:`from_dir`.
    """

    pad_token_id = 0  # open_clip pads with zeros (not with eot like HF)

    def __init__(
        self,
        vocab: Mapping[str, int],
        merges: Iterable[tuple[str, str]],
        context_length: int = DEFAULT_CONTEXT_LENGTH,
    ):
        """`vocab` maps token -> id and must contain the sot/eot specials (HF or open_clip spelling)."""
        self.encoder: dict[str, int] = {str(k): int(v) for k, v in vocab.items()}
        self.merges: list[tuple[str, str]] = [(str(a), str(b)) for a, b in merges]
        self.sot_token_id = self._special_id(HF_SOT, OC_SOT)
        self.eot_token_id = self._special_id(HF_EOT, OC_EOT)
        self.context_length = self._check_context_length(context_length)
        self.vocab_size = len(self.encoder)

        for a, b in self.merges:
            # Fail at load time rather than with a KeyError mid-encode.
            if a + b not in self.encoder:
                raise ValueError(f"merge ({a!r}, {b!r}) produces {a + b!r}, which is not in the vocabulary")
        # Later duplicates overwrite earlier ranks, exactly as dict(zip(...)) in open_clip.
        self.bpe_ranks: dict[tuple[str, str], int] = dict(zip(self.merges, range(len(self.merges))))

        self.decoder: dict[int, str] = {i: t for t, i in self.encoder.items()}
        # Decode specials to open_clip's spelling so output matches open_clip.decode.
        self.decoder[self.sot_token_id] = OC_SOT
        self.decoder[self.eot_token_id] = OC_EOT
        self._special_text = {OC_SOT: self.sot_token_id, OC_EOT: self.eot_token_id}

        b2u = bytes_to_unicode()
        # str.translate over a latin-1 view of the utf-8 bytes is much faster
        # than a per-byte dict lookup in a generator.
        self._byte_to_sym = dict(b2u)  # keyed by byte value == ord of its latin-1 char
        self._sym_to_byte = {ord(u): chr(b) for b, u in b2u.items()}
        self._cache: dict[str, tuple[str, ...]] = {}

    # ------------------------------------------------------------------ loaders
    @classmethod
    def from_bpe_gz(cls, path: str | Path | None = None, context_length: int = DEFAULT_CONTEXT_LENGTH) -> "CLIPTokenizer":
        """Load an OpenAI-style ``bpe_simple_vocab_16e6.txt.gz`` (None = packaged copy)."""
        path = default_bpe_path() if path is None else Path(path)
        with gzip.open(path, "rb") as f:
            lines = f.read().decode("utf-8").split("\n")
        # Same slice as open_clip: skip the header, keep a fixed number of merges.
        merges = [_split_merge(m) for m in lines[1 : _NUM_GZ_MERGES + 1]]
        symbols = list(bytes_to_unicode().values())
        tokens = symbols + [s + _EOW for s in symbols] + ["".join(m) for m in merges] + [HF_SOT, HF_EOT]
        vocab = {t: i for i, t in enumerate(tokens)}
        return cls(vocab, merges, context_length)

    @classmethod
    def from_hf_files(
        cls, vocab_json: str | Path, merges_txt: str | Path, context_length: int = DEFAULT_CONTEXT_LENGTH
    ) -> "CLIPTokenizer":
        """Load Hugging Face ``vocab.json`` + ``merges.txt``."""
        with open(vocab_json, encoding="utf-8") as f:
            vocab = json.load(f)
        with open(merges_txt, encoding="utf-8") as f:
            lines = f.read().split("\n")
        # Only the first line can be the "#version" header: a real merge may start with '#'.
        if lines and lines[0].startswith("#version"):
            lines = lines[1:]
        merges = [_split_merge(m) for m in lines if m.strip()]
        return cls(vocab, merges, context_length)

    @classmethod
    def from_tokenizer_json(cls, path: str | Path, context_length: int = DEFAULT_CONTEXT_LENGTH) -> "CLIPTokenizer":
        """Load a Hugging Face fast-tokenizer ``tokenizer.json`` (BPE model)."""
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        model = data.get("model") or {}
        if model.get("type", "BPE") != "BPE" or "vocab" not in model or "merges" not in model:
            raise ValueError(f"{path}: expected a BPE model with 'vocab' and 'merges'")
        vocab = dict(model["vocab"])
        # Specials usually live in model.vocab, but may only be listed as added tokens.
        for tok in data.get("added_tokens") or []:
            vocab.setdefault(tok["content"], tok["id"])
        # tokenizers < 0.20 writes "a b" strings, newer versions write [a, b] pairs.
        merges = [_split_merge(m) if isinstance(m, str) else (m[0], m[1]) for m in model["merges"]]
        return cls(vocab, merges, context_length)

    @classmethod
    def from_dir(cls, directory: str | Path, context_length: int | None = None) -> "CLIPTokenizer":
        """Load from a checkpoint directory.

        Preference: ``vocab.json`` + ``merges.txt``, then ``tokenizer.json``, then
        the packaged OpenAI vocabulary (used when the directory has no tokenizer
        files, as in OpenCLIP checkpoints). ``context_length=None`` reads
        ``tokenizer_config.json``'s ``context_length`` (written by :meth:`save`)
        and otherwise uses 77.
        """
        d = Path(directory)
        if not d.is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {d}")
        if context_length is None:
            context_length = DEFAULT_CONTEXT_LENGTH
            cfg = d / "tokenizer_config.json"
            if cfg.is_file():
                with open(cfg, encoding="utf-8") as f:
                    context_length = int(json.load(f).get("context_length", DEFAULT_CONTEXT_LENGTH))
        if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            return cls.from_hf_files(d / "vocab.json", d / "merges.txt", context_length)
        if (d / "tokenizer.json").is_file():
            return cls.from_tokenizer_json(d / "tokenizer.json", context_length)
        return cls.from_bpe_gz(None, context_length)

    def save(self, directory: str | Path, overwrite: bool = False) -> list[Path]:
        """Write ``vocab.json``, ``merges.txt`` (HF layout) and ``tokenizer_config.json``."""
        d = Path(directory)
        files = {n: d / n for n in ("vocab.json", "merges.txt", "tokenizer_config.json")}
        if not overwrite:
            # Check all before writing any so a refusal leaves nothing half-written.
            for p in files.values():
                if p.exists():
                    raise FileExistsError(f"{p} already exists (pass overwrite=True to replace it)")
        d.mkdir(parents=True, exist_ok=True)

        # HF spells the specials <|startoftext|>/<|endoftext|>; transformers
        # looks them up by those names.
        vocab = dict(self.encoder)
        for oc, hf, i in ((OC_SOT, HF_SOT, self.sot_token_id), (OC_EOT, HF_EOT, self.eot_token_id)):
            if vocab.get(oc) == i:
                del vocab[oc]
            vocab[hf] = i
        with open(files["vocab.json"], "w", encoding="utf-8") as f:
            json.dump(dict(sorted(vocab.items(), key=lambda kv: kv[1])), f, ensure_ascii=False)
        with open(files["merges.txt"], "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n")
            f.write("".join(f"{a} {b}\n" for a, b in self.merges))
        config = {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": self.context_length,
            "context_length": self.context_length,
            "bos_token": HF_SOT,
            "eos_token": HF_EOT,
            "unk_token": HF_EOT,
            "pad_token": HF_EOT,
        }
        with open(files["tokenizer_config.json"], "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
        return list(files.values())

    # ----------------------------------------------------------------- encoding
    def _bpe(self, symbols: str) -> tuple[str, ...]:
        """Apply merges to one pre-token (already mapped to byte symbols)."""
        cached = self._cache.get(symbols)
        if cached is not None:
            return cached
        word = list(symbols[:-1])
        word.append(symbols[-1] + _EOW)
        ranks = self.bpe_ranks
        while len(word) > 1:
            # Lowest-rank adjacent pair wins; ranks are unique so there are no ties.
            best, best_rank = None, None
            for pair in zip(word, word[1:]):
                r = ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = pair, r
            if best is None:
                break
            first, second = best
            merged: list[str] = []
            i, n = 0, len(word)
            # Merge every non-overlapping occurrence, left to right.
            while i < n:
                if i < n - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        out = tuple(word)
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[symbols] = out
        return out

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without sot/eot."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        ids: list[int] = []
        enc = self.encoder
        for piece in _PAT.findall(_clean(text)):
            special = self._special_text.get(piece)
            if special is not None:
                ids.append(special)
                continue
            symbols = piece.encode("utf-8").decode("latin-1").translate(self._byte_to_sym)
            ids.extend(enc[t] for t in self._bpe(symbols))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Inverse of :meth:`encode` up to cleaning; word ends become spaces (as open_clip)."""
        syms = "".join(self.decoder[int(i)] for i in ids)
        raw = syms.translate(self._sym_to_byte).encode("latin-1")
        return raw.decode("utf-8", errors="replace").replace(_EOW, " ")

    def __call__(self, texts: TextInput, context_length: int | None = None) -> np.ndarray:
        """Tokenize to an int32 array [T, context_length]: sot + ids + eot, zero-padded.

        Over-long prompts are truncated with the last id forced to eot (open_clip
        semantics); one UserWarning reports how many were truncated.
        """
        texts = self._as_text_list(texts)
        L = self.context_length if context_length is None else self._check_context_length(context_length)
        out = np.zeros((len(texts), L), dtype=np.int32)
        truncated = 0
        for row, text in enumerate(texts):
            ids = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(ids) > L:
                ids = ids[:L]
                ids[-1] = self.eot_token_id
                truncated += 1
            out[row, : len(ids)] = ids
        if truncated:
            warnings.warn(
                f"{truncated} of {len(texts)} prompt(s) exceeded the context length of {L} tokens "
                f"and were truncated (last token set to end-of-text)",
                UserWarning,
                stacklevel=2,
            )
        return out

    # ------------------------------------------------------------------ helpers
    def _special_id(self, hf_name: str, oc_name: str) -> int:
        for name in (hf_name, oc_name):
            if name in self.encoder:
                return self.encoder[name]
        raise ValueError(f"vocabulary has no {hf_name!r} (or {oc_name!r}) token")

    @staticmethod
    def _check_context_length(n: int) -> int:
        if isinstance(n, bool):
            raise TypeError("context_length must be an int, got bool")
        n = operator.index(n)
        if n < 1:
            raise ValueError(f"context_length must be >= 1, got {n}")
        return n

    @staticmethod
    def _as_text_list(texts: TextInput) -> list[str]:
        if isinstance(texts, str):
            return [texts]
        if isinstance(texts, np.ndarray):
            if texts.ndim != 1:
                raise TypeError(f"texts must be a str or a sequence of str, got a {texts.ndim}-D array")
            texts = texts.tolist()
        if isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Sequence):
            raise TypeError(f"texts must be a str or a sequence of str, got {type(texts).__name__}")
        out = list(texts)
        for i, t in enumerate(out):
            if not isinstance(t, str):
                raise TypeError(f"texts must be a str or a sequence of str; texts[{i}] is {type(t).__name__}")
        return out

    def __repr__(self) -> str:
        return (
            f"CLIPTokenizer(vocab_size={self.vocab_size}, context_length={self.context_length}, "
            f"sot={self.sot_token_id}, eot={self.eot_token_id})"
        )
