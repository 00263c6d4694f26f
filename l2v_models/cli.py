"""The `l2v` command line.

    l2v encode "A cat sits on the mat." "A kitten rests on a rug."   # cosine-similarity table
    l2v encode --input texts.txt --output emb.npy                      # one text per line
    l2v encode --input items.jsonl --output emb.jsonl                  # {"text", "instruction"?}
    l2v info                                                           # versions, device, kernels

Errors a user can fix (missing file, bad JSONL line, unknown or damaged model, bad option
value) end with one line `l2v: error: ...` and exit code 2; any other error (a bug) also prints
one line, with exit code 1. `l2v --debug ...` (or L2V_DEBUG=1) shows the traceback instead.
Library warnings (e.g. empty texts) are printed as `l2v: warning: ...`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import re
import stat
import sys
import tempfile
import time
from pathlib import Path

# Subcommands that live next to their feature. Each module has `add_parser(subparsers)`, which
# adds its parser with set_defaults(func=...); it is imported while the parser is built, so it
# must import lightly (argparse only, heavy imports inside func).
FEATURE_COMMANDS: tuple[str, ...] = (
    "l2v_models.serve.cli",  # l2v serve
    "l2v_models.corpus.cli",  # l2v encode-corpus
    "l2v_models.train.cli",  # l2v train
    "l2v_models.eval.cli",  # l2v eval
)
SIMILARITY_TABLE_MAX = 8  # up to this many texts on the command line: print their similarities
_OUTPUT_SUFFIXES = (".npy", ".jsonl")


class UsageError(Exception):
    """A problem with the user's input: reported in one line, exit code 2."""


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
    if args.instruction:
        items = [[args.instruction, t] if isinstance(t, str) else t for t in items]
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


# ------------------------------------------------------------------------------ commands
def _check_gguf_support(model: str | None) -> None:
    """Refuse a GGUF model (the packaged ones are) before the slow load when the installed
    transformers cannot read its tokenizer (load_model checks again)."""
    from l2v_models.checkpoint import (
        DEFAULT_MODEL,
        PACKAGED_ENCODERS,
        PACKAGED_MODELS,
        gguf_support_error,
    )

    name = DEFAULT_MODEL if model is None else model
    packaged = name.lower() in PACKAGED_MODELS or name.lower() in PACKAGED_ENCODERS
    if not packaged and not name.endswith(".gguf"):
        return
    what = f"the model {name}" + (" (the default)" if model is None else "")
    problem = gguf_support_error(what)
    if problem is not None:
        raise UsageError(f"{problem} (--model DIR)")


# ------------------------------------------------------------------------------ model options
def add_model_options(
    parser, *, device_help: str | None = None, model_note: str = "", batching: bool = True
) -> None:
    """The model options every command shares (`l2v encode`, serve, encode-corpus, eval):
    --model, --peft, --pooling, --dtype, --device, --backend, --attention, and with batching
    --max-length and --batch-tokens (the server names those as limits of its own).
    `encoder_kwargs(args)` turns them into LLM2Vec.from_pretrained keywords."""
    parser.add_argument("--model", "-m", default=None,
                        help="base model: HF dir or hub id, LLM2Vec -mntp dir, .gguf file, or a "
                        "packaged model (smollm2-llm2vec: the trained default; smollm2: "
                        "untrained, also the base of a lone --peft; gemma3-270m)"
                        + model_note)  # fmt: skip
    parser.add_argument("--peft", default=None,
                        help="LoRA adapter dir or hub id (e.g. -supervised)")  # fmt: skip
    parser.add_argument("--pooling", default=None, choices=POOLING_CHOICES,
                        help="pooling mode (default: llm2vec_config.json, else mean)")  # fmt: skip
    parser.add_argument("--dtype", default=None,
                        help="float32, bfloat16, float16 or auto (default: bf16 on CUDA, fp32 "
                        "on CPU)")  # fmt: skip
    parser.add_argument("--device", default=None,
                        help=device_help or "cpu, cuda or cuda:N (default: cuda if any)")
    parser.add_argument("--backend", default="auto", choices=("auto", "triton", "torch"),
                        help="kernels: triton (CUDA) or torch (default: auto)")  # fmt: skip
    parser.add_argument("--attention", default=None,
                        choices=("llm2vec", "bidirectional", "causal"),
                        help="llm2vec (default: as llm2vec runs the family: bidirectional, Qwen2 "
                        "causal), bidirectional or causal")  # fmt: skip
    if batching:
        parser.add_argument("--max-length", type=int, default=None,
                            help="token limit per text")  # fmt: skip
        parser.add_argument("--batch-tokens", type=int, default=None, metavar="N",
                            help="real tokens per forward pass (default: 16384 on CUDA, 4096 "
                            "on CPU)")  # fmt: skip


POOLING_CHOICES = ("mean", "weighted_mean", "eos_token", "last_token", "bos_token")


def encoder_kwargs(args) -> dict:
    """LLM2Vec.from_pretrained keywords (besides model and peft) from add_model_options' options;
    the ones not given are left out (the encoder's defaults apply)."""
    kwargs = dict(
        pooling_mode=args.pooling,
        max_length=getattr(args, "max_length", None),
        torch_dtype=args.dtype,
        device_map=args.device,
        backend=args.backend,
        attention=args.attention,
        max_tokens_per_batch=getattr(args, "batch_tokens", None),
    )
    return {k: v for k, v in kwargs.items() if v is not None}


def cmd_encode(args) -> int:
    output = check_output_path(args.output)
    items = gather_texts(args)  # inputs are checked before the (slow) model load
    _check_gguf_support(args.model)
    from l2v_models.checkpoint import model_label
    from l2v_models.encoder import LLM2Vec

    t0 = time.perf_counter()
    encoder = LLM2Vec.from_pretrained(
        args.model, peft_model_name_or_path=args.peft, **encoder_kwargs(args)
    )
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    emb = encoder.encode(
        items,
        show_progress_bar=not args.quiet,
        normalize_embeddings=args.normalize,
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
    print(
        f"encoded {n} text{'' if n == 1 else 's'} into [{n}, {d}] float32 {where}; model {model} "
        f"on {encoder.device} ({encoder.dtype}), load {load_s:.1f}s, encode {encode_s:.2f}s "
        f"({n / max(encode_s, 1e-9):.1f} texts/s)"
    )
    return 0


def cmd_info(args) -> int:
    import platform

    import numpy
    import torch
    import transformers

    def version(package: str) -> str:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as dist_version

        try:
            return dist_version(package)
        except PackageNotFoundError:
            return "not installed"

    rows = [
        ("l2v", _l2v_version()),
        ("python", platform.python_version()),
        ("torch", f"{torch.__version__} (CUDA build: {torch.version.cuda or 'no'})"),
        ("transformers", transformers.__version__),
        ("numpy", numpy.__version__),
        ("tokenizers", version("tokenizers")),
        ("triton", version("triton")),
        ("gguf", version("gguf")),
        ("peft", version("peft")),
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            rows.append(
                (f"cuda:{i}", f"{p.name}, sm{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB")
            )
    else:
        rows.append(("device", "cpu (no CUDA device visible)"))
    try:
        from l2v_kernels.gemm import extension_available

        ext = "loaded" if extension_available() else "not built / not loadable (cuBLAS fallback)"
    except Exception as e:
        ext = f"unavailable ({type(e).__name__}: {e})"
    rows.append(("C++/CUDA extension", ext))
    try:
        from l2v_models.model import resolve_backend

        device = "cuda" if torch.cuda.is_available() else "cpu"
        rows.append(("backend (auto)", f"{resolve_backend('auto', device)} on {device}"))
    except Exception as e:
        rows.append(("backend (auto)", f"unknown ({type(e).__name__}: {e})"))
    try:
        from l2v_models.checkpoint import DEFAULT_MODEL, default_encoder_dirs, default_model_path

        mntp, second = default_encoder_dirs()
        rows.append(("default model", f"{DEFAULT_MODEL}: {default_model_path()} + {mntp.name} + "
                     f"{second.name} adapters ({mntp.parent})"))  # fmt: skip
    except Exception as e:
        rows.append(("default model", f"missing ({e})"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def _l2v_version() -> str:
    try:
        from importlib.metadata import version

        return version("l2v")
    except Exception:
        return "unknown (not installed)"


# ------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="l2v", description="The fastest exact LLM2Vec text encoder."
    )
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    enc = sub.add_parser(
        "encode",
        help="embed texts",
        description="Embed texts with an LLM2Vec model (default: the embedded SmolLM2-135M-"
        "Instruct, run bidirectionally). With up to 8 texts as arguments and no --output, "
        "prints their cosine-similarity matrix.",
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
    enc.add_argument("--instruction", default=None,
                     help="instruction for every text that has none of its own")  # fmt: skip
    add_model_options(enc)
    enc.add_argument("--normalize", action="store_true", help="L2-normalize the embeddings")
    enc.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    enc.set_defaults(func=cmd_encode)

    info = sub.add_parser("info", help="versions, device, kernels")
    info.set_defaults(func=cmd_info)
    for module in FEATURE_COMMANDS:
        importlib.import_module(module).add_parser(sub)
    for command in sub.choices.values():  # `l2v encode --debug` works as `l2v --debug ...`
        if "--debug" not in command._option_string_actions:
            command.add_argument(
                "--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP
            )
    return parser


_DEBUG_HELP = "on an error, show the Python traceback (also: L2V_DEBUG=1)"
# Errors with a message written for the user: one line, exit code 2.
_EXPECTED_ERRORS = (UsageError, OSError, ValueError, TypeError, ImportError, RuntimeError,
                    MemoryError)  # fmt: skip
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def _one_line(e: BaseException) -> str:
    text = _ANSI.sub("", str(e)).strip()
    return text.splitlines()[0] if text else type(e).__name__


class _WarningsToStderr:
    """While active: the package's log records of level WARNING and above are printed to stderr
    as `l2v: warning: ...` (Python logging; nothing else is configured)."""

    def __enter__(self):
        self.logger = logging.getLogger("l2v_models")
        self.handler = logging.StreamHandler(sys.stderr)
        self.handler.setLevel(logging.WARNING)
        self.handler.setFormatter(logging.Formatter("l2v: %(levelname_lower)s: %(message)s"))
        self.handler.addFilter(_lower_level)
        self.logger.addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)
        return False


def _lower_level(record: logging.LogRecord) -> bool:
    record.levelname_lower = record.levelname.lower()
    return True


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0, 2 for a user error, 1 for a bug, 130 on
    Ctrl-C). Errors print one `l2v: error: ...` line; --debug / L2V_DEBUG=1 re-raise them."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("L2V_DEBUG", "") not in ("", "0")
    if argv[:1] == ["--debug"]:
        debug, argv = True, argv[1:]
    try:
        with _WarningsToStderr():
            args = build_parser().parse_args(argv)
            debug = debug or getattr(args, "debug", False)
            return args.func(args)
    except KeyboardInterrupt:
        print("l2v: interrupted", file=sys.stderr)
        return 130
    except _EXPECTED_ERRORS as e:
        if debug:
            raise
        message = _one_line(e)
        if not isinstance(e, (UsageError, OSError, ValueError)):
            message = f"{type(e).__name__}: {message}"
        print(f"l2v: error: {message}", file=sys.stderr)
        return 2
    except Exception as e:
        if debug:
            raise
        print(
            f"l2v: error: internal error ({type(e).__name__}: {_one_line(e)}); please report it "
            "with the traceback that `l2v --debug ...` prints",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
