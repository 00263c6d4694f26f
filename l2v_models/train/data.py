"""Training data: files -> validated line index -> seeded shuffled stream -> token-budget batches.

    index = DataIndex.scan(["wiki.txt", "pairs.jsonl"], kind="text")   # checks every line once
    stream = ExampleStream(index, seed=0)           # epoch e reads a permutation seeded (seed, e)
    batcher = TrainingBatcher(stream, encode, batch_size=32, batch_tokens=None)
    items = batcher.next_batch()                    # [(Example, item), ...] for one step

Formats (by file name): `.jsonl` / `.ndjson` hold one JSON object per line, `.parquet` / `.pq`
one example per row (l2v_models.train.parquet), anything else is plain text with one passage per
line (UTF-8; blank lines skipped).
- kind "text" (MNTP, SimCSE): a plain line, or a JSON object (Parquet column) with a string
  "text".
- kind "triplet" (supervised): strings "query" and "positive", optional "instruction", and the
  hard negatives as one string "negative" or a list of strings "negatives" (any number per
  example, none included). Plain text files are refused for this kind.
Every line is parsed once by `scan` before training starts, so a malformed line stops the run
at once with its file and line number (DataError); afterwards lines are read back by byte
offset, so the data is never held in memory (Parquet columns are, as Arrow arrays). The stream's
state (epoch, cursor) makes a checkpointed run resume on exactly the next example. Several files
mixed with weights: l2v_models.train.mixing.MixedStream.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from l2v_models.packing import fits

KINDS = ("text", "triplet")
JSONL_SUFFIXES = (".jsonl", ".ndjson")


class DataError(ValueError):
    """Unusable training data: the message names the file (and line) and what to fix."""


@dataclass(frozen=True)
class Example:
    """One training example and where it came from ("path:line").

    kind "text": text. kind "triplet": query, positive, instruction (""), and the hard
    negatives: `negatives` holds all of them (`negative`, the one-negative form, comes first)."""

    where: str
    text: str | None = None
    query: str | None = None
    positive: str | None = None
    negative: str | None = None
    instruction: str = ""
    negatives: tuple[str, ...] = ()

    def __post_init__(self):
        negatives = tuple(self.negatives)
        if self.negative is not None:
            negatives = (self.negative, *negatives)
        object.__setattr__(self, "negatives", negatives)


def _is_jsonl(path: Path) -> bool:
    return path.suffix.lower() in JSONL_SUFFIXES


def parse_line(raw: bytes, path: Path, lineno: int, kind: str) -> Example | None:
    """One line of a data file -> Example, None for a blank line; DataError naming path:line."""
    where = f"{path}:{lineno}"
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{where}: not UTF-8 text (byte {e.start} of the line); convert the file to UTF-8 "
            f"(e.g. iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8{path.suffix})"
        ) from None
    line = line.rstrip("\r\n")
    if not line.strip():
        return None
    if not _is_jsonl(path):
        if kind == "triplet":
            raise DataError(
                f"{path}: supervised training reads JSONL ({{\"query\", \"positive\", "
                "\"negatives\", \"instruction\"} per line) or Parquet; name the file *.jsonl"
            )
        return Example(where, text=line)
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")

    def string_field(name: str, required: bool) -> str | None:
        value = obj.get(name)
        if value is None:
            if required:
                raise DataError(f'{where}: missing the string field "{name}"; got fields '
                                f"{sorted(obj)}")  # fmt: skip
            return None
        if not isinstance(value, str):
            raise DataError(f'{where}: "{name}" must be a string, got {type(value).__name__}')
        return value

    if kind == "text":
        return Example(where, text=string_field("text", True))
    negatives = obj.get("negatives")
    if negatives is not None:
        if "negative" in obj:
            raise DataError(f'{where}: has both "negative" and "negatives"; give one (a list '
                            'goes in "negatives")')  # fmt: skip
        if not isinstance(negatives, list):
            raise DataError(f'{where}: "negatives" must be a list of strings, got '
                            f"{type(negatives).__name__}")  # fmt: skip
        for j, value in enumerate(negatives):
            if not isinstance(value, str):
                raise DataError(f'{where}: "negatives"[{j}] must be a string, got '
                                f"{type(value).__name__}")  # fmt: skip
    return Example(where, query=string_field("query", True),
                   positive=string_field("positive", True),
                   negative=string_field("negative", False), negatives=tuple(negatives or ()),
                   instruction=string_field("instruction", False) or "")  # fmt: skip


@dataclass
class DataIndex:
    """Byte offsets of every non-blank line of the data files (validated when scanned)."""

    paths: list[Path]
    kind: str
    file_ids: np.ndarray  # int32 [N]
    offsets: np.ndarray  # int64 [N]
    linenos: np.ndarray  # int64 [N]

    excluded: int = 0  # examples dropped by `exclude`
    # Parquet files' checked columns by file id (their rows are read from memory).
    tables: dict = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.offsets.shape[0])

    @classmethod
    def scan(cls, paths: Sequence, kind: str = "text",
             exclude: Callable[[Example], bool] | None = None) -> DataIndex:  # fmt: skip
        """Index and validate every line; DataError for a missing, empty or malformed file.
        exclude(example) -> True drops the example (e.g. evaluation_filter())."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        paths = [Path(p) for p in paths]
        if not paths:
            raise DataError("no data files given (--data FILE ...)")
        from l2v_models.train.parquet import ParquetRows, is_parquet

        file_ids, offsets, linenos = [], [], []
        excluded = 0
        tables: dict[int, ParquetRows] = {}
        for fid, path in enumerate(paths):
            if not path.exists():
                raise DataError(f"{path}: data file not found")
            if path.is_dir():
                raise DataError(f"{path} is a directory; pass data files")
            count = 0
            if is_parquet(path):
                rows = tables[fid] = ParquetRows.open(path, kind)
                for i in range(len(rows)):
                    if exclude is not None and exclude(rows.example(i)):
                        excluded += 1
                        continue
                    file_ids.append(fid)
                    offsets.append(i)
                    linenos.append(i + 1)
                    count += 1
            else:
                with open(path, "rb") as f:
                    pos = 0
                    for lineno, raw in enumerate(f, 1):
                        example = parse_line(raw, path, lineno, kind)
                        if example is not None and exclude is not None and exclude(example):
                            excluded += 1
                        elif example is not None:
                            file_ids.append(fid)
                            offsets.append(pos)
                            linenos.append(lineno)
                            count += 1
                        pos += len(raw)
            if count == 0:
                why = "every example is evaluation data" if excluded else "the file is empty"
                raise DataError(f"{path}: no training examples ({why} or blank)")
        return cls(paths, kind, np.asarray(file_ids, dtype=np.int32),
                   np.asarray(offsets, dtype=np.int64), np.asarray(linenos, dtype=np.int64),
                   excluded, tables)  # fmt: skip

    def file_range(self, fid: int) -> tuple[int, int]:
        """[start, stop) of file `fid`'s examples in index order (files are scanned in order)."""
        lo, hi = np.searchsorted(self.file_ids, [fid, fid + 1])
        return int(lo), int(hi)

    def read(self, i: int, handles: dict) -> Example:
        """Example i (index order), read back by its byte offset (Parquet: its row)."""
        fid = int(self.file_ids[i])
        if fid in self.tables:
            return self.tables[fid].example(int(self.offsets[i]))
        f = handles.get(fid)
        if f is None:
            f = handles[fid] = open(self.paths[fid], "rb")
        f.seek(int(self.offsets[i]))
        example = parse_line(f.readline(), self.paths[fid], int(self.linenos[i]), self.kind)
        if example is None:
            raise DataError(f"{self.paths[fid]} changed while training; restart the run")
        return example


class ExampleStream:
    """Examples in a seeded order, epoch after epoch: epoch e is a permutation drawn from
    numpy's PCG64 seeded (seed, e); shuffle=False reads the files in order."""

    def __init__(self, index: DataIndex, seed: int = 0, shuffle: bool = True):
        self.index, self.seed, self.shuffle = index, int(seed), shuffle
        self.epoch, self.cursor = 0, 0
        self._order: np.ndarray | None = None
        self._handles: dict = {}

    def _order_for(self, epoch: int) -> np.ndarray:
        n = len(self.index)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def next(self) -> Example:
        if self.cursor >= len(self.index):
            self.epoch, self.cursor, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self._order = self._order_for(self.epoch)
        example = self.index.read(int(self._order[self.cursor]), self._handles)
        self.cursor += 1
        return example

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def restore(self, state: dict) -> None:
        if "mix" in state:
            raise DataError(f"cannot resume: the checkpoint's data was mixed with --data-weights "
                            f"{state['mix']}; resume with the same data options")  # fmt: skip
        if (state["epoch"], state["cursor"]) != (self.epoch, self.cursor):
            self.epoch, self.cursor, self._order = int(state["epoch"]), int(state["cursor"]), None

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()


class TrainingBatcher:
    """Token-budget batches of encoded items for training steps (cut by packing.fits).

    encode(example) -> list of (item, n_tokens): one example may give several items (an MNTP
    passage split into limit-sized pieces) or none (a skipped over-long line). A batch takes
    items in stream order while it has fewer than `batch_size` items and their tokens fit in
    `batch_tokens` (the first item always goes in). Its state (the stream before the current
    example, plus how many of that example's items are used) resumes exactly."""

    def __init__(self, stream: ExampleStream, encode: Callable, *, batch_size: int | None,
                 batch_tokens: int | None):  # fmt: skip
        if batch_size is None and batch_tokens is None:
            raise ValueError("give batch_size, batch_tokens or both")
        self.stream, self.encode = stream, encode
        self.batch_size, self.batch_tokens = batch_size, batch_tokens
        self._pending: list = []  # the current example's remaining items
        self._anchor = stream.state()  # stream state before the current example
        self._used = 0  # items of the current example already batched
        self._skipped_in_a_row = 0

    def _fill(self) -> None:
        while not self._pending:
            self._anchor = self.stream.state()
            example = self.stream.next()
            items = self.encode(example)
            self._used = 0
            self._pending = [(example, item, n) for item, n in items]
            if not items:
                self._skipped_in_a_row += 1
                if self._skipped_in_a_row > len(self.stream.index):
                    raise DataError("every example was skipped (all over the length limit?)")
            else:
                self._skipped_in_a_row = 0

    def next_batch(self) -> list:
        """[(Example, item), ...] for one training step."""
        batch, tokens = [], 0
        while self.batch_size is None or len(batch) < self.batch_size:
            self._fill()
            example, item, n = self._pending[0]
            if not fits(n, tokens, len(batch), self.batch_tokens):
                break
            batch.append((example, item))
            tokens += n
            self._pending.pop(0)
            self._used += 1
        return batch

    def state(self) -> dict:
        """Where the next batch starts."""
        return {"anchor": dict(self._anchor), "used": self._used if self._pending else 0,
                "after": self.stream.state() if not self._pending else None}  # fmt: skip

    def restore(self, state: dict) -> None:
        if state.get("after") is not None:  # the last example was used up: continue after it
            self.stream.restore(state["after"])
            self._pending, self._used = [], 0
            self._anchor = self.stream.state()
            return
        self.stream.restore(state["anchor"])
        self._anchor = self.stream.state()
        example = self.stream.next()
        items = self.encode(example)
        used = int(state["used"])
        self._pending = [(example, item, n) for item, n in items][used:]
        self._used = used


def evaluation_filter() -> Callable[[Example], bool]:
    """exclude(example) for DataIndex.scan: True when any of the example's texts (text, query,
    positive, negatives; stripped) is one that `l2v eval` scores: a Lee document, a held-out
    WordNet synset's definition or example (l2v_models.eval.wordnet.is_heldout), a SimLex or
    WordSim word. Exact matches only: data built from WordNet should also skip held-out
    synsets itself (is_heldout). Raises the eval package's DataMissing (what to install) when
    its data is absent."""
    from l2v_models.eval.tasks import evaluation_texts

    texts = {t.strip() for t in evaluation_texts()}

    def exclude(example: Example) -> bool:
        fields = (example.text, example.query, example.positive, *example.negatives)
        return any(f is not None and f.strip() in texts for f in fields)

    return exclude


def refuse_evaluation_files(paths: Sequence) -> None:
    """DataError when a data file is an evaluation file of `l2v eval` (the Lee documents,
    lee.cor, of the installed gensim); never trains on it, whatever the options."""
    import importlib.util

    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        return
    lee = Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data" / "lee.cor"
    for p in paths:
        p = Path(p)
        if p.exists() and lee.exists() and p.resolve() == lee.resolve():
            raise DataError(f"{p} is the Lee evaluation corpus of `l2v eval`; never train on it "
                            "(lee_background.cor is the training half)")  # fmt: skip
