"""Input files: what formats are read, and streaming their records one at a time.

A source yields (position, record) pairs without holding the file in memory: position is the line number
(1-based) in JSONL and the index (0-based) elsewhere. Formats, detected by name and content:

- JSONL: one JSON value per line, lines split on "\\n" only (a raw U+2028 or U+0085 inside a string is
  valid JSON, not a line break); blank lines ignored. A malformed line (not UTF-8, not JSON, or nested too
  deeply to parse) comes as a `BadLine`, which the CLI turns into an error or (with --skip-bad-lines) a
  counted skip.
- a JSON array of records (or one JSON value: a pretty-printed single record), streamed element by element;
  an error in it stops the run (no way to find the next element reliably).
- either of those compressed: `.gz`, `.bz2`, `.xz`, `.zst` (the `zstandard` package; every frame is read).
- Parquet (`.parquet`), Arrow IPC (`.arrow`, file or stream format).
- a folder that Hugging Face `datasets` wrote with `save_to_disk` (its Arrow files, read with pyarrow;
  `datasets` itself is not needed). A DatasetDict folder is refused: name one split's folder.

Problems with a file raise `InputError` (one line: file, and line or byte offset).
"""
from __future__ import annotations

import bz2
import codecs
import gzip
import io
import json
import lzma
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

# skip reasons of malformed JSONL lines (counted like record skip reasons)
INVALID_JSON = "invalid_json"
NOT_UTF8 = "not_utf8"
TOO_DEEP = "too_deep"  # nested deeper than Python's json parser recurses

_BOM = b"\xef\xbb\xbf"
_JSON_WS = " \t\n\r"
_WS_RUN = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()
_READ_BLOCK = 1 << 20


class InputError(Exception):
    """A problem with the input that stops the run (printed as one line, no traceback)."""


@dataclass(frozen=True)
class BadLine:
    """A JSONL line that is not valid UTF-8 or not valid JSON."""

    reason: str  # INVALID_JSON, NOT_UTF8 or TOO_DEEP
    message: str  # the one-line error: file, line, what is wrong


@dataclass(frozen=True)
class InputSpec:
    """One --in-files entry: a path and the condition of its records (None: decided per record)."""

    path: Path
    condition: str | None = None

    def __str__(self) -> str:
        return str(self.path) + (f":{self.condition}" if self.condition else "")


def parse_input_spec(arg: str) -> InputSpec:
    """`PATH` or `PATH:CONDITION`. A PATH that exists as written wins, so file names holding ':' work."""
    path, sep, condition = arg.rpartition(":")
    if not sep or Path(arg).exists() or not path or not condition or "/" in condition:
        return InputSpec(Path(arg))
    return InputSpec(Path(path), condition)


def one_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# ----------------------------------------------------------------------------- byte streams

def _decompression_errors() -> tuple:
    errors = [OSError, EOFError, zlib.error, lzma.LZMAError]
    try:
        import zstandard
    except ImportError:
        return tuple(errors)
    return (*errors, zstandard.ZstdError)


def _open_bytes(path: Path):
    """A binary stream of the file's (decompressed) content."""
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, "rb")
    if suffix == ".bz2":
        return bz2.open(path, "rb")
    if suffix == ".xz":
        return lzma.open(path, "rb")
    if suffix in (".zst", ".zstd"):
        try:
            import zstandard
        except ImportError:
            raise InputError(f"{path}: reading .zst files needs the zstandard package: pip install zstandard") from None
        reader = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), read_across_frames=True)
        return io.BufferedReader(reader)
    return open(path, "rb")


def _first_char(path: Path) -> str:
    """The first character of the (decompressed) text that is not JSON whitespace; "" if none."""
    with _open_bytes(path) as stream:
        head = stream.read(4096)
        if head.startswith(_BOM):
            head = head[3:]
        while head:
            stripped = head.lstrip(_JSON_WS.encode())
            if stripped:
                return chr(stripped[0])
            head = stream.read(_READ_BLOCK)
    return ""


# ----------------------------------------------------------------------------- JSON text, streamed

class _JsonText:
    """Decoded text of a binary stream, read block by block as values are parsed; error positions are
    those of the whole file (byte offset, line, column)."""

    def __init__(self, stream, path: Path):
        self.stream, self.path = stream, path
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.buf, self.pos, self.eof = "", 0, False
        self.raw_bytes = self.raw_lines = 0  # read from the stream so far
        self.dropped_column = 0  # characters after the last newline in the text dropped from the buffer
        self.started = False

    def _fill(self, size: int) -> bool:
        """Append at least one more block of text (dropping what was parsed); False at the end of the file."""
        if self.eof:
            return False
        dropped = self.buf[:self.pos]
        newline = dropped.rfind("\n")
        self.dropped_column = len(dropped) - newline - 1 if newline >= 0 else self.dropped_column + len(dropped)
        self.buf, self.pos = self.buf[self.pos:], 0
        while True:
            data = self.stream.read(size)
            pending = len(self.decoder.getstate()[0])
            try:
                text = self.decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                offset = self.raw_bytes - pending + e.start
                line = self.raw_lines + data[:max(0, e.start - pending)].count(b"\n") + 1
                raise InputError(f"{self.path}: not UTF-8 at byte offset {offset} (line {line})") from None
            self.raw_bytes += len(data)
            self.raw_lines += data.count(b"\n")
            if not self.started and text:
                self.started = True
                text = text.removeprefix("\ufeff")
            self.buf += text
            if not data:
                self.eof = True
                return bool(text)
            if text:
                return True

    def error(self, msg: str, pos: int) -> InputError:
        rest = self.buf[pos:]
        offset = self.raw_bytes - len(self.decoder.getstate()[0]) - len(rest.encode("utf-8"))
        line = self.raw_lines - rest.count("\n") + 1
        newline = self.buf.rfind("\n", 0, pos)
        column = pos - newline if newline >= 0 else self.dropped_column + pos + 1
        return InputError(f"{self.path}: invalid JSON at byte offset {offset} (line {line}, column {column}): {msg}")

    def peek(self) -> str:
        """Skip whitespace; the next character, or "" at the end of the file."""
        while True:
            self.pos = _WS_RUN.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._fill(_READ_BLOCK):
                return ""

    def value(self) -> Any:
        """Parse the next JSON value, reading more of the file while it may be incomplete."""
        self.peek()
        while True:
            grow = max(_READ_BLOCK, len(self.buf) - self.pos)  # doubling: a large value is parsed O(1) times
            try:
                obj, end = _DECODER.raw_decode(self.buf, self.pos)
            except RecursionError:
                raise self.error("nested too deeply to parse", self.pos) from None
            except json.JSONDecodeError as e:
                # an error at the end of the text read so far (or a string running past it) may only mean
                # that the value continues in the next block
                maybe_incomplete = e.pos >= len(self.buf) - 16 or e.msg.startswith("Unterminated string")
                if maybe_incomplete and not self.eof:
                    self._fill(grow)  # moves the buffer: parse again for positions in the new one
                    continue
                raise self.error(e.msg, e.pos) from None
            if end == len(self.buf) and not self.eof:
                self._fill(grow)  # a number may go on in the next block
                continue
            self.pos = end
            return obj


def _json_values(stream, path: Path) -> Iterator[tuple[int, Any]]:
    """The elements of a top-level JSON array, or the one top-level value; (index, value)."""
    text = _JsonText(stream, path)
    if text.peek() == "[":
        text.pos += 1
        if text.peek() == "]":
            text.pos += 1
        else:
            index = 0
            while True:
                yield index, text.value()
                index += 1
                after = text.peek()
                text.pos += 1
                if after == "]":
                    break
                if after != ",":
                    raise text.error("Expecting ',' delimiter", text.pos - 1)
    else:
        yield 0, text.value()
    if text.peek():
        raise text.error("Extra data", text.pos)


def _jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, value or BadLine) per non-blank line."""
    with _open_bytes(path) as stream:
        offset = 0
        for lineno, raw in enumerate(stream, 1):
            start, offset = offset, offset + len(raw)
            if lineno == 1 and raw.startswith(_BOM):
                raw, start = raw[3:], start + 3
            try:
                line = raw.decode("utf-8").rstrip("\r\n")  # error columns within the line
            except UnicodeDecodeError as e:
                yield lineno, BadLine(NOT_UTF8, f"{path}: not UTF-8 at byte offset {start + e.start} (line {lineno})")
                continue
            if not line.strip(_JSON_WS):
                continue
            try:
                value = json.loads(line)
            except RecursionError:
                yield lineno, BadLine(TOO_DEEP, f"{path}: JSON nested too deeply to parse on line {lineno}")
                continue
            except json.JSONDecodeError as e:
                if lineno == 1 and line.lstrip(_JSON_WS).startswith("{"):
                    whole = _single_pretty_printed_value(path)
                    if whole is not None:
                        yield 1, whole[0]
                        return
                yield lineno, BadLine(INVALID_JSON, f"{path}: invalid JSON on line {lineno} (column {e.colno}): {e.msg}")
                continue
            yield lineno, value


def _single_pretty_printed_value(path: Path) -> tuple[Any] | None:
    """(value,) when the whole file is one JSON value spread over lines, else None."""
    try:
        with _open_bytes(path) as stream:
            (_, value), = _json_values(stream, path)  # the file does not start with "[": one value at most
    except InputError:
        return None
    return (value,)


# ----------------------------------------------------------------------------- Arrow and Parquet

def _rows(batches: Iterator) -> Iterator[tuple[int, Any]]:
    index = 0
    for batch in batches:
        for row in batch.to_pylist():
            yield index, row
            index += 1


def _arrow_batches(path: Path) -> Iterator:
    import pyarrow as pa

    source = pa.memory_map(str(path))
    try:
        yield from pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
        reader = pa.ipc.open_file(source)
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)


def _parquet_batches(path: Path) -> Iterator:
    import pyarrow.parquet as pq

    yield from pq.ParquetFile(path).iter_batches(batch_size=1024)


def _hf_datasets_files(folder: Path) -> list[Path]:
    """The Arrow files of a folder written by `datasets.Dataset.save_to_disk`, in order."""
    if (folder / "dataset_dict.json").is_file():
        try:
            splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
        except (OSError, ValueError, KeyError, TypeError):
            splits = sorted(p.name for p in folder.iterdir() if p.is_dir())
        raise InputError(f"{folder} is a Hugging Face DatasetDict (splits: {', '.join(splits)}); name one split's "
                         f"folder, e.g. {folder / splits[0]}" if splits else f"{folder} is an empty DatasetDict")
    state = folder / "state.json"
    if not state.is_file():
        raise InputError(f"{folder} is a folder but not a Hugging Face datasets folder (no state.json; "
                         "write it with Dataset.save_to_disk, or name the files)")
    try:
        return [folder / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{state}: cannot read the list of data files: {one_line(e)}") from None


# ----------------------------------------------------------------------------- sources

@dataclass(frozen=True)
class Source:
    """One input file or folder: its format, the unit of its positions, and its records."""

    path: Path
    format: str  # "jsonl" | "json" | "parquet" | "arrow" | "hf_datasets"
    read: Callable[[], Iterator[tuple[int, Any]]]

    @property
    def unit(self) -> str:
        """What a position counts: "line" (1-based) for JSONL, "index" (0-based) otherwise."""
        return "line" if self.format == "jsonl" else "index"

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        """(position, record) pairs; JSONL yields a BadLine in place of a malformed line."""
        import pyarrow as pa

        try:
            yield from self.read()
        except (*_decompression_errors(), pa.ArrowException) as e:
            raise InputError(f"{self.path}: cannot read ({self.format}): {one_line(e)}") from None


def _json_text(path: Path) -> Iterator[tuple[int, Any]]:
    with _open_bytes(path) as stream:
        yield from _json_values(stream, path)


def open_source(path) -> Source:
    """Detect the format of an input file or folder (see the module docstring); InputError when it
    cannot be read."""
    path = Path(path)
    if path.is_dir():
        files = _hf_datasets_files(path)
        return Source(path, "hf_datasets", lambda: _rows(b for f in files for b in _arrow_batches(f)))
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            path.stat()
            return Source(path, "parquet", lambda: _rows(_parquet_batches(path)))
        if suffix in (".arrow", ".feather"):
            path.stat()
            return Source(path, "arrow", lambda: _rows(_arrow_batches(path)))
        first = _first_char(path)
    except InputError:
        raise
    except _decompression_errors() as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else one_line(e)
        raise InputError(f"{path}: cannot read: {reason}") from None
    if first == "[":
        return Source(path, "json", lambda: _json_text(path))
    return Source(path, "jsonl", lambda: _jsonl(path))
