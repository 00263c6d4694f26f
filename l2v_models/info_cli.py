"""`l2v info`: versions, devices and kernels; with --model, what a model runs with.

    l2v info                               # versions, CUDA devices, extension, default model
    l2v info --model QWEN3_FOLDER          # attention, text rules, pooling, prompts, modules

Imported while the `l2v` parser is built: argparse only at import time.
"""

from __future__ import annotations

import argparse

from l2v_models.model_options import add_model_options, load_embedder


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `info` subcommand to l2v's subparsers."""
    p = subparsers.add_parser(
        "info", help="versions, device, kernels; --model: what a model runs with",
        description="Without --model: versions, CUDA devices, the extension and the default "
        "model. With --model (and --peft): loads the model and says which attention, text rules, "
        "pooling, prompts and modules it runs with.",
    )  # fmt: skip
    add_model_options(p, prompts=False, truncate_dim=False)
    p.set_defaults(func=cmd_info)
    return p


def cmd_model_info(args) -> int:
    """Load the model the options name and print Embedder.describe()."""
    from l2v_models.checkpoint import model_label

    embedder = load_embedder(args)
    rows = [("model", model_label(args.model, args.peft))] + list(embedder.describe().items())
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def cmd_info(args) -> int:
    if args.model is not None or args.peft is not None:
        return cmd_model_info(args)
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


