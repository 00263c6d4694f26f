"""Parquet training files: one example per row, checked column by column when indexed.

    rows = ParquetRows.open("triples.parquet", kind="triplet")   # DataError naming file and row
    rows.example(0)                                    # Example("triples.parquet row 1", ...)

kind "text" (MNTP, SimCSE): a string column "text". kind "triplet" (supervised): string columns
"query" and "positive", and optional "negative" (string), "negatives" (list of strings) and
"instruction" (string). A null in a required column, a null negative inside a list, or a column
of another type stops the run before training with the file, the row (1-based) and the fix.
The columns are decoded once into Arrow arrays (compact, not Python strings); a row becomes an
Example only when the stream reads it. Needs pyarrow (installed with l2v's `ray` extra).
"""

from __future__ import annotations

from pathlib import Path

from l2v_models.train.data import DataError, Example

PARQUET_SUFFIXES = (".parquet", ".pq")
TEXT_COLUMNS = {"text": ("text", True)}
TRIPLET_COLUMNS = {
    "query": ("text", True),
    "positive": ("text", True),
    "negative": ("text", False),
    "negatives": ("list", False),
    "instruction": ("text", False),
}


def is_parquet(path: Path) -> bool:
    return Path(path).suffix.lower() in PARQUET_SUFFIXES


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading Parquet training files needs pyarrow: pip install pyarrow "
                        "(or l2v's `ray` extra), or convert the file to JSONL") from None
    return pa, pc, pq


class ParquetRows:
    """The checked columns of one Parquet file; example(i) builds row i's Example."""

    def __init__(self, path: Path, kind: str, columns: dict):
        self.path, self.kind, self.columns = Path(path), kind, columns
        self.num_rows = len(next(iter(columns.values())))

    def __len__(self) -> int:
        return self.num_rows

    def where(self, i: int) -> str:
        return f"{self.path} row {i + 1}"

    @classmethod
    def open(cls, path, kind: str) -> ParquetRows:
        """Read and check the columns of `kind` (see the module docstring)."""
        pa, pc, pq = _pyarrow()
        path = Path(path)
        spec = TEXT_COLUMNS if kind == "text" else TRIPLET_COLUMNS
        try:
            schema = pq.read_schema(path)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: not a readable Parquet file ({e})") from None
        names = set(schema.names)
        missing = [c for c, (_, required) in spec.items() if required and c not in names]
        if missing:
            raise DataError(f"{path}: no column {', '.join(repr(m) for m in missing)}; its "
                            f"columns: {sorted(names)}")  # fmt: skip
        if kind == "triplet" and {"negative", "negatives"} <= names:
            raise DataError(f'{path}: has both "negative" and "negatives" columns; keep one '
                            '("negatives" holds a list per row)')  # fmt: skip
        wanted = [c for c in spec if c in names]
        table = pq.read_table(path, columns=wanted)
        columns = {}
        for name in wanted:
            col = table.column(name)
            typ, required = spec[name]
            if typ == "text" and not (pa.types.is_string(col.type)
                                      or pa.types.is_large_string(col.type)):  # fmt: skip
                raise DataError(f'{path}: column "{name}" must hold strings, it holds {col.type}')
            if typ == "list":
                ok = (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)) and (
                    pa.types.is_string(col.type.value_type)
                    or pa.types.is_large_string(col.type.value_type))
                if not ok:
                    raise DataError(f'{path}: column "{name}" must hold lists of strings, it '
                                    f"holds {col.type}")  # fmt: skip
                flat = pc.list_flatten(col)
                if flat.null_count:
                    parents = pc.list_parent_indices(col)
                    first = int(parents[_first_null(flat, pc)].as_py())
                    raise DataError(f'{path} row {first + 1}: "{name}" holds a null; give '
                                    "strings only")  # fmt: skip
            if required and col.null_count:
                raise DataError(f'{path} row {_first_null(col, pc) + 1}: "{name}" is null; '
                                "every row needs it")  # fmt: skip
            columns[name] = col.combine_chunks() if hasattr(col, "combine_chunks") else col
        return cls(path, kind, columns)

    def example(self, i: int) -> Example:
        where = self.where(i)
        get = {name: col[i].as_py() for name, col in self.columns.items()}
        if self.kind == "text":
            return Example(where, text=get["text"])
        return Example(where, query=get["query"], positive=get["positive"],
                       negative=get.get("negative"), negatives=tuple(get.get("negatives") or ()),
                       instruction=get.get("instruction") or "")  # fmt: skip


def _first_null(col, pc) -> int:
    """Index of the first null of an Arrow array or chunked array."""
    return int(pc.index(pc.is_null(col), True).as_py())
