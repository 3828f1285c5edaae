"""Tokenized data on disk, once per node: int32 token ids in flat arrays with offsets, memory-mapped, so that no
process holds Python lists of them, and a second launch reads them instead of tokenizing again.

Layout of one cache entry, a directory <cache root>/<key>/ (the key: a SHA-256 of everything the ids depend on,
assembled by data.py: the data's content or Hub fingerprint, the tokenizer and its chat template, data.* options,
the source of the code that renders and tokenizes):
    <store>.ids.i32          every pair's parts back to back: pair j's part f is ids[offsets[j·k+f] : offsets[j·k+f+1]]
    <store>.offsets.i64      (n·k + 1,)   k = 3 parts (prompt, chosen, rejected) or 2 (prompt, response)
    <store>.untruncated.i32  (n, k)       token counts before truncation (the data summary, data.preview)
    <store>.text.utf8, <store>.text_offsets.i64   the exact text tokenized (data.preview), never read otherwise
    <split>.index.i64        which pairs of its store a split (train, eval) holds, in order
    <split>.scores.f64       (m, 2) score_chosen, score_rejected, when the data has them
    meta.json                written last: sizes and SHA-256 of every file above, the splits' token hashes, the
                             data summary's counts
A store is one source as rendered (the dataset, or a separate held-out dataset); a split is a selection of it.

Never stale, never broken: an entry is built in a temporary directory next to it and renamed into place (atomic:
two launches building the same key at once both finish, the first rename wins, the other's copy is dropped); on
every load the node's main process checks each file's size and hash against meta.json, and a damaged or partial
entry is built again. A cache directory that cannot be written (read-only, full) stops the run with one line.
"""

import hashlib
import json
import os
import shutil
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from plumbing.errors import UserError
from plumbing.storage import describe

FORMAT = 1  # of the files above; part of the key
META = "meta.json"
ENV = "BETADPO_DATA_CACHE"  # where the cache lives, when data.cache_dir is ""
HASH_BLOCK = 4096  # pairs per block of the token hash


def cache_root(cache_dir: str) -> Path | None:
    """data.cache_dir, else $BETADPO_DATA_CACHE, else ~/.cache/betadpo/data; None for "off" (tokenized in memory)."""
    where = cache_dir or os.environ.get(ENV) or str(Path.home() / ".cache" / "betadpo" / "data")
    return None if where == "off" else Path(where).expanduser()


def tokenizer_fingerprint(tokenizer) -> str:
    """Its class, vocabulary (with added tokens), special tokens and chat template: what token ids depend on."""
    content = {"class": type(tokenizer).__name__, "vocab": sorted(tokenizer.get_vocab().items()),
               "special": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
               "chat_template": getattr(tokenizer, "chat_template", None)}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(path: Path, digest=None) -> str:
    digest = digest or hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------------
# Arrays: one store written chunk by chunk, and the rows of a split read as slices of it
# --------------------------------------------------------------------------------------------------------
STORE_FILES = {"ids": ("i32", np.int32), "offsets": ("i64", np.int64), "untruncated": ("i32", np.int32),
               "text": ("utf8", np.uint8), "text_offsets": ("i64", np.int64)}


class StoreWriter:
    """Appends tokenized chunks to a store's files in `directory` (or to lists in memory when it is None, for
    data.cache_dir off and the built-in task); `finish()` → the store, memory-mapped."""

    def __init__(self, directory: Path | None, name: str, k: int):
        self.directory, self.name, self.k, self.n = directory, name, k, 0
        self.ends = {"ids": 0, "text": 0}  # where the next chunk's offsets start
        self.parts = {f: [] for f in STORE_FILES}
        self.files = {f: open(directory / f"{name}.{f}.{ext}", "wb") for f, (ext, _) in STORE_FILES.items()} if directory else None
        for f in ("offsets", "text_offsets"):  # both offsets arrays start at 0
            self._put(f, np.zeros(1, np.int64))

    def _put(self, f: str, array: np.ndarray):
        if self.files:
            self.files[f].write(array.tobytes())
        else:
            self.parts[f].append(array)

    def append(self, ids: np.ndarray, lengths: np.ndarray, untruncated: np.ndarray, text: bytes, text_lengths: np.ndarray):
        """ids: (sum of lengths,) int32; lengths, untruncated, text_lengths: (b, k): one chunk of b pairs."""
        chunk = {"ids": ids.astype(np.int32), "untruncated": untruncated.astype(np.int32),
                 "offsets": self.ends["ids"] + np.cumsum(lengths.ravel(), dtype=np.int64),
                 "text": np.frombuffer(text, np.uint8), "text_offsets": self.ends["text"] + np.cumsum(text_lengths.ravel(), dtype=np.int64)}
        self.ends["ids"] += len(ids)
        self.ends["text"] += len(text)
        self.n += len(lengths)
        for f, array in chunk.items():
            self._put(f, array)

    def finish(self) -> "Store":
        if not self.files:
            return Store({f: np.concatenate(parts or [np.empty(0, STORE_FILES[f][1])]) for f, parts in self.parts.items()}, self.k)
        for handle in self.files.values():
            handle.close()
        return open_store(self.directory, self.name, self.k)


def _map(path: Path, dtype) -> np.ndarray:
    """A read-only memory map of a whole file (an empty file has no map: an empty array)."""
    return np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.empty(0, dtype)


def open_store(directory: Path, name: str, k: int) -> "Store":
    return Store({f: _map(directory / f"{name}.{f}.{ext}", dtype) for f, (ext, dtype) in STORE_FILES.items()}, k)


class Store:
    """The arrays of one store; `untruncated` reshaped to (n, k)."""

    def __init__(self, arrays: dict, k: int):
        self.k = k
        self.ids, self.offsets, self.text, self.text_offsets = (arrays[f] for f in ("ids", "offsets", "text", "text_offsets"))
        self.untruncated = arrays["untruncated"].reshape(-1, k)


class TokenizedRows(Sequence):
    """The token ids of one split: rows[i] → (prompt ids, chosen ids, rejected ids) (or (prompt, response)) as
    lists, read from the arrays at each call, as the old lists of lists were indexed; rows[a:b] is a view.

    token_hash() equals scoring.token_hash over the same rows as lists (inputs.json and the reference cache
    keep their keys), computed from the arrays block by block; a cached split brings it in meta.json."""

    def __init__(self, store: Store, index: np.ndarray, scores: np.ndarray | None = None, token_hash: str | None = None):
        self.store, self.index, self.scores, self._hash = store, np.asarray(index, np.int64), scores, token_hash

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return TokenizedRows(self.store, self.index[i], None if self.scores is None else self.scores[i])
        j, o = int(self.index[i]) * self.store.k, self.store.offsets
        return tuple(self.store.ids[o[j + f] : o[j + f + 1]].tolist() for f in range(self.store.k))

    def kept(self) -> np.ndarray:
        """(m, k) token counts after truncation."""
        return np.diff(self.store.offsets).reshape(-1, self.store.k)[self.index]

    def untruncated(self) -> np.ndarray:
        """(m, k) token counts before truncation."""
        return self.store.untruncated[self.index]

    def texts(self, i) -> list[str]:
        """The k texts of row i exactly as tokenized (data.preview)."""
        j, o = int(self.index[i]) * self.store.k, self.store.text_offsets
        return [bytes(self.store.text[o[j + f] : o[j + f + 1]]).decode("utf-8") for f in range(self.store.k)]

    def token_hash(self) -> str:
        """SHA-256 of each row's parts, part f followed by −(f+1), as int64 (scoring.token_hash's bytes)."""
        if self._hash is None:
            digest, k, o = hashlib.sha256(), self.store.k, self.store.offsets
            for start in range(0, len(self.index), HASH_BLOCK):
                rows = self.index[start : start + HASH_BLOCK]
                lengths = np.diff(o).reshape(-1, k)[rows]  # (b, k)
                ids = np.concatenate([self.store.ids[o[r * k] : o[r * k + k]] for r in rows.tolist()] or [np.empty(0, np.int32)])
                out = np.empty(len(ids) + lengths.size, np.int64)
                ends = np.cumsum(lengths.ravel() + 1) - 1  # where each part's separator goes
                keep = np.ones(len(out), bool)
                keep[ends] = False
                out[ends] = np.tile(-(np.arange(k) + 1), len(rows))
                out[keep] = ids
                digest.update(out.tobytes())
            self._hash = digest.hexdigest()
        return self._hash


# --------------------------------------------------------------------------------------------------------
# The cache entry: built once (atomically), checked on every load
# --------------------------------------------------------------------------------------------------------
def write_split(directory: Path, name: str, rows: TokenizedRows) -> dict:
    """A split's index (and scores) next to its store; → its meta.json entry."""
    np.asarray(rows.index, np.int64).tofile(directory / f"{name}.index.i64")
    if rows.scores is not None:
        np.asarray(rows.scores, np.float64).tofile(directory / f"{name}.scores.f64")
    return {"rows": len(rows), "scores": rows.scores is not None, "token_hash": rows.token_hash()}


def finish_entry(directory: Path, meta: dict):
    """meta.json, last: the size and SHA-256 of every file of the entry (what `check` compares)."""
    meta["files"] = {p.name: [p.stat().st_size, file_sha256(p)] for p in sorted(directory.iterdir()) if p.name != META}
    (directory / META).write_text(json.dumps(meta, indent=1))


def check(directory: Path) -> str | None:
    """Why the entry at `directory` cannot be used (missing, partial, damaged), or None if it is intact."""
    try:
        meta = json.loads((directory / META).read_text())
    except FileNotFoundError:
        return "no meta.json (a partial entry)"
    except (OSError, ValueError) as e:
        return f"meta.json unreadable ({e})"
    if meta.get("format") != FORMAT:
        return f"format {meta.get('format')}, not {FORMAT}"
    for name, (size, digest) in meta.get("files", {}).items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != size:
            return f"{name} {'is missing' if not path.is_file() else f'has {path.stat().st_size} bytes, not {size}'}"
        if file_sha256(path) != digest:
            return f"{name} does not match its hash"
    return None


def open_entry(directory: Path) -> tuple[dict, dict]:
    """→ (meta, {split: TokenizedRows}) of an intact entry, memory-mapped."""
    meta = json.loads((directory / META).read_text())
    stores = {name: open_store(directory, name, meta["k"]) for name in meta["stores"]}
    splits = {}
    for name, split in meta["splits"].items():
        index = _map(directory / f"{name}.index.i64", np.int64)
        scores = _map(directory / f"{name}.scores.f64", np.float64).reshape(-1, 2) if split["scores"] else None
        splits[name] = TokenizedRows(stores[split["store"]], index, scores, split["token_hash"])
    return meta, splits


def _remove(path: Path):
    """Out of the way first (a rename), then deleted: no process ever sees half a directory under the key."""
    trash = path.with_name(f".trash-{path.name}-{socket.gethostname()}-{os.getpid()}")
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def build_or_open(root: Path, key: str, build) -> tuple[dict, dict]:
    """The entry `key` under `root`: opened if intact; else built by build(tmp_dir) → meta (it writes the files,
    finish_entry is called here) and renamed into place. A storage fault → UserError, one line."""
    path = root / key
    why = check(path) if path.exists() else None
    if path.exists() and why is None:
        return open_entry(path)
    if why is not None:
        print(f"warning: the tokenized data cache {path} is damaged ({why}); tokenizing again", file=sys.stderr, flush=True)
        _remove(path)
    tmp = root / f".tmp-{key}-{socket.gethostname()}-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        meta = build(tmp)
        finish_entry(tmp, meta)
        try:
            os.rename(tmp, path)  # atomic; fails if another launch put its (identical) entry there first
        except OSError:
            if check(path) is not None:
                raise
    except OSError as e:
        line = describe(e, "the tokenized data cache", root)
        if line is None:
            raise
        raise UserError(f"{line}; point data.cache_dir (or ${ENV}) to a writable directory with room, or set "
                        "data.cache_dir: off to tokenize in memory") from None
    finally:  # a failed build (bad data, a storage fault, Ctrl-C) or a lost race leaves nothing behind
        shutil.rmtree(tmp, ignore_errors=True)
    return open_entry(path)
