"""Memory-mapped reader of the Arrow IPC files that `generate_dataset` writes.

Opening maps the file; only the `length` column and the list offsets are read (a few bytes
per conversation), so a 100M-token dataset raises resident memory by well under 100 MB.
Items are zero-copy numpy views of the map.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from ochat.data.schema import DatasetFormatError, check_format_version, check_schema


class TokenizedDataset:
    """One split's Arrow file; `meta` defaults to the meta.json beside it (not checked: see open_dataset)."""

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


def _read_meta(out_dir: Path) -> dict:
    p = Path(out_dir) / "meta.json"
    if p.is_file():
        with open(p) as f:
            return json.load(f)
    return {}


def open_dataset(out_dir, split: str = "train") -> TokenizedDataset:
    """Memory-map one split of a dataset folder; its meta.json must be of this ochat's format version
    (else DatasetFormatError, one line naming both versions)."""
    out_dir = Path(out_dir)
    path = out_dir / f"{split}.arrow"
    if not path.is_file():
        raise FileNotFoundError(f"no {split} split at {path}")
    if not (out_dir / "meta.json").is_file():
        raise DatasetFormatError(f"{out_dir}/meta.json not found: not a dataset folder; write one with "
                                 "`python -m ochat.data.generate_dataset`")
    meta = _read_meta(out_dir)
    check_format_version(meta, out_dir)
    return TokenizedDataset(path, meta=meta)
