"""Corpus-scale embedding on Ray Data: l2v's engine inside each actor, Parquet out.

    from l2v_models.corpus import encode_corpus, embed_dataset, CorpusEmbedder
    result = encode_corpus(["data/*.jsonl"], "emb/", num_workers=8, gpus_per_worker=1)
    ds = embed_dataset(ray.data.read_parquet("s3://bucket/texts/"), "McGill-NLP/...", ...)

Ray Data does the distribution: `CorpusEmbedder` is a callable class for
`ray.data.Dataset.map_batches` (one model per actor, loaded once; `concurrency` actors with
`num_gpus` each), and Ray schedules the batches, restarts dead actors and retries their batches.
l2v adds what a corpus job needs around it (`encode_corpus`):

- Inputs are checked whole before Ray starts (l2v_models.corpus.inputs.scan_inputs): duplicate
  ids, missing fields, non-string texts or empty files stop the run with one clear error.
- Output: `<output>/<stem>.parquet` per input file, columns `id` (the input's ids, in input
  order) and `embedding` (fixed_size_list<float32>[D]); file metadata `l2v.model`,
  `l2v.dimension` and `l2v.info` (JSON: settings, rows, SHA-256 of the ids, `content_sha256` of
  the input's ids, texts and instructions (inputs.ContentDigest), source). The driver is the only
  writer: it streams Ray's output blocks (ordered, `preserve_order`) into
  `.<stem>.parquet.l2v-partial`, checks every row index on arrival (each row of the file exactly
  once, in order) and the ids' SHA-256 against the input, then renames the file to its final
  name. `_SUCCESS.json` (inputs with their status and content SHA-256, rows, model, l2v version,
  seconds) is written last, after every output has been verified again from disk (row count,
  ids and content SHA-256 against the input).
- Resumable: an output under its final name is complete by construction; a rerun skips it when
  its metadata matches the settings and the input's content SHA-256. With other settings the run
  stops (delete the file or use another output directory). An output whose input changed (any
  id, text or instruction, or the number of rows), or one written before l2v recorded the
  content SHA-256 (it cannot be checked), is redone: the new output replaces it by the same
  atomic rename, and its per-file status says why. A killed run leaves only hidden
  `.l2v-partial` files, which the next run deletes. One run per output directory at a time.
- Embeddings equal `LLM2Vec.encode` of the same texts: each actor runs
  `encoder.prepare_texts` + `encoder.engine.embed`, whose results do not depend on batching.

Longer than ~500 lines on purpose: the per-file pipeline (plan, Ray Data map_batches, ordered
writing, atomic rename, verification, manifest, resume) must be read as one piece to see that
every row is written exactly once; input reading and checking live in corpus/inputs.py.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import posixpath
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from l2v_models.corpus.inputs import (
    Chunk,
    CorpusInputError,
    Fields,
    IdsDigest,
    InputFile,
    chunk_descriptor,
    ids_sha256,
    read_descriptor,
    scan_inputs,
)

MANIFEST = "_SUCCESS.json"
PARTIAL_SUFFIX = ".l2v-partial"
# The status of each file in CorpusResult.files and the manifest: what this run did with it.
EMBEDDED = "embedded"
SKIPPED = "skipped (complete)"
REDONE_CHANGED = "redone (its input changed)"
REDONE_UNCHECKABLE = "redone (its old output has no content SHA-256 to check)"
REDONE_DAMAGED = "redone (its old output does not hold its rows)"
REDONE = (REDONE_CHANGED, REDONE_UNCHECKABLE, REDONE_DAMAGED)
DEFAULT_BATCH_TEXTS = 1024
# Model options that change embeddings (recorded in outputs and compared on resume); placement
# and batching (device_map, backend, max_tokens_per_batch...) do not change them.
_RESULT_KWARGS = (
    "pooling_mode",
    "max_length",
    "doc_max_length",
    "skip_instruction",
    "torch_dtype",
    "dtype",
    "base_weights_path",
    "attention",
    "prompt_name",
    "truncate_dim",
)


class CorpusRunError(RuntimeError):
    """The run could not produce complete, verified outputs (message says why)."""


def embedding_array(rows: np.ndarray) -> pa.FixedSizeListArray:
    """float32 [N, D] -> Arrow fixed_size_list<float32>[D] of N rows (zero-copy when possible)."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    n, d = rows.shape
    return pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), d)


def embeddings_to_numpy(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """An `embedding` column (fixed_size_list<float32>[D]) -> float32 [N, D]."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    d = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, d).astype(np.float32)


# ------------------------------------------------------------------------------ the actor
class CorpusEmbedder:
    """A callable class for `ray.data.Dataset.map_batches(..., batch_format="pyarrow")`.

    The constructor loads the model once per actor: `LLM2Vec.from_pretrained(model,
    peft_model_name_or_path=peft, **model_kwargs)` (any model l2v runs: an LLM2Vec is an
    l2v_models.embedder.Embedder). Each call takes a pyarrow Table with a string column
    `text_column` (and, optionally, `instruction_column`: a string or null per row) and returns
    the same rows, in order, without those two columns, plus `embedding`
    (fixed_size_list<float32>[D]). A row's instruction (prompt) is its `instruction_column`
    value, else `instruction`, else the model's prompt named `prompt_name`, else the model's
    default prompt if it has one. Embeddings equal `encoder.encode(items, prompt_name=...,
    normalize_embeddings=normalize, truncate_dim=truncate_dim)` of the same items, whatever the
    batch. num_threads: torch CPU threads (CPU workers; default: torch's choice).
    """

    def __init__(
        self,
        model: str | None = None,
        peft: str | None = None,
        *,
        text_column: str = "text",
        instruction_column: str | None = None,
        instruction: str | None = None,
        normalize: bool = False,
        num_threads: int | None = None,
        prompt_name: str | None = None,
        truncate_dim: int | None = None,
        **model_kwargs,
    ):
        import torch

        from l2v_models.encoder import LLM2Vec
        from l2v_models.head import check_truncate_dim

        if num_threads is not None:
            torch.set_num_threads(int(num_threads))
        self.text_column = text_column
        self.instruction_column = instruction_column
        self.instruction = instruction or None
        # --instruction "": no prompt for any row (the model's default prompt does not apply).
        self.prompt = "" if instruction == "" else None
        self.normalize = bool(normalize)
        self.encoder = LLM2Vec.from_pretrained(model, peft_model_name_or_path=peft, **model_kwargs)
        self.prompt_name = prompt_name
        self.encoder.rules.resolve_prompt(prompt_name)  # an unknown name fails at start-up
        self.truncate_dim = check_truncate_dim(truncate_dim, self.encoder.dimension)

    @property
    def dimension(self) -> int:
        return self.truncate_dim or self.encoder.dimension

    def items(self, batch: pa.Table) -> list:
        """The encoder's items (strings and [instruction, text] pairs) of a batch's rows."""
        if self.text_column not in batch.column_names:
            raise KeyError(
                f"the batch has no text column {self.text_column!r} "
                f"(columns: {', '.join(batch.column_names)})"
            )
        texts = batch.column(self.text_column).to_pylist()
        if self.instruction_column is not None and self.instruction_column in batch.column_names:
            instructions = batch.column(self.instruction_column).to_pylist()
        else:
            instructions = [None] * len(texts)
        items = []
        for i, (text, ins) in enumerate(zip(texts, instructions, strict=True)):
            if not isinstance(text, str):
                raise TypeError(f"row {i}: the text must be a string, got {type(text).__name__}")
            ins = ins or self.instruction
            items.append([ins, text] if ins else text)
        return items

    def embed_items(self, items: list) -> np.ndarray:
        """float32 [N, D] of the items, in order (the model's text rules + the engine)."""
        encoder = self.encoder
        from l2v_models.text_inputs import warn_truncations

        prepared = encoder.prepare(items, prompt_name=self.prompt_name, prompt=self.prompt)
        warn_truncations(prepared.truncations, len(items))  # Ray shows workers' warnings
        out = encoder.embed(prepared.texts, normalize=self.normalize,
                            truncate_dim=self.truncate_dim)  # fmt: skip
        return out.numpy()

    def __call__(self, batch: pa.Table) -> pa.Table:
        if not isinstance(batch, pa.Table):  # e.g. batch_format left at "default"
            batch = pa.Table.from_pandas(batch) if hasattr(batch, "to_dict") else pa.table(batch)
        rows = self.embed_items(self.items(batch))
        drop = [
            c
            for c in (self.text_column, self.instruction_column)
            if c is not None and c in batch.column_names
        ]
        return batch.drop_columns(drop).append_column("embedding", embedding_array(rows))


class _ChunkEmbedder:
    """The corpus actor: reads the chunks named by its input rows (inputs.chunk_descriptor) and
    embeds them with an embedder (CorpusEmbedder or a subclass), yielding tables of at most
    `batch_texts` rows: _file, _row, id, embedding."""

    def __init__(self, fields, batch_texts, embedder_cls, embedder_kwargs):
        self.fields = fields
        self.batch_texts = batch_texts
        self.embedder = embedder_cls(**embedder_kwargs)

    def __call__(self, descriptors: pa.Table) -> Iterator[pa.Table]:
        for desc in descriptors.to_pylist():
            table = read_descriptor(desc, self.fields)
            for start in range(0, table.num_rows, self.batch_texts):
                yield self.embedder(table.slice(start, self.batch_texts))


def _remote_args(num_workers, gpus_per_worker, cpus_per_worker) -> dict:
    """map_batches arguments for a fixed pool of `num_workers` actors."""
    from ray.data import ActorPoolStrategy

    args = dict(compute=ActorPoolStrategy(size=int(num_workers)), num_cpus=float(cpus_per_worker))
    if gpus_per_worker:
        args["num_gpus"] = float(gpus_per_worker)
    return args


def embed_dataset(
    ds,
    model: str | None = None,
    *,
    peft: str | None = None,
    text_column: str = "text",
    instruction_column: str | None = None,
    instruction: str | None = None,
    normalize: bool = False,
    batch_texts: int = 256,
    num_workers: int = 1,
    gpus_per_worker: float = 0,
    cpus_per_worker: float = 1,
    **model_kwargs,
):
    """A Ray Dataset with an `embedding` column (fixed_size_list<float32>[D]) in place of the
    text (and instruction) column(s); other columns are kept. Lazy, like every Ray transform.

    num_workers actors each load the model once (`gpus_per_worker` GPUs, e.g. 1, or 0 for CPU
    workers; `cpus_per_worker` CPUs, also torch's thread count on CPU workers) and embed batches
    of `batch_texts` rows. model, peft, model_kwargs: as `LLM2Vec.from_pretrained`.
    """
    kwargs = _embedder_kwargs(
        model,
        peft,
        text_column,
        instruction_column,
        instruction,
        normalize,
        gpus_per_worker,
        cpus_per_worker,
        model_kwargs,
    )
    _check_resources(num_workers, gpus_per_worker, cpus_per_worker, batch_texts)
    return ds.map_batches(
        CorpusEmbedder,
        fn_constructor_kwargs=kwargs,
        batch_size=int(batch_texts),
        batch_format="pyarrow",
        **_remote_args(num_workers, gpus_per_worker, cpus_per_worker),
    )


def _embedder_kwargs(
    model,
    peft,
    text_column,
    instruction_column,
    instruction,
    normalize,
    gpus_per_worker,
    cpus_per_worker,
    model_kwargs,
) -> dict:
    model_kwargs = dict(model_kwargs)
    if not gpus_per_worker and "device_map" not in model_kwargs and "device" not in model_kwargs:
        model_kwargs["device_map"] = "cpu"  # a worker without a GPU runs on its CPUs
    threads = None if gpus_per_worker else max(1, int(cpus_per_worker))
    return dict(
        model=model,
        peft=peft,
        text_column=text_column,
        instruction_column=instruction_column,
        instruction=instruction,
        normalize=normalize,
        num_threads=threads,
        **model_kwargs,
    )


def _check_resources(num_workers, gpus_per_worker, cpus_per_worker, batch_texts) -> None:
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"num_workers must be an int >= 1, got {num_workers!r}")
    if not isinstance(gpus_per_worker, (int, float)) or not 0 <= gpus_per_worker <= 1:
        raise ValueError(
            f"gpus_per_worker must be between 0 and 1 (l2v runs a model on one GPU; a fraction "
            f"packs several workers on a GPU), got {gpus_per_worker!r}"
        )
    if not isinstance(cpus_per_worker, (int, float)) or cpus_per_worker <= 0:
        raise ValueError(f"cpus_per_worker must be > 0, got {cpus_per_worker!r}")
    if isinstance(batch_texts, bool) or not isinstance(batch_texts, int) or batch_texts < 1:
        raise ValueError(f"batch_texts must be an int >= 1, got {batch_texts!r}")


# ------------------------------------------------------------------------------ outputs
def _output_location(output: str) -> tuple[pafs.FileSystem, str]:
    if "://" in output:
        try:
            fs, path = pafs.FileSystem.from_uri(output)
        except (pa.ArrowInvalid, OSError) as e:
            raise CorpusInputError(f"cannot open output {output}: {e}") from None
    else:
        fs, path = pafs.LocalFileSystem(), os.path.abspath(output)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        raise CorpusInputError(f"--output {output} is a file; it must be a directory")
    return fs, path.rstrip("/")


def _read_info(fs: pafs.FileSystem, path: str) -> tuple[pq.FileMetaData, dict]:
    with fs.open_input_file(path) as f:
        meta = pq.read_metadata(f)
    raw = (meta.metadata or {}).get(b"l2v.info")
    return meta, (json.loads(raw) if raw else {})


def _existing_output(fs, path: str, uri: str, inp: InputFile, settings: dict) -> str:
    """What to do with `path`, the output of `inp`: SKIPPED when it holds the complete output of
    the input's current content with these settings; EMBEDDED when it does not exist; a REDONE_*
    status (why) when it was written by l2v with these settings but cannot be trusted for this
    content; CorpusInputError when it was not written by l2v or with other settings (the user
    decides: nothing of theirs is overwritten)."""
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return EMBEDDED
    try:
        meta, info = _read_info(fs, path)
    except (pa.ArrowInvalid, OSError, json.JSONDecodeError):
        info, meta = {}, None
    redo = f"delete {uri} to redo it, or write to another --output"
    if not info:
        raise CorpusInputError(f"{uri} exists but was not written by l2v encode-corpus: {redo}")
    if info.get("settings") != settings:
        diff = sorted(
            k
            for k in set(settings) | set(info.get("settings", {}))
            if settings.get(k) != info.get("settings", {}).get(k)
        )
        raise CorpusInputError(
            f"{uri} was made with other settings ({', '.join(diff)} differ): {redo}"
        )
    if not info.get("content_sha256"):  # written before l2v recorded it: texts unknown
        return REDONE_UNCHECKABLE
    if (
        info.get("content_sha256") != inp.content_sha256
        or info.get("rows") != inp.num_rows
        or info.get("ids_sha256") != inp.ids_sha256
    ):
        return REDONE_CHANGED
    if meta.num_rows != inp.num_rows:
        return REDONE_DAMAGED
    return SKIPPED


class _FileWriter:
    """Streams one input file's output rows into its partial file; `finish` checks and renames."""

    def __init__(self, fs, out_dir: str, inp: InputFile, file_index: int, info: dict):
        self.fs, self.inp, self.index = fs, inp, file_index
        self.final = f"{out_dir}/{inp.stem}.parquet"
        self.partial = f"{out_dir}/.{inp.stem}.parquet{PARTIAL_SUFFIX}"
        self.info = info
        self.written = 0
        self.digest = IdsDigest()
        self._stream = self._writer = None

    def write(self, rows: pa.Table) -> None:
        if self._writer is None:
            dim = rows.schema.field("embedding").type.list_size
            info = dict(self.info, dimension=dim)
            metadata = {
                b"l2v.model": str(info["settings"]["model"]).encode(),
                b"l2v.dimension": str(dim).encode(),
                b"l2v.info": json.dumps(info, sort_keys=True).encode(),
            }
            schema = pa.schema(
                [("id", self.inp.id_type), ("embedding", pa.list_(pa.float32(), dim))],
                metadata=metadata,
            )
            self.schema = schema
            self._stream = self.fs.open_output_stream(self.partial)
            self._writer = pq.ParquetWriter(self._stream, schema)
        table = pa.table(
            [rows.column("id").cast(self.inp.id_type), rows.column("embedding")], schema=self.schema
        )
        self._writer.write_table(table)
        self.digest.update(table.column("id"))
        self.written += table.num_rows

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._stream.close()
            self._writer = self._stream = None

    def finish(self) -> None:
        """Close, check rows and ids against the input, rename to the final name."""
        self.close()
        inp = self.inp
        if self.written != inp.num_rows or self.digest.hexdigest() != inp.ids_sha256:
            raise CorpusRunError(
                f"the output of {inp.uri} does not match its input ({self.written} rows written, "
                f"{inp.num_rows} expected, or other ids); it was not renamed: rerun the command"
            )
        on_disk = _read_info(self.fs, self.partial)[0].num_rows
        if on_disk != inp.num_rows:
            raise CorpusRunError(f"{self.partial} holds {on_disk} rows, {inp.num_rows} expected")
        self.fs.move(self.partial, self.final)

    def abort(self) -> None:
        try:
            self.close()
        except Exception:
            pass
        try:
            self.fs.delete_file(self.partial)
        except OSError:
            pass


def verify_outputs(fs, out_dir: str, files: Sequence[InputFile]) -> list[dict]:
    """Re-read every output: exactly one row per input row, the same ids in the same order, made
    from the input's current content (its metadata's content SHA-256). Returns per file {input,
    output, rows, content_sha256}; CorpusRunError on the first mismatch."""
    report = []
    for inp in files:
        path = f"{out_dir}/{inp.stem}.parquet"
        try:
            with fs.open_input_file(path) as f:
                table = pq.read_table(f, columns=["id"])
            info = json.loads((table.schema.metadata or {}).get(b"l2v.info") or b"{}")
        except (OSError, pa.ArrowInvalid, json.JSONDecodeError) as e:
            raise CorpusRunError(f"verification: cannot read {path}: {e}") from None
        if table.num_rows != inp.num_rows:
            raise CorpusRunError(
                f"verification: {path} has {table.num_rows} rows but {inp.uri} has {inp.num_rows}"
            )
        if ids_sha256(table.column("id")) != inp.ids_sha256:
            raise CorpusRunError(f"verification: the ids of {path} differ from those of {inp.uri}")
        if info.get("content_sha256") != inp.content_sha256:
            raise CorpusRunError(
                f"verification: {path} was not made from the current content of {inp.uri} "
                "(another run writing to the same directory?): rerun the command"
            )
        report.append(
            {
                "input": inp.uri,
                "output": posixpath.basename(path),
                "rows": inp.num_rows,
                "content_sha256": inp.content_sha256,
            }
        )
    return report


def _write_json(fs, path: str, obj: dict) -> None:
    partial = f"{posixpath.dirname(path)}/.{posixpath.basename(path)}{PARTIAL_SUFFIX}"
    data = (json.dumps(obj, indent=2) + "\n").encode()
    with fs.open_output_stream(partial) as f:
        f.write(data)
    fs.move(partial, path)


def _remove_stale(fs, out_dir: str) -> None:
    infos = fs.get_file_info(pafs.FileSelector(out_dir, allow_not_found=True))
    for i in infos:
        if i.type == pafs.FileType.File and (
            (i.base_name.startswith(".") and i.base_name.endswith(PARTIAL_SUFFIX))
            or i.base_name == MANIFEST
        ):
            fs.delete_file(i.path)


# ------------------------------------------------------------------------------ the run
@dataclass
class CorpusResult:
    """What `encode_corpus` did. rows: input rows in all; embedded_rows: rows embedded by this
    run (the others were complete already); rows_per_s: embedded_rows / embed_seconds.
    embedded_files counts the redone files too; a file's `status` says what happened to it
    (EMBEDDED, SKIPPED or a REDONE_* status that says why)."""

    output: str
    files: list[dict] = field(default_factory=list)  # input, output, rows, content_sha256, status
    rows: int = 0
    embedded_rows: int = 0
    embedded_files: int = 0
    skipped_files: int = 0
    redone_files: int = 0
    dimension: int | None = None
    seconds: float = 0.0
    embed_seconds: float = 0.0
    manifest: str = ""

    first_output_seconds: float = 0.0  # from the start of the embed phase to the first rows
    steady_rows: int = 0  # rows that arrived after the first output block ...
    steady_seconds: float = 0.0  # ... and the time from that block to the last one

    @property
    def rows_per_s(self) -> float:
        return self.embedded_rows / self.embed_seconds if self.embed_seconds > 0 else 0.0

    @property
    def steady_rows_per_s(self) -> float:
        """Throughput once the workers run (Ray start-up and model loads excluded)."""
        return self.steady_rows / self.steady_seconds if self.steady_seconds > 0 else 0.0


def result_settings(model, peft, fields: Fields, instruction, normalize, model_kwargs) -> dict:
    """What decides the embeddings of a run (stored in every output; a rerun must match)."""
    from l2v_models.checkpoint import model_label

    settings = {
        "model": model_label(model, peft),
        "peft": peft,
        "text_field": fields.text,
        "id_field": fields.id,
        "instruction_field": fields.instruction,
        "instruction": instruction or None,
        "normalize": bool(normalize),
    }
    for key in _RESULT_KWARGS:
        if model_kwargs.get(key) is not None:
            settings[key] = str(model_kwargs[key])
    return settings


def _l2v_version() -> str:
    try:
        from importlib.metadata import version

        return version("l2v")
    except Exception:
        return "unknown"


def _cluster_defaults(num_workers, gpus_per_worker, cpus_per_worker) -> tuple:
    """Fill in None settings from the cluster: a worker per GPU (1 GPU, 1 CPU each) on a GPU
    cluster; else one CPU worker with all CPUs (or N workers sharing them)."""
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 1))
    if gpus_per_worker is None:
        gpus_per_worker = 1 if gpus >= 1 else 0
    if num_workers is None:
        num_workers = max(1, int(gpus // gpus_per_worker)) if gpus_per_worker else 1
    if cpus_per_worker is None:
        cpus_per_worker = 1 if gpus_per_worker else max(1, int(cpus // num_workers))
    need_gpus, need_cpus = num_workers * gpus_per_worker, num_workers * cpus_per_worker
    if need_gpus > gpus + 1e-9 or need_cpus > cpus + 1e-9:
        raise CorpusInputError(
            f"{num_workers} workers need {need_gpus:g} GPUs and {need_cpus:g} CPUs but the Ray "
            f"cluster has {gpus:g} GPUs and {cpus:g} CPUs: lower --num-workers (or "
            "--gpus-per-worker / --cpus-per-worker), or add machines to the cluster"
        )
    return num_workers, gpus_per_worker, cpus_per_worker


def encode_corpus(
    inputs: Sequence[str],
    output: str,
    model: str | None = None,
    *,
    peft: str | None = None,
    fields: Fields | None = None,
    instruction: str | None = None,
    normalize: bool = False,
    num_workers: int | None = None,
    gpus_per_worker: float | None = None,
    cpus_per_worker: float | None = None,
    batch_texts: int = DEFAULT_BATCH_TEXTS,
    ray_address: str | None = None,
    ray_init_kwargs: dict | None = None,
    progress: bool = True,
    embedder_cls: type = CorpusEmbedder,
    **model_kwargs,
) -> CorpusResult:
    """Embed every row of the input files into `<output>/<stem>.parquet` (module docstring).

    inputs: JSONL / Parquet files or globs (local or pyarrow URIs). fields: the id, text and
    instruction fields; instruction: one instruction for every row (with an instruction field:
    for the rows without one). num_workers / gpus_per_worker / cpus_per_worker: the actor pool
    (default: one 1-GPU worker per GPU of the cluster; without GPUs one CPU worker).
    batch_texts: rows per Ray batch (and per read chunk). ray_address: join that cluster
    ("auto" = the one on this machine); without it a running Ray session is used, else a local
    instance is started (with `ray_init_kwargs`) and shut down at the end. progress: Ray Data's
    progress bars. embedder_cls: CorpusEmbedder or a subclass. model, peft, model_kwargs: as
    `LLM2Vec.from_pretrained`.

    Everything is checked before Ray starts: CorpusInputError for bad input or settings;
    CorpusRunError when outputs cannot be completed and verified; Ray's errors pass through.
    """
    t_start = time.perf_counter()
    fields = fields if fields is not None else Fields()
    if instruction is not None and not isinstance(instruction, str):
        raise CorpusInputError(f"instruction must be a string, got {type(instruction).__name__}")
    settings = result_settings(model, peft, fields, instruction, normalize, model_kwargs)
    try:
        _check_resources(
            1 if num_workers is None else num_workers,
            0 if gpus_per_worker is None else gpus_per_worker,
            1 if cpus_per_worker is None else cpus_per_worker,
            batch_texts,
        )
    except ValueError as e:
        raise CorpusInputError(str(e)) from None
    files = scan_inputs(inputs, fields, rows_per_chunk=batch_texts)
    fs, out_dir = _output_location(output)
    status = []
    for inp in files:
        final = f"{out_dir}/{inp.stem}.parquet"
        uri = f"{output.rstrip('/')}/{inp.stem}.parquet"
        status.append(_existing_output(fs, final, uri, inp, settings))
    fs.create_dir(out_dir, recursive=True)
    _remove_stale(fs, out_dir)

    result = CorpusResult(output=output, rows=sum(f.num_rows for f in files))
    # A file being redone keeps its old output until the new one is renamed over it: a run
    # killed in between leaves the old one, which the next run redoes again.
    pending = [i for i, s in enumerate(status) if s != SKIPPED]
    ray_info: dict = {}
    t_embed = time.perf_counter()
    if pending:
        ray_info = _run(
            files,
            pending,
            fs,
            out_dir,
            settings,
            result,
            model=model,
            peft=peft,
            fields=fields,
            instruction=instruction,
            normalize=normalize,
            num_workers=num_workers,
            gpus_per_worker=gpus_per_worker,
            cpus_per_worker=cpus_per_worker,
            batch_texts=batch_texts,
            ray_address=ray_address,
            ray_init_kwargs=ray_init_kwargs,
            progress=progress,
            embedder_cls=embedder_cls,
            model_kwargs=model_kwargs,
        )
    result.embed_seconds = time.perf_counter() - t_embed

    verified = verify_outputs(fs, out_dir, files)
    for entry, s in zip(verified, status, strict=True):
        entry["status"] = s
    result.files = verified
    result.skipped_files = sum(s == SKIPPED for s in status)
    result.redone_files = sum(s in REDONE for s in status)
    result.embedded_files = len(files) - result.skipped_files
    if result.dimension is None:
        result.dimension = int(_read_info(fs, f"{out_dir}/{files[0].stem}.parquet")[1]["dimension"])
    result.seconds = time.perf_counter() - t_start
    manifest = {
        "l2v_version": _l2v_version(),
        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": settings,
        "dimension": result.dimension,
        "rows": result.rows,
        "files": len(files),
        "embedded_rows": result.embedded_rows,
        "embedded_files": result.embedded_files,
        "skipped_files": result.skipped_files,
        "redone_files": result.redone_files,
        "seconds": round(result.seconds, 3),
        "embed_seconds": round(result.embed_seconds, 3),
        "rows_per_s": round(result.rows_per_s, 3),
        "first_output_seconds": round(result.first_output_seconds, 3),
        "steady_rows_per_s": round(result.steady_rows_per_s, 3),
        "ray": ray_info,
        "inputs": verified,
    }
    result.manifest = f"{out_dir}/{MANIFEST}"
    _write_json(fs, result.manifest, manifest)
    return result


def _start_ray(ray_address, ray_init_kwargs) -> bool:
    """Connect to / start Ray; True when this call started it (and must shut it down)."""
    import ray

    if ray.is_initialized():
        if ray_address is None:
            return False
        raise CorpusInputError(
            "Ray is already initialized in this process; call without ray_address to use it"
        )
    kwargs = dict(ray_init_kwargs or {})
    if ray_address is not None:
        ray.init(address=ray_address, **kwargs)
    else:  # a new local instance, even when a `ray start` cluster runs on this machine
        kwargs.setdefault("include_dashboard", False)
        kwargs.setdefault("address", "local")
        ray.init(**kwargs)
    return True


def _run(
    files,
    pending,
    fs,
    out_dir,
    settings,
    result,
    *,
    model,
    peft,
    fields,
    instruction,
    normalize,
    num_workers,
    gpus_per_worker,
    cpus_per_worker,
    batch_texts,
    ray_address,
    ray_init_kwargs,
    progress,
    embedder_cls,
    model_kwargs,
) -> dict:
    import ray

    started = _start_ray(ray_address, ray_init_kwargs)
    writers: dict[int, _FileWriter] = {}
    try:
        num_workers, gpus_per_worker, cpus_per_worker = _cluster_defaults(
            num_workers, gpus_per_worker, cpus_per_worker
        )
        embedder_kwargs = _embedder_kwargs(
            model,
            peft,
            "text",
            "instruction",
            instruction,
            normalize,
            gpus_per_worker,
            cpus_per_worker,
            model_kwargs,
        )
        descriptors = [
            chunk_descriptor(files[f], f, c) for f in pending for c in range(len(files[f].chunks))
        ]
        ds = ray.data.from_items(descriptors, override_num_blocks=len(descriptors))
        ds = ds.map_batches(
            _ChunkEmbedder,
            fn_constructor_kwargs=dict(
                fields=fields,
                batch_texts=batch_texts,
                embedder_cls=embedder_cls,
                embedder_kwargs=embedder_kwargs,
            ),
            batch_size=1,
            batch_format="pyarrow",
            **_remote_args(num_workers, gpus_per_worker, cpus_per_worker),
        )
        ds.context.execution_options.preserve_order = True
        ds.context.enable_progress_bars = bool(progress)
        info = {
            "address": ray.get_runtime_context().gcs_address,
            "workers": num_workers,
            "gpus_per_worker": gpus_per_worker,
            "cpus_per_worker": cpus_per_worker,
            "batch_texts": batch_texts,
        }
        base_info = {"settings": settings, "l2v_version": _l2v_version()}
        done = set()
        t0, t_first = time.perf_counter(), None
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            now = time.perf_counter()
            if t_first is None:
                t_first = now
                result.first_output_seconds = now - t0
            else:
                result.steady_rows += batch.num_rows
                result.steady_seconds = now - t_first
            file_col = batch.column("_file").to_numpy()
            row_col = batch.column("_row").to_numpy()
            cuts = np.flatnonzero(np.diff(file_col)) + 1
            for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(file_col)], strict=True):
                f = int(file_col[lo])
                inp = files[f]
                w = writers.get(f)
                if w is None:
                    if f in done or f not in pending:
                        raise CorpusRunError(f"rows of {inp.uri} arrived after it was complete")
                    info_f = dict(
                        base_info,
                        source=inp.uri,
                        rows=inp.num_rows,
                        ids_sha256=inp.ids_sha256,
                        content_sha256=inp.content_sha256,
                    )
                    w = writers[f] = _FileWriter(fs, out_dir, inp, f, info_f)
                rows = row_col[lo:hi]
                if rows[0] != w.written or np.any(np.diff(rows) != 1):
                    raise CorpusRunError(
                        f"rows of {inp.uri} arrived out of order or twice (row {int(rows[0])} "
                        f"after {w.written} rows): nothing of it was renamed; rerun the command"
                    )
                if w.written + len(rows) > inp.num_rows:
                    raise CorpusRunError(f"more output rows than input rows for {inp.uri}")
                w.write(batch.slice(lo, hi - lo))
                result.embedded_rows += int(hi - lo)
                if result.dimension is None:
                    result.dimension = int(batch.schema.field("embedding").type.list_size)
                if w.written == inp.num_rows:
                    w.finish()
                    del writers[f]
                    done.add(f)
        missing = [files[f].uri for f in pending if f not in done]
        if missing:
            raise CorpusRunError(
                f"Ray's output ended before all rows arrived ({', '.join(missing[:3])} "
                "incomplete); nothing incomplete was renamed: rerun the command"
            )
        return info
    finally:
        for w in writers.values():
            w.abort()
        if started:
            ray.shutdown()


_ERROR_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception|Interrupt)): (\S.*)$")
_RAY_WRAPPERS = ("RayTaskError", "RayActorError", "ActorDiedError", "UserCodeException",
                 "SystemException", "RayError")  # fmt: skip


def describe_ray_error(error: BaseException) -> str:
    """One line for a Ray failure: the last "SomeError: message" line of the innermost user
    exception (Ray carries the worker's traceback as text), else the exception's own first
    line."""
    chain, e = [], error
    while e is not None and all(e is not c for c in chain):
        chain.append(e)
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    found = None
    for exc in chain:
        for line in str(exc).splitlines():
            m = _ERROR_LINE.match(line)
            if m and m.group(1).rsplit(".", 1)[-1] not in _RAY_WRAPPERS:
                found = f"{m.group(1).rsplit('.', 1)[-1]}: {m.group(2).strip()}"
    if found:
        return found
    for exc in chain:
        text = str(exc).strip()
        if text:
            return f"{type(exc).__name__}: {text.splitlines()[0]}"
    return type(error).__name__


__all__ = [
    "Chunk",
    "CorpusEmbedder",
    "CorpusInputError",
    "CorpusResult",
    "CorpusRunError",
    "Fields",
    "embed_dataset",
    "embedding_array",
    "embeddings_to_numpy",
    "encode_corpus",
    "verify_outputs",
]
