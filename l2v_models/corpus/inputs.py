"""Corpus inputs: finding the files, checking every row before any model work, reading chunks.

    files = scan_inputs(["data/*.jsonl", "s3://bucket/part-*.parquet"], Fields())  # checks all
    for chunk in files[0].chunks: ...
    table = read_chunk(files[0], chunk, file_index=0)        # id, text[, instruction], _file, _row

Formats, by extension: JSONL (`.jsonl`, `.ndjson`: one JSON object per line; blank lines are
skipped and are not rows) and Parquet (`.parquet`, `.pq`). A path may be local or any URI
pyarrow's filesystems read (`s3://`, `gs://`, `hdfs://`, `file://`); `*`, `?` and `[...]` in the
last component are globs.

Contract of `scan_inputs` (the driver runs it before any Ray or model work): every row of every
file has an id (a string or an integer, the same kind in every file), a string text and, when an
instruction field is named, a string or null instruction; ids are unique across all inputs; no
file is empty; no two inputs share a stem (they would write the same output). The first
violation raises `CorpusInputError` naming the file, the row (JSONL: the line) and what to do.
Each `InputFile` carries its row count, the SHA-256 of its ids in order (what outputs are
verified against), the SHA-256 of its content (ids, texts and instructions of every row, in
order: what ties an output to the input it was made from, `ContentDigest`) and its chunks:
contiguous row ranges of about `rows_per_chunk` rows (Parquet: whole row groups) that
`read_chunk` reads on a worker with the same parser. Every row is read once by the scan.

Longer than ~500 lines on purpose: every input check (formats, fields, ids, empty files, globs)
runs before any model work and names file and row, and the workers read chunks with the same
parser, so the two live together.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import posixpath
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
_READ_BLOCK = 8 << 20  # JSONL is scanned in blocks of this many bytes
# The JSONL scan hashes rows in batches of at most this many rows / bytes of JSON (bounds memory).
_DIGEST_ROWS = 8192
_DIGEST_BYTES = 8 << 20


class CorpusInputError(ValueError):
    """An input problem the user can fix (message says where and what to do)."""


@dataclass(frozen=True)
class Fields:
    """Which fields of an input row hold the id, the text and (optionally) the instruction."""

    id: str = "id"
    text: str = "text"
    instruction: str | None = None


@dataclass(frozen=True)
class Chunk:
    """Rows start_row ... start_row + num_rows - 1 of a file. JSONL: the bytes
    [offset, offset + length); Parquet: row groups first_group ... last_group."""

    start_row: int
    num_rows: int
    offset: int = 0
    length: int = 0
    first_group: int = 0
    last_group: int = 0


@dataclass
class InputFile:
    """One checked input file (see the module docstring)."""

    uri: str  # as the user wrote it (after glob expansion)
    path: str  # the path inside `filesystem`
    filesystem: pafs.FileSystem
    format: str  # "jsonl" or "parquet"
    stem: str  # the name without its extension: the output is <stem>.parquet
    num_rows: int = 0
    id_kind: str = ""  # "string" or "int"
    ids_sha256: str = ""
    content_sha256: str = ""
    chunks: list[Chunk] = field(default_factory=list)

    @property
    def id_type(self) -> pa.DataType:
        return pa.string() if self.id_kind == "string" else pa.int64()


# ------------------------------------------------------------------------------ paths
def _split_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" in uri:
        try:
            return pafs.FileSystem.from_uri(uri)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
            raise CorpusInputError(f"cannot open {uri}: {e}") from None
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def _join(uri_dir: str, name: str) -> str:
    return uri_dir.rstrip("/") + "/" + name


def _format_of(name: str) -> tuple[str, str] | None:
    """(format, stem) of a file name by its extension, None when it is neither format."""
    lower = name.lower()
    for suffixes, fmt in ((JSONL_SUFFIXES, "jsonl"), (PARQUET_SUFFIXES, "parquet")):
        for suffix in suffixes:
            if lower.endswith(suffix) and len(name) > len(suffix):
                return fmt, name[: -len(suffix)]
    return None


def expand_inputs(patterns: Sequence[str]) -> list[tuple[str, pafs.FileSystem, str]]:
    """Input arguments -> (uri, filesystem, path) per file, in argument order (each glob's
    matches sorted by name); CorpusInputError for a missing file, a glob matching nothing, a
    directory or an unknown extension."""
    if not patterns:
        raise CorpusInputError("no input files: pass JSONL or Parquet files (or globs)")
    out: list[tuple[str, pafs.FileSystem, str]] = []
    seen: set[str] = set()
    for pattern in patterns:
        fs, path = _split_uri(pattern)
        head, tail = posixpath.split(path) if "://" in pattern else os.path.split(path)
        if any(c in tail for c in "*?["):
            if any(c in head for c in "*?["):
                raise CorpusInputError(
                    f"{pattern}: globs are supported in the file name only, not in directories"
                )
            try:
                infos = fs.get_file_info(pafs.FileSelector(head, allow_not_found=True))
            except OSError as e:
                raise CorpusInputError(f"{pattern}: cannot list {head}: {e}") from None
            names = sorted(
                i.base_name
                for i in infos
                if i.type == pafs.FileType.File and fnmatch.fnmatchcase(i.base_name, tail)
            )
            if not names:
                raise CorpusInputError(f"{pattern}: no file matches this pattern")
            uri_head = pattern[: len(pattern) - len(posixpath.basename(pattern))].rstrip("/")
            matches = [(_join(uri_head, n) if uri_head else n, fs, _join(head, n)) for n in names]
        else:
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.NotFound:
                raise CorpusInputError(f"input file not found: {pattern}")
            if info.type == pafs.FileType.Directory:
                raise CorpusInputError(
                    f"input {pattern} is a directory: pass its files, e.g. '{pattern}/*.jsonl'"
                )
            matches = [(pattern, fs, path)]
        for uri, mfs, mpath in matches:
            if _format_of(posixpath.basename(mpath)) is None:
                raise CorpusInputError(
                    f"{uri}: unknown input format; use .jsonl/.ndjson (JSON lines) or "
                    ".parquet/.pq files"
                )
            key = f"{mfs.type_name}:{mpath}"
            if key not in seen:  # the same file named twice (e.g. by two globs) is one input
                seen.add(key)
                out.append((uri, mfs, mpath))
    return out


# ------------------------------------------------------------------------------ ids
def _kind_of_type(t: pa.DataType) -> str | None:
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    if pa.types.is_integer(t):
        return "int"
    return None


def _ids_array(values: list, kind: str) -> pa.Array:
    return pa.array(values, type=pa.string() if kind == "string" else pa.int64())


class IdsDigest:
    """SHA-256 of ids in order, independent of how they are chunked: strings hash their UTF-8
    byte lengths (int64) and their bytes as two streams; integers hash as int64 little-endian."""

    def __init__(self):
        self._lengths = hashlib.sha256()
        self._data = hashlib.sha256()

    def update(self, ids: pa.Array | pa.ChunkedArray) -> None:
        if isinstance(ids, pa.ChunkedArray):
            for chunk in ids.chunks:
                self.update(chunk)
            return
        if pa.types.is_integer(ids.type):
            self._data.update(
                ids.cast(pa.int64()).to_numpy(zero_copy_only=False).astype("<i8").tobytes()
            )
            return
        ids = ids.cast(pa.large_string())
        n = len(ids)
        if n == 0:
            return
        offsets = np.frombuffer(ids.buffers()[1], dtype="<i8")[ids.offset : ids.offset + n + 1]
        self._lengths.update(np.diff(offsets).astype("<i8").tobytes())
        data = ids.buffers()[2]
        if data is not None:
            self._data.update(memoryview(data)[int(offsets[0]) : int(offsets[-1])])

    def hexdigest(self) -> str:
        return hashlib.sha256(self._lengths.digest() + self._data.digest()).hexdigest()


def ids_sha256(ids: pa.Array | pa.ChunkedArray) -> str:
    d = IdsDigest()
    d.update(ids)
    return d.hexdigest()


class _StringsDigest:
    """SHA-256 streams of a string column in order, independent of chunking: per row a null
    flag (uint8), the UTF-8 byte length (int64; 0 for null) and the bytes."""

    def __init__(self):
        self._nulls = hashlib.sha256()
        self._lengths = hashlib.sha256()
        self._data = hashlib.sha256()

    def update(self, values: pa.Array | pa.ChunkedArray) -> None:
        if isinstance(values, pa.ChunkedArray):
            for chunk in values.chunks:
                self.update(chunk)
            return
        n = len(values)
        if n == 0:
            return
        nulls = values.is_null().to_numpy(zero_copy_only=False).astype(np.uint8)
        self._nulls.update(nulls.tobytes())
        # Arrow lets a null slot span bytes: hash nulls as empty strings (their flag is above).
        values = pc.fill_null(values.cast(pa.large_string()), "")
        offsets = np.frombuffer(values.buffers()[1], dtype="<i8")[
            values.offset : values.offset + n + 1
        ]
        self._lengths.update(np.diff(offsets).astype("<i8").tobytes())
        data = values.buffers()[2]
        if data is not None:
            self._data.update(memoryview(data)[int(offsets[0]) : int(offsets[-1])])

    def digest(self) -> bytes:
        return self._nulls.digest() + self._lengths.digest() + self._data.digest()


class ContentDigest:
    """SHA-256 of a file's rows in order: ids (as `IdsDigest`), texts and instructions (null or
    absent = none); independent of how the rows are batched and of the file's format (the same
    rows in JSONL and in Parquet hash alike). Any change of a row's id, text or instruction, or
    of the rows' order or number, changes it. `update(ids, texts, instructions)`: arrays of one
    batch of rows (instructions None: no instruction in any of them)."""

    VERSION = b"l2v-content-v1"  # a new hashing scheme gets a new version

    def __init__(self):
        self._ids = IdsDigest()
        self._texts = _StringsDigest()
        self._instructions = _StringsDigest()

    def update(
        self,
        ids: pa.Array | pa.ChunkedArray,
        texts: pa.Array | pa.ChunkedArray,
        instructions: pa.Array | pa.ChunkedArray | None = None,
    ) -> None:
        if instructions is None:
            instructions = pa.nulls(len(texts), pa.string())
        if not len(ids) == len(texts) == len(instructions):
            raise ValueError(
                f"ids, texts and instructions of a batch differ in length: {len(ids)}, "
                f"{len(texts)}, {len(instructions)}"
            )
        self._ids.update(ids)
        self._texts.update(texts)
        self._instructions.update(instructions)

    def hexdigest(self) -> str:
        parts = (self._ids.hexdigest().encode(), self._texts.digest(), self._instructions.digest())
        return hashlib.sha256(self.VERSION + b"".join(parts)).hexdigest()


# ------------------------------------------------------------------------------ JSONL
def _iter_lines(f, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line without its newline) of every line starting in [start, stop)."""
    f.seek(start)
    pos, rest = start, b""
    while True:
        want = _READ_BLOCK if stop is None else min(_READ_BLOCK, stop - pos - len(rest))
        block = f.read(want) if want > 0 else b""
        if not block:
            if rest:
                yield pos, rest
            return
        buf = rest + block
        lines = buf.split(b"\n")
        rest = lines.pop()
        for line in lines:
            yield pos, line
            pos += len(line) + 1


def _parse_jsonl_row(line: bytes, where: str, fields: Fields) -> tuple[object, str, str | None]:
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorpusInputError(f"{where}: invalid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CorpusInputError(
            f"{where}: expected a JSON object, got {type(obj).__name__}: {line[:60]!r}"
        )
    if fields.id not in obj or obj[fields.id] is None:
        raise CorpusInputError(
            f"{where}: no {fields.id!r} field (every row needs an id; pass --id-field NAME to "
            f"use another field; fields here: {', '.join(sorted(obj)) or 'none'})"
        )
    rid = obj[fields.id]
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise CorpusInputError(
            f"{where}: id {fields.id!r} must be a string or an integer, got "
            f"{type(rid).__name__}: {rid!r:.60}"
        )
    if fields.text not in obj or obj[fields.text] is None:
        raise CorpusInputError(
            f"{where}: no {fields.text!r} field (pass --text-field NAME to use another field; "
            f"fields here: {', '.join(sorted(obj))})"
        )
    text = obj[fields.text]
    if not isinstance(text, str):
        raise CorpusInputError(
            f"{where}: text {fields.text!r} must be a string, got {type(text).__name__}: "
            f"{text!r:.60}"
        )
    instruction = None
    if fields.instruction is not None:
        instruction = obj.get(fields.instruction)
        if instruction is not None and not isinstance(instruction, str):
            raise CorpusInputError(
                f"{where}: instruction {fields.instruction!r} must be a string or null, got "
                f"{type(instruction).__name__}"
            )
    return rid, text, instruction


class _JsonlDigestBatch:
    """The rows of a JSONL file not hashed yet (texts, instructions and line numbers), so that
    `ContentDigest` hashes Arrow arrays of a bounded batch, never the whole file at once."""

    def __init__(self, inp: InputFile, digest: ContentDigest):
        self.inp, self.digest = inp, digest
        self.start = 0  # index of the batch's first row in the file
        self.texts: list[str] = []
        self.instructions: list[str | None] = []
        self.linenos: list[int] = []
        self.nbytes = 0

    def add(self, text: str, instruction: str | None, lineno: int, nbytes: int) -> None:
        self.texts.append(text)
        self.instructions.append(instruction)
        self.linenos.append(lineno)
        self.nbytes += nbytes

    def full(self) -> bool:
        return len(self.texts) >= _DIGEST_ROWS or self.nbytes >= _DIGEST_BYTES

    def flush(self, ids: list, kind: str | None) -> None:
        """Hash the batch; `ids`: every id of the file so far (the batch's are the last)."""
        if not self.texts:
            return
        batch_ids = ids[self.start :]
        try:
            self.digest.update(
                _ids_array(batch_ids, kind),
                pa.array(self.texts, pa.string()),
                pa.array(self.instructions, pa.string()),
            )
        except OverflowError:
            raise CorpusInputError(f"{self.inp.uri}: integer ids must fit in 64 bits") from None
        except (UnicodeEncodeError, pa.ArrowException):
            self._raise_bad_unicode(batch_ids)
            raise
        self.start = len(ids)
        self.texts, self.instructions, self.linenos, self.nbytes = [], [], [], 0

    def _raise_bad_unicode(self, batch_ids: list) -> None:
        """CorpusInputError naming the first row with a string that has no UTF-8 form (a lone
        surrogate such as "\\ud800" in the JSON)."""
        rows = zip(self.linenos, batch_ids, self.texts, self.instructions, strict=True)
        for lineno, rid, text, instruction in rows:
            for what, value in (("id", rid), ("text", text), ("instruction", instruction)):
                if isinstance(value, str):
                    try:
                        value.encode("utf-8")
                    except UnicodeEncodeError:
                        raise CorpusInputError(
                            f"{self.inp.uri}:{lineno}: the {what} is not valid Unicode (it holds "
                            "a lone surrogate escape such as \\ud800): fix or remove that row"
                        ) from None


def _scan_jsonl(inp: InputFile, fields: Fields, rows_per_chunk: int) -> pa.Array:
    ids: list = []
    kind = None
    chunk_start_row, chunk_start_byte, end = 0, None, 0
    content = ContentDigest()
    pending = _JsonlDigestBatch(inp, content)
    with inp.filesystem.open_input_file(inp.path) as f:
        for lineno, (offset, line) in enumerate(_iter_lines(f), 1):
            end = offset + len(line) + 1
            if not line.strip():
                continue
            rid, text, instruction = _parse_jsonl_row(line, f"{inp.uri}:{lineno}", fields)
            k = "string" if isinstance(rid, str) else "int"
            if kind is None:
                kind = k
            elif k != kind:
                plural = {"string": "strings", "int": "integers"}
                raise CorpusInputError(
                    f"{inp.uri}:{lineno}: id {rid!r} is not like the earlier ids of this file "
                    f"({plural[kind]}): use one kind of id (all strings or all integers)"
                )
            if chunk_start_byte is None:
                chunk_start_byte = offset
            ids.append(rid)
            pending.add(text, instruction, lineno, len(line))
            if pending.full():
                pending.flush(ids, kind)
            if len(ids) - chunk_start_row == rows_per_chunk:
                inp.chunks.append(
                    Chunk(chunk_start_row, rows_per_chunk, chunk_start_byte, end - chunk_start_byte)
                )
                chunk_start_row, chunk_start_byte = len(ids), None
    if chunk_start_byte is not None:
        inp.chunks.append(
            Chunk(
                chunk_start_row,
                len(ids) - chunk_start_row,
                chunk_start_byte,
                end - chunk_start_byte,
            )
        )
    pending.flush(ids, kind)
    inp.id_kind = kind or ""
    inp.content_sha256 = content.hexdigest()
    if not ids:
        return pa.array([], pa.string())
    try:
        return _ids_array(ids, kind)
    except OverflowError:
        raise CorpusInputError(f"{inp.uri}: integer ids must fit in 64 bits") from None


def _read_jsonl_chunk(inp: InputFile, chunk: Chunk, fields: Fields) -> dict[str, list]:
    ids, texts, instructions = [], [], []
    with inp.filesystem.open_input_file(inp.path) as f:
        for _, line in _iter_lines(f, chunk.offset, chunk.offset + chunk.length):
            if not line.strip():
                continue
            where = f"{inp.uri} (row {chunk.start_row + len(ids)})"
            rid, text, instruction = _parse_jsonl_row(line, where, fields)
            ids.append(rid)
            texts.append(text)
            instructions.append(instruction)
    return {"id": ids, "text": texts, "instruction": instructions}


# ------------------------------------------------------------------------------ Parquet
def _open_parquet(inp: InputFile) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(inp.filesystem.open_input_file(inp.path))
    except (pa.ArrowInvalid, OSError) as e:
        raise CorpusInputError(f"{inp.uri}: not a readable Parquet file ({e})") from None


def _parquet_columns(inp: InputFile, pf: pq.ParquetFile, fields: Fields) -> list[str]:
    schema = pf.schema_arrow
    names = schema.names
    for name, role, option in (
        (fields.id, "id", "--id-field"),
        (fields.text, "text", "--text-field"),
    ):
        if name not in names:
            raise CorpusInputError(
                f"{inp.uri}: no {name!r} column for the {role} (columns: {', '.join(names)}); "
                f"pass {option} NAME"
            )
    id_kind = _kind_of_type(schema.field(fields.id).type)
    if id_kind is None:
        raise CorpusInputError(
            f"{inp.uri}: id column {fields.id!r} must hold strings or integers, it is "
            f"{schema.field(fields.id).type}"
        )
    inp.id_kind = id_kind
    if _kind_of_type(schema.field(fields.text).type) != "string":
        raise CorpusInputError(
            f"{inp.uri}: text column {fields.text!r} must hold strings, it is "
            f"{schema.field(fields.text).type} (non-string texts)"
        )
    columns = [fields.id, fields.text]
    if fields.instruction is not None and fields.instruction in names:
        kind = schema.field(fields.instruction).type
        # A column of nulls only (pyarrow types it `null`) is a file without instructions.
        if _kind_of_type(kind) != "string" and not pa.types.is_null(kind):
            raise CorpusInputError(
                f"{inp.uri}: instruction column {fields.instruction!r} must hold strings, it is "
                f"{schema.field(fields.instruction).type}"
            )
        columns.append(fields.instruction)
    return columns


def _scan_parquet(inp: InputFile, fields: Fields, rows_per_chunk: int) -> pa.Array:
    pf = _open_parquet(inp)
    columns = _parquet_columns(inp, pf, fields)
    parts, row = [], 0
    content = ContentDigest()
    for batch in pf.iter_batches(batch_size=65536, columns=columns):
        for name, what in ((fields.id, "id"), (fields.text, "text")):
            nulls = batch.column(name).is_null()
            if pc.any(nulls).as_py():
                first = row + int(np.flatnonzero(nulls.to_numpy(zero_copy_only=False))[0])
                raise CorpusInputError(
                    f"{inp.uri} (row {first}): the {what} {name!r} is null (missing); every row "
                    f"needs an id and a text"
                )
        parts.append(batch.column(fields.id))
        instructions = batch.column(fields.instruction) if len(columns) == 3 else None
        content.update(batch.column(fields.id), batch.column(fields.text), instructions)
        row += batch.num_rows
    inp.content_sha256 = content.hexdigest()
    meta = pf.metadata
    start, first, rows = 0, 0, 0
    for g in range(meta.num_row_groups):
        rows += meta.row_group(g).num_rows
        if rows >= rows_per_chunk or g == meta.num_row_groups - 1:
            if rows:
                inp.chunks.append(Chunk(start, rows, first_group=first, last_group=g))
            start, first, rows = start + rows, g + 1, 0
    ids = pa.chunked_array(parts, type=parts[0].type if parts else pa.string())
    if pa.types.is_integer(ids.type):
        ids = ids.cast(pa.int64())
    else:
        ids = ids.cast(pa.string())
    return ids.combine_chunks() if ids.num_chunks else pa.array([], ids.type)


def _read_parquet_chunk(inp: InputFile, chunk: Chunk, fields: Fields) -> dict[str, list]:
    pf = _open_parquet(inp)
    columns = _parquet_columns(inp, pf, fields)
    groups = list(range(chunk.first_group, chunk.last_group + 1))
    table = pf.read_row_groups(groups, columns=columns)
    n = table.num_rows
    return {
        "id": table.column(fields.id),
        "text": table.column(fields.text).to_pylist(),
        "instruction": (
            table.column(fields.instruction).to_pylist() if len(columns) == 3 else [None] * n
        ),
    }


# ------------------------------------------------------------------------------ public
def scan_inputs(
    patterns: Sequence[str], fields: Fields | None = None, rows_per_chunk: int = 1024
) -> list[InputFile]:
    """Expand and check every input (see the module docstring); CorpusInputError on the first
    problem. Reads every row once (ids kept; texts and instructions hashed into each file's
    `content_sha256`, then discarded)."""
    fields = fields if fields is not None else Fields()
    if (
        isinstance(rows_per_chunk, bool)
        or not isinstance(rows_per_chunk, int)
        or (rows_per_chunk < 1)
    ):
        raise CorpusInputError(f"rows per chunk must be an int >= 1, got {rows_per_chunk!r}")
    files: list[InputFile] = []
    stems: dict[str, str] = {}
    all_ids: list[pa.Array] = []
    for uri, fs, path in expand_inputs(patterns):
        fmt, stem = _format_of(posixpath.basename(path))
        if stem in stems:
            raise CorpusInputError(
                f"{stems[stem]} and {uri} would both write {stem}.parquet: rename one of them or "
                "embed them in separate runs"
            )
        stems[stem] = uri
        inp = InputFile(uri=uri, path=path, filesystem=fs, format=fmt, stem=stem)
        try:
            if fmt == "jsonl":
                ids = _scan_jsonl(inp, fields, rows_per_chunk)
            else:
                ids = _scan_parquet(inp, fields, rows_per_chunk)
        except OSError as e:
            raise CorpusInputError(f"cannot read {uri}: {e}") from None
        if len(ids) == 0:
            raise CorpusInputError(f"{uri} is empty: it has no rows to embed")
        if files and inp.id_kind != files[0].id_kind:
            raise CorpusInputError(
                f"ids of {uri} are {inp.id_kind}s but ids of {files[0].uri} are "
                f"{files[0].id_kind}s: use one kind of id for the whole corpus"
            )
        inp.num_rows = len(ids)
        inp.ids_sha256 = ids_sha256(ids)
        files.append(inp)
        all_ids.append(ids)
    _check_unique(files, all_ids, fields)
    return files


def _check_unique(files: list[InputFile], ids: list[pa.Array], fields: Fields) -> None:
    everything = pa.chunked_array(ids)
    counts = pc.value_counts(everything)
    dup = pc.filter(counts, pc.greater(counts.field("counts"), 1))
    if len(dup) == 0:
        return
    value = dup[0]["values"]
    where = []
    for inp, arr in zip(files, ids, strict=True):
        rows = np.flatnonzero(pc.equal(arr, value).to_numpy(zero_copy_only=False))
        where += [f"{inp.uri} row {int(r)}" for r in rows[:3]]
    raise CorpusInputError(
        f"duplicate id {value.as_py()!r} ({fields.id!r}) in {', '.join(where[:3])}: ids must be "
        f"unique across all inputs ({len(dup)} duplicated id(s) in all)"
    )


def read_chunk(inp: InputFile, chunk: Chunk, fields: Fields, file_index: int) -> pa.Table:
    """The rows of one chunk: columns id, text, instruction (string, null = none), _file (int32,
    `file_index`) and _row (int64, the row's index in its file). Raises CorpusInputError when
    the file no longer holds what scan_inputs saw there."""
    if inp.format == "jsonl":
        cols = _read_jsonl_chunk(inp, chunk, fields)
    else:
        cols = _read_parquet_chunk(inp, chunk, fields)
    n = len(cols["text"])
    if n != chunk.num_rows:
        raise CorpusInputError(
            f"{inp.uri} changed while it was being embedded: rows {chunk.start_row} ... now "
            f"hold {n} rows instead of {chunk.num_rows}; rerun the command"
        )
    ids = cols["id"]
    try:
        ids = (
            ids.cast(inp.id_type)
            if isinstance(ids, pa.ChunkedArray)
            else pa.array(ids, type=inp.id_type)
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        raise CorpusInputError(f"{inp.uri} changed while it was being embedded (ids)") from None
    return pa.table(
        {
            "id": ids,
            "text": pa.array(cols["text"], pa.string()),
            "instruction": pa.array(cols["instruction"], pa.string()),
            "_file": pa.array(np.full(n, file_index, dtype=np.int32)),
            "_row": pa.array(np.arange(chunk.start_row, chunk.start_row + n, dtype=np.int64)),
        }
    )


_CHUNK_KEYS = ("start_row", "num_rows", "offset", "length", "first_group", "last_group")


def chunk_descriptor(inp: InputFile, file_index: int, chunk_index: int) -> dict:
    """A small, picklable description of one chunk (a row of the Ray dataset of work items)."""
    chunk = inp.chunks[chunk_index]
    desc = {
        "file": file_index,
        "uri": inp.uri,
        "path": inp.path,
        "format": inp.format,
        "id_kind": inp.id_kind,
    }
    desc.update({k: getattr(chunk, k) for k in _CHUNK_KEYS})
    return desc


def read_descriptor(desc: dict, fields: Fields) -> pa.Table:
    """read_chunk of a chunk_descriptor (on a worker: the filesystem comes from the URI)."""
    fs = _split_uri(desc["uri"])[0] if "://" in desc["uri"] else pafs.LocalFileSystem()
    inp = InputFile(
        uri=desc["uri"],
        path=desc["path"],
        filesystem=fs,
        format=desc["format"],
        stem="",
        id_kind=desc["id_kind"],
    )
    chunk = Chunk(**{k: int(desc[k]) for k in _CHUNK_KEYS})
    return read_chunk(inp, chunk, fields, int(desc["file"]))
