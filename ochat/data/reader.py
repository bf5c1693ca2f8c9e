"""Memory-mapped reader of the Arrow IPC files that `generate_dataset` writes.

Opening maps the file and checks every row (schema.check_rows: lengths, token ids against meta.json's
vocab_size, weights) through a second map that is released at once, so the pages the check reads do not
stay resident: a 100M-token dataset raises resident memory by well under 100 MB. Items are zero-copy
numpy views of the map.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from ochat.data.schema import (DatasetFormatError, check_format_version, check_meta, check_rows, check_schema,
                                load_meta)


class TokenizedDataset:
    """One split's Arrow file; `meta` defaults to the meta.json beside it (its format version and model type
    are not checked: see open_dataset). The rows are checked (DatasetFormatError naming the first bad one)."""

    def __init__(self, path, meta: dict | None = None):
        self.path = str(path)
        self._mmap = pa.memory_map(self.path, "r")
        reader = pa.ipc.open_file(self._mmap)
        check_schema(reader.schema, self.path)
        self._batches = []  # (tok_offsets, tok_values, w_offsets, w_values) per record batch
        lengths, starts = [], [0]
        for b in range(reader.num_record_batches):
            rb = reader.get_batch(b)
            tok, w = rb.column("tokens"), rb.column("weights")
            self._batches.append((
                tok.offsets.to_numpy(zero_copy_only=True), tok.values.to_numpy(zero_copy_only=True),
                w.offsets.to_numpy(zero_copy_only=True), w.values.to_numpy(zero_copy_only=True)))
            lengths.append(rb.column("length").to_numpy(zero_copy_only=True))
            starts.append(starts[-1] + rb.num_rows)
        self.lengths = np.concatenate(lengths).astype(np.int64) if lengths else np.zeros(0, np.int64)
        self._starts = np.asarray(starts, dtype=np.int64)
        self.meta = meta if meta is not None else _read_meta(Path(self.path).parent)
        _check_rows(self.path, self.meta.get("vocab_size"))

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i):
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for {n} conversations")
        b = int(np.searchsorted(self._starts, i, side="right")) - 1
        j = i - int(self._starts[b])
        to, tv, wo, wv = self._batches[b]
        return tv[to[j]:to[j + 1]], wv[wo[j]:wo[j + 1]]

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


def _check_rows(path: str, vocab_size: int | None) -> None:
    """check_rows through a map of its own, released on return, so that the pages it reads leave this
    process's resident memory (the dataset's map is only read where items are)."""
    with pa.memory_map(path, "r") as source:
        reader = pa.ipc.open_file(source)
        check_rows((reader.get_batch(b) for b in range(reader.num_record_batches)), path, vocab_size)


def _read_meta(out_dir: Path) -> dict:
    p = Path(out_dir) / "meta.json"
    return load_meta(p) if p.is_file() else {}


def open_dataset(out_dir, split: str = "train") -> TokenizedDataset:
    """Memory-map one split of a dataset folder. Its meta.json must be a JSON object of this ochat's format
    version naming a known model type, and every row must be sound (schema.check_rows); else
    DatasetFormatError, one line naming the file."""
    out_dir = Path(out_dir)
    path = out_dir / f"{split}.arrow"
    if not path.is_file():
        raise FileNotFoundError(f"no {split} split at {path}")
    if not (out_dir / "meta.json").is_file():
        raise DatasetFormatError(f"{out_dir}/meta.json not found: not a dataset folder; write one with "
                                 "`python -m ochat.data.generate_dataset`")
    meta = load_meta(out_dir / "meta.json")
    check_format_version(meta, out_dir)
    check_meta(meta, out_dir / "meta.json")
    return TokenizedDataset(path, meta=meta)
