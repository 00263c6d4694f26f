"""`l2v encode`: embed texts given as arguments or in a file.

    l2v encode "A cat sits on the mat." "A kitten rests on a rug."   # cosine-similarity table
    l2v encode --input texts.txt --output emb.npy                      # one text per line
    l2v encode --input items.jsonl --output emb.jsonl                  # {"text", "instruction"?}
    l2v encode --model QWEN3_FOLDER --prompt-name query "a query"      # a named prompt
    l2v encode ... --truncate-dim 256                                  # Matryoshka

Inputs and the output path are checked before the (slow) model load. Imported while the `l2v`
parser is built: argparse only at import time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import stat
import sys
import tempfile
import time
from pathlib import Path

from l2v_models.errors import UsageError
from l2v_models.model_options import (
    add_model_options,
    check_model_available,
    check_truncate_dim_option,
    load_embedder,
    prompt_kwargs,
)

SIMILARITY_TABLE_MAX = 8  # up to this many texts on the command line: print their similarities
_OUTPUT_SUFFIXES = (".npy", ".jsonl")


# ------------------------------------------------------------------------------ inputs
def read_text_file(path: Path, skip_blank: bool = False) -> list[str]:
    """One text per line, so text i is line i + 1: a blank (or whitespace-only) line is an empty
    text "", unless skip_blank drops it."""
    texts = []
    for _, line in _input_lines(path):
        if not line.strip():
            if skip_blank:
                continue
            line = ""
        texts.append(line)
    return texts


def read_jsonl(path: Path) -> list:
    """One JSON object per line with "text" and optional "instruction" (a bare JSON string is a
    text); blank lines are skipped. Returns strings and [instruction, text] pairs."""
    items = []
    for lineno, line in _input_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        if isinstance(obj, str):
            items.append(obj)
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise UsageError(
                f'{where}: expected an object with a string "text" field, got {line.strip()[:60]}'
            )
        instruction = obj.get("instruction")
        if instruction is not None and not isinstance(instruction, str):
            raise UsageError(f'{where}: "instruction" must be a string')
        items.append([instruction, obj["text"]] if instruction else obj["text"])
    return items


def _input_lines(path: Path):
    """(line number, line without its line break) of a UTF-8 file, or of stdin for "-" (a
    leading byte-order mark is dropped); UsageError naming the file and line where the bytes are
    not UTF-8."""
    name = "<stdin>" if str(path) == "-" else str(path)
    with _open_input(path) as f:
        for lineno, raw in enumerate(f, 1):
            if isinstance(raw, bytes):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise UsageError(
                        f"{name}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                        f"{e.start + 1}); convert the file to UTF-8 (e.g. iconv -f latin1 -t "
                        "utf-8 FILE > FILE.utf8)"
                    ) from None
            else:
                line = raw
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            yield lineno, line.rstrip("\r\n")


def _open_input(path: Path):
    """The input as a binary stream (stdin for "-", not closed afterwards)."""
    if str(path) == "-":
        return _NoClose(getattr(sys.stdin, "buffer", sys.stdin))
    if not path.exists():
        raise UsageError(f"input file not found: {path}")
    if path.is_dir():
        raise UsageError(f"input {path} is a directory, expected a file")
    return open(path, "rb")


class _NoClose:
    def __init__(self, stream):
        self.stream = stream

    def __enter__(self):
        return self.stream

    def __exit__(self, *exc):
        return False


def gather_texts(args) -> list:
    items: list = list(args.texts)
    if args.input is not None:
        path = Path(args.input)
        is_jsonl = path.suffix.lower() in (".jsonl", ".ndjson") or args.jsonl
        items += read_jsonl(path) if is_jsonl else read_text_file(path, args.skip_blank)
    if not items:
        raise UsageError("no texts: pass them as arguments or with --input FILE")
    if args.prompt:  # --prompt / --instruction: shown with its text in outputs
        items = [[args.prompt, t] if isinstance(t, str) else t for t in items]
    return items


# ------------------------------------------------------------------------------ outputs
def check_output_path(output: str | None) -> Path | None:
    """The --output path, checked before any model work (UsageError otherwise): a .npy or
    .jsonl name, not a directory, in an existing folder where a file can be created, and, if
    the file exists, writable. Checked by creating (and removing) a temporary file in the
    folder, so permissions, ACLs and read-only file systems all count; nothing is left."""
    if output is None:
        return None
    path = Path(output)
    if path.suffix.lower() not in _OUTPUT_SUFFIXES:
        raise UsageError(f"--output must end in .npy or .jsonl, got {output!r}")
    if path.is_dir():
        raise UsageError(f"--output {path} is a directory; pass a file name (.npy or .jsonl)")
    if not path.parent.exists():
        raise UsageError(f"output directory {path.parent} does not exist")
    if not path.parent.is_dir():
        raise UsageError(f"output directory {path.parent} is not a directory")
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"cannot write --output {path}: the file exists and is read-only")
    try:
        fd, probe = _temp_beside(path.resolve() if path.is_symlink() else path)
    except OSError as e:
        raise UsageError(f"cannot write --output {path}: cannot create a file in "
                         f"{path.parent} ({e.strerror or e})") from None  # fmt: skip
    os.close(fd)
    os.unlink(probe)
    return path


def _temp_beside(path: Path) -> tuple[int, str]:
    """A new hidden file next to `path` (same folder, so a rename onto `path` is atomic):
    (open file descriptor, its name)."""
    return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")


def write_output(path: Path, embeddings, items: list) -> None:
    """Write the embeddings (.npy: float32 [N, D]; .jsonl: one {"text", "instruction"?,
    "embedding"} per item) atomically: into a temporary file in the same folder, renamed onto
    `path` when complete, so a failure leaves the old file (or none), never a half-written one.
    An existing file keeps its permission bits; a new one gets the usual umask-based ones."""
    import numpy as np

    target = path.resolve() if path.is_symlink() else path  # replace the link's target
    fd, tmp = _temp_beside(target)
    try:
        with os.fdopen(fd, "wb") as f:
            if path.suffix.lower() == ".npy":
                np.save(f, np.asarray(embeddings, dtype=np.float32))
            else:
                for item, row in zip(items, embeddings, strict=True):
                    record = {"text": item} if isinstance(item, str) else {
                        "instruction": item[0], "text": item[1]}  # fmt: skip
                    record["embedding"] = [float(x) for x in row]
                    f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        # mkstemp makes the file 0600: give it the mode the output would have had.
        if target.exists():
            mode = stat.S_IMODE(target.stat().st_mode)
        else:
            umask = os.umask(0)  # reading the umask means setting it
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def similarity_table(items: list, embeddings) -> str:
    """Numbered texts, then their cosine-similarity matrix."""
    import torch

    e = torch.nn.functional.normalize(torch.as_tensor(embeddings, dtype=torch.float64), dim=-1)
    sim = (e @ e.T).tolist()
    n = len(items)
    lines = []
    for i, item in enumerate(items, 1):
        text = item if isinstance(item, str) else f"[{item[0]}] {item[1]}"
        text = text.replace("\n", " ")
        lines.append(f"[{i}] {text if len(text) <= 70 else text[:67] + '...'}")
    lines.append("")
    lines.append("cosine similarity")
    lines.append("     " + "".join(f"{f'[{j}]':>8}" for j in range(1, n + 1)))
    for i in range(n):
        lines.append(f"{f'[{i + 1}]':<5}" + "".join(f"{sim[i][j]:>8.3f}" for j in range(n)))
    return "\n".join(lines)


# ------------------------------------------------------------------------------ the command
def cmd_encode(args) -> int:
    output = check_output_path(args.output)
    items = gather_texts(args)  # inputs are checked before the (slow) model load
    prompts = prompt_kwargs(args)
    if args.prompt:
        prompts["prompt"] = None  # gather_texts gave it to the texts
    truncate_dim = check_truncate_dim_option(args)
    check_model_available(args.model)
    from l2v_models.checkpoint import model_label

    t0 = time.perf_counter()
    embedder = load_embedder(args)
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    emb = embedder.encode(
        items,
        show_progress_bar=not args.quiet,
        normalize_embeddings=args.normalize,
        truncate_dim=truncate_dim,
        **prompts,
    )
    encode_s = time.perf_counter() - t1
    if output is not None:
        write_output(output, emb.numpy(), items)
    if output is None and args.input is None and len(items) <= SIMILARITY_TABLE_MAX:
        print(similarity_table(items, emb))
        return 0
    n, d = emb.shape
    where = f"-> {output}" if output is not None else "(not saved: pass --output FILE.npy)"
    model = model_label(args.model, args.peft)
    cut = len(embedder.last_truncations)
    cut_note = f"; {cut} text{'' if cut == 1 else 's'} truncated" if cut else ""
    print(
        f"encoded {n} text{'' if n == 1 else 's'} into [{n}, {d}] float32 {where}; model {model} "
        f"on {embedder.device} ({embedder.dtype}), load {load_s:.1f}s, encode {encode_s:.2f}s "
        f"({n / max(encode_s, 1e-9):.1f} texts/s){cut_note}"
    )
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `encode` subcommand to l2v's subparsers."""
    enc = subparsers.add_parser(
        "encode",
        help="embed texts",
        description="Embed texts with a model (default: smollm2-llm2vec, SmolLM2-135M-Instruct "
        "with l2v's LLM2Vec adapters). With up to 8 texts as arguments and no --output, prints "
        "their cosine-similarity matrix.",
    )
    enc.add_argument("texts", nargs="*", help="texts to embed")
    enc.add_argument("--input", "-i", metavar="FILE",
                     help="a UTF-8 text file, one text per line: one output row per line, a "
                     "blank line being an empty text (with a warning; see --skip-blank); or "
                     ".jsonl ({\"text\", \"instruction\"} per line; blank lines skipped); - "
                     "reads stdin")  # fmt: skip
    enc.add_argument("--skip-blank", action="store_true",
                     help="drop blank lines of a text --input (rows then no longer match line "
                     "numbers)")  # fmt: skip
    enc.add_argument("--jsonl", action="store_true", help="read --input as JSONL whatever its name")
    enc.add_argument("--output", "-o", metavar="FILE", help="write embeddings to .npy or .jsonl")
    add_model_options(enc)
    enc.add_argument("--normalize", action="store_true", help="L2-normalize the embeddings")
    enc.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    enc.set_defaults(func=cmd_encode)
    return enc
