"""The model options every `l2v` command shares, defined once.

    add_model_options(parser)                 # --model --peft --dtype --device --backend ...
    kwargs = model_kwargs(args)               # -> Embedder.from_pretrained keywords
    check_model_available(args.model)         # a fast refusal before the slow load
    embedder = load_embedder(args)            # the model, as every command loads it
    prompt = prompt_kwargs(args)              # {"prompt_name": ..., "prompt": ...}

Options: --model, --peft, --pooling (llm2vec models), --dtype, --device, --backend, --attention,
and, where the command embeds text, --max-length and --batch-tokens (batching), --prompt-name /
--prompt (prompts) and --truncate-dim (Matryoshka). The server names the batching options as
limits of its own, so each group is optional.
"""

from __future__ import annotations

from l2v_models.errors import UsageError

POOLING_CHOICES = ("mean", "weighted_mean", "eos_token", "last_token", "bos_token")
ATTENTION_CHOICES = ("llm2vec", "config", "bidirectional", "causal")
MODEL_HELP = (
    "the model: a sentence-transformers folder (modules.json), an HF model dir or hub id, an "
    "LLM2Vec -mntp dir, a .gguf file, or a packaged model (smollm2-llm2vec: the trained "
    "default; smollm2: untrained, also the base of a lone --peft; gemma3-270m)"
)


def add_model_options(
    parser,
    *,
    device_help: str | None = None,
    model_note: str = "",
    batching: bool = True,
    prompts: bool = True,
    truncate_dim: bool = True,
) -> None:
    """Add the shared model options to an argparse parser (or argument group)."""
    parser.add_argument("--model", "-m", default=None, help=MODEL_HELP + model_note)
    parser.add_argument("--peft", default=None,
                        help="LoRA adapter dir or hub id merged on top (e.g. -supervised)")
    parser.add_argument("--pooling", default=None, choices=POOLING_CHOICES,
                        help="llm2vec models' pooling mode (default: llm2vec_config.json, else "
                        "mean); a sentence-transformers model pools as its Pooling module says")
    parser.add_argument("--dtype", default=None,
                        help="float32, bfloat16, float16 or auto (default: bf16 on CUDA, fp32 "
                        "on CPU)")  # fmt: skip
    parser.add_argument("--device", default=None,
                        help=device_help or "cpu, cuda or cuda:N (default: cuda if any)")
    parser.add_argument("--backend", default="auto", choices=("auto", "triton", "torch"),
                        help="kernels: triton (CUDA) or torch (default: auto)")  # fmt: skip
    parser.add_argument("--attention", default=None, choices=ATTENTION_CHOICES,
                        help="default: the model's own (a sentence-transformers folder: as its "
                        "config.json says, is_causal / use_bidirectional_attention; an LLM2Vec "
                        "model: as llm2vec runs the family, bidirectional, Qwen2 causal); or "
                        "force bidirectional / causal")  # fmt: skip
    if batching:
        parser.add_argument("--max-length", type=int, default=None,
                            help="token limit per text (default: the model's)")  # fmt: skip
        parser.add_argument("--batch-tokens", type=int, default=None, metavar="N",
                            help="real tokens per forward pass (default: 16384 on CUDA, 4096 "
                            "on CPU)")  # fmt: skip
    if prompts:
        parser.add_argument("--prompt-name", default=None, metavar="NAME",
                            help="one of the model's named prompts (sentence-transformers' "
                            "config_sentence_transformers.json), for every text without one")
        parser.add_argument("--prompt", "--instruction", dest="prompt", default=None,
                            metavar="TEXT",
                            help="a prompt (an LLM2Vec model's instruction) for every text "
                            "without one of its own")  # fmt: skip
    if truncate_dim:
        parser.add_argument("--truncate-dim", type=int, default=None, metavar="D",
                            help="keep the first D features of each embedding (Matryoshka; "
                            "renormalized when the output is normalized)")  # fmt: skip


def model_kwargs(args) -> dict:
    """Embedder.from_pretrained keywords (besides model and peft) from the options; those not
    given are left out (the model's defaults apply). LLM2Vec.from_pretrained takes them too."""
    kwargs = dict(
        pooling_mode=getattr(args, "pooling", None),
        max_length=getattr(args, "max_length", None),
        dtype=getattr(args, "dtype", None),
        device=getattr(args, "device", None),
        backend=getattr(args, "backend", None),
        attention=getattr(args, "attention", None),
        max_tokens_per_batch=getattr(args, "batch_tokens", None),
    )
    return {k: v for k, v in kwargs.items() if v is not None}


def prompt_kwargs(args) -> dict:
    """{"prompt_name": ..., "prompt": ...} from the options (None when not given); UsageError
    when both are given."""
    name, prompt = getattr(args, "prompt_name", None), getattr(args, "prompt", None)
    if name is not None and prompt is not None:
        raise UsageError("pass --prompt-name or --prompt (--instruction), not both")
    return {"prompt_name": name, "prompt": prompt}  # "" is a prompt: none, not the default


def check_truncate_dim_option(args) -> int | None:
    """--truncate-dim as given, checked to be positive (the model's width is checked at load)."""
    value = getattr(args, "truncate_dim", None)
    if value is not None and value < 1:
        raise UsageError(f"--truncate-dim must be a positive integer, got {value}")
    return value


def check_model_available(model: str | None) -> None:
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


def load_embedder(args, **extra):
    """The model the options name, as an l2v_models.embedder.Embedder (extra: more
    from_pretrained keywords, e.g. cuda_graphs)."""
    from l2v_models.embedder import Embedder

    check_model_available(args.model)
    return Embedder.from_pretrained(args.model, args.peft, **model_kwargs(args), **extra)
