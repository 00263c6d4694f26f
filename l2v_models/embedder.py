"""The embedder: a loaded model, its text rules and its head, over the engine.

    from l2v_models import Embedder
    emb = Embedder.from_pretrained("path/to/Qwen3-Embedding-0.6B")    # any model l2v runs
    q = emb.encode_query(["how much protein should a female eat"])     # the model's query prompt
    d = emb.encode_document(["As a general guideline, ..."], truncate_dim=256)
    rows = emb.encode(["a text", ["an instruction", "a text"]], prompt_name="query")

What a model is decides its text rules (l2v_models.text_rules.rules_for): a folder with a
sentence-transformers modules.json follows sentence-transformers' rules (prompts, Pooling, Dense,
Normalize; attention from its config.json); anything else follows llm2vec's (instructions,
chat templates, llm2vec_config.json; attention as llm2vec runs the family). The drop-in
`LLM2Vec` (l2v_models.encoder) is an Embedder with llm2vec's API; the CLI, the server, the
corpus runner and the evaluator load an Embedder (l2v_models.model_options) and ask it, never
which rule it follows.

Inputs are strings or [prompt, text] pairs (a pair's prompt is an llm2vec model's instruction);
`prompt` / `prompt_name` give a prompt to every input without one (the model's named prompts;
for sentence-transformers models, its default prompt applies when neither is given). Outputs are
float32 rows on the CPU in input order; `truncate_dim` keeps the first features (Matryoshka) and
`normalize_embeddings` L2-normalizes after truncation (a model with a Normalize module is
renormalized after truncation: its rows are meant to be unit vectors). Texts a rule cut
(llm2vec's doc_max_length, the token limit) are counted in one warning per call, and
`last_truncations` lists them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from l2v_models import text_inputs
from l2v_models import text_rules as tr
from l2v_models.engine import Engine, check_int
from l2v_models.head import Head, check_truncate_dim
from l2v_models.packing import TokenizedTexts

logger = logging.getLogger(__name__)


class Embedder:
    """A text embedder: model (an l2v Transformer) + text rules + head, run by an Engine.

    Build with `from_pretrained`. Attributes: rules (l2v_models.text_rules.TextRules), engine,
    model, tokenizer, config (the transformers config), device, dtype, hidden_size (the model's
    width), dimension (features per output row, after the head), prompts, attention (the mode
    the model was loaded with), last_truncations (the texts the last encode cut).
    """

    def __init__(
        self,
        model,
        rules: tr.TextRules,
        *,
        head: Head | None = None,
        hf_config=None,
        max_tokens_per_batch: int | None = None,
        cuda_graphs: bool = False,
        attention: str | None = None,
    ):
        if not (hasattr(model, "pool") and hasattr(model, "config") and callable(model)):
            raise TypeError(
                f"an embedder wraps an l2v_models.model.Transformer, got {type(model).__name__}; "
                "load models with from_pretrained(...)"
            )
        self.rules = rules
        self.engine = Engine(
            model, max_tokens_per_batch=max_tokens_per_batch, cuda_graphs=cuda_graphs, head=head
        )
        self.config = hf_config if hf_config is not None else model.config
        self.attention = attention
        self.last_truncations: list[tr.Truncation] = []
        self._load_args: dict | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        model=None,
        peft=None,
        *,
        dtype=None,
        device=None,
        backend: str = "auto",
        attention: str | None = None,
        base_weights_path=None,
        max_tokens_per_batch: int | None = None,
        cuda_graphs: bool = False,
        pooling_mode: str | None = None,
        max_length: int | None = None,
        doc_max_length: int | None = None,
        skip_instruction: bool | None = None,
    ) -> Embedder:
        """Load a model l2v runs.

        model: a sentence-transformers folder (modules.json), a Hugging Face model dir or hub id,
        an LLM2Vec `-mntp` dir or id, a .gguf file, a packaged model ("smollm2", "gemma3-270m")
        or encoder ("smollm2-llm2vec"), or None: the default encoder (the untrained "smollm2"
        under a lone adapter). peft: a LoRA adapter merged on top (an LLM2Vec model's second
        adapter). dtype: "float32", "bfloat16", "float16", "auto" or a torch dtype (default
        bf16 on CUDA, fp32 on CPU). device: "cpu", "cuda", "cuda:N" (default CUDA when there is
        one). backend: "auto", "triton" or "torch". attention: None (the model's own: as its
        config says for a sentence-transformers folder, as llm2vec runs the family otherwise),
        "bidirectional", "causal", "config" or "llm2vec". max_length: tokens per text.
        pooling_mode, doc_max_length, skip_instruction: llm2vec's settings (llm2vec models only).
        max_tokens_per_batch: real tokens per forward pass. cuda_graphs: replay small passes
        from CUDA graphs (CUDA + triton backend).
        """
        from l2v_models import checkpoint

        if attention is not None and attention not in checkpoint.ATTENTION_MODES:
            raise ValueError(
                f"attention must be one of {checkpoint.ATTENTION_MODES}, got {attention!r}"
            )
        settings = {k: v for k, v in dict(pooling_mode=pooling_mode, max_length=max_length,
                                          doc_max_length=doc_max_length,
                                          skip_instruction=skip_instruction).items()
                    if v is not None}  # fmt: skip
        tr.check_llm2vec_settings(**settings)
        check_int("max_tokens_per_batch", max_tokens_per_batch)
        resolved_device = checkpoint.resolve_device(device)
        checkpoint.resolve_dtype(dtype, resolved_device)
        if cuda_graphs is True and (resolved_device.type != "cuda" or backend == "torch"):
            raise ValueError(
                f"cuda_graphs=True needs the model on a CUDA device with the triton backend, but "
                f"it would run on {resolved_device} with backend={backend!r}; pass "
                "cuda_graphs=False (the default)"
            )  # refused before the (slow) load; the engine checks the loaded model too
        load_args = dict(
            base_model_name_or_path=model, peft_model_name_or_path=peft, dtype=dtype,
            backend=backend, base_weights_path=base_weights_path, attention=attention,
        )  # fmt: skip
        loaded = checkpoint.load_model(device=resolved_device, **load_args)
        rules = tr.rules_for(loaded, **settings)
        head = None
        if loaded.st_folder is not None:
            head = Head.from_st_folder(loaded.st_folder, loaded.config.hidden_size,
                                       loaded.model.device)  # fmt: skip
        obj = cls._build(
            loaded.model, rules, head=head, hf_config=loaded.hf_config,
            max_tokens_per_batch=max_tokens_per_batch, cuda_graphs=cuda_graphs,
            attention=loaded.attention,
        )  # fmt: skip
        obj._load_args = load_args
        return obj

    @classmethod
    def _build(cls, model, rules, **kwargs) -> Embedder:
        """An instance of cls made by Embedder's constructor (subclasses have their own)."""
        obj = cls.__new__(cls)
        Embedder.__init__(obj, model, rules, **kwargs)
        return obj

    def __copy__(self) -> Embedder:
        """A view on the same engine (model, head) with its own text rules: settings changed on
        the copy (max_length, pooling_mode...) leave the original as it was."""
        import copy

        obj = self.__class__.__new__(self.__class__)
        obj.__dict__.update(self.__dict__)
        obj.rules = copy.copy(self.rules)
        return obj

    # ------------------------------------------------------------------ properties
    @property
    def model(self):
        """The l2v Transformer (the engine's)."""
        return self.engine.model

    @model.setter
    def model(self, model) -> None:
        self.engine.model = model

    @property
    def tokenizer(self):
        return self.rules.tokenizer

    @property
    def prompts(self) -> dict[str, str]:
        return self.rules.prompts

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def dtype(self) -> torch.dtype:
        return self.engine.dtype

    @property
    def hidden_size(self) -> int:
        return self.engine.hidden_size

    @property
    def dimension(self) -> int:
        """Features per output row (after Dense layers; before any truncate_dim)."""
        return self.engine.dimension

    @property
    def max_tokens_per_batch(self) -> int | None:
        return self.engine.max_tokens_per_batch

    @max_tokens_per_batch.setter
    def max_tokens_per_batch(self, value) -> None:
        self.engine.max_tokens_per_batch = check_int("max_tokens_per_batch", value)

    @property
    def cuda_graphs(self) -> bool:
        return self.engine.cuda_graphs

    @property
    def normalizes(self) -> bool:
        """Whether the model's own modules end in a Normalize (its rows are unit vectors)."""
        return self.engine.head.normalize

    def graph_runner(self):
        """The engine's l2v_models.cuda_graphs.BucketedGraphRunner (see Engine.graph_runner)."""
        return self.engine.graph_runner()

    def describe(self) -> dict[str, str]:
        """What the model runs with: text rules, pooling, prompts, modules, attention, sizes."""
        c = self.model.config
        out = {"architecture": f"{c.arch}, {c.num_layers} layers, hidden {c.hidden_size}",
               "attention": ("causal" if c.causal else "bidirectional")
               + (f" ({self.attention})" if self.attention else "")}  # fmt: skip
        out.update(self.rules.describe())
        out["dimension"] = str(self.dimension) + (
            " (normalized)" if self.normalizes else ""
        )
        out["device"] = f"{self.device} ({str(self.dtype).removeprefix('torch.')})"
        return out

    # ------------------------------------------------------------------ text -> rows
    def prepare(
        self, sentences, *, prompt_name: str | None = None, prompt: str | None = None,
        max_length: int | None = None, where: str = "sentences",
    ) -> tr.Prepared:  # fmt: skip
        """encode()'s input -> texts ready for the engine (and what was cut), by the model's
        text rules; what the server and the corpus runner call off the model's thread. Empty
        texts are logged (one warning)."""
        pairs, _ = text_inputs.as_pairs(sentences)
        return self.prepare_pairs(pairs, prompt_name=prompt_name, prompt=prompt,
                                  max_length=max_length, where=where)  # fmt: skip

    def prepare_pairs(
        self, pairs: Sequence[tuple[str, str]], *, prompt_name: str | None = None,
        prompt: str | None = None, max_length: int | None = None, where: str = "sentences",
    ) -> tr.Prepared:  # fmt: skip
        """`prepare` for (prompt, text) pairs already checked by text_inputs.as_pairs."""
        resolved = self.rules.resolve_prompt(prompt_name, prompt)
        pairs = text_inputs.with_prompt(pairs, resolved)
        text_inputs.warn_empty_texts(text_inputs.empty_text_indices(pairs), where)
        return self.rules.prepare(pairs, max_length=max_length)

    def prepare_texts(self, sentences, **kwargs) -> TokenizedTexts:
        """`prepare(...).texts`: the engine's TokenizedTexts only."""
        return self.prepare(sentences, **kwargs).texts

    def embed(
        self,
        texts: TokenizedTexts,
        *,
        normalize: bool = False,
        truncate_dim: int | None = None,
        batch_size: int | None = None,
        max_tokens_per_batch: int | None = None,
        show_progress_bar: bool = False,
    ) -> torch.Tensor:
        """Prepared texts -> float32 CPU rows [N, D] in their order (see the module docstring
        for truncate_dim and normalization)."""
        truncate_dim = check_truncate_dim(truncate_dim, self.dimension)
        renormalize = truncate_dim is not None and self.normalizes
        return self.engine.embed(
            texts, mode=self.rules.pool_mode, normalize=normalize or renormalize,
            truncate_dim=truncate_dim, max_tokens=max_tokens_per_batch, max_texts=batch_size,
            progress=show_progress_bar,
        )  # fmt: skip

    def encode(
        self,
        sentences,
        prompt_name: str | None = None,
        prompt: str | None = None,
        batch_size: int | None = None,
        show_progress_bar: bool = True,
        convert_to_numpy: bool = False,
        convert_to_tensor: bool = False,
        device=None,
        *,
        normalize_embeddings: bool = False,
        truncate_dim: int | None = None,
        max_tokens_per_batch: int | None = None,
    ):
        """Embed texts -> float32 CPU tensor [N, D] in input order (numpy with convert_to_numpy).

        sentences: a string (-> one row of shape [D]), or a list of strings and [prompt, text]
        pairs. prompt_name / prompt: the prompt for inputs without one (see the module
        docstring). batch_size: at most this many texts per forward pass (default: the token
        budget decides). max_tokens_per_batch: real tokens per forward pass. device: run there
        (the model is re-loaded on that device if it lives elsewhere). normalize_embeddings:
        L2-normalize. truncate_dim: keep the first this many features.
        """
        return self._encode(
            sentences, prompt_name=prompt_name, prompt=prompt, batch_size=batch_size,
            show_progress_bar=show_progress_bar, convert_to_numpy=convert_to_numpy,
            convert_to_tensor=convert_to_tensor, device=device,
            normalize_embeddings=normalize_embeddings, truncate_dim=truncate_dim,
            max_tokens_per_batch=max_tokens_per_batch,
        )  # fmt: skip

    def encode_query(self, sentences, prompt_name: str | None = None, prompt: str | None = None,
                     **kwargs):  # fmt: skip
        """encode() with the model's "query" prompt when the caller names none."""
        if prompt_name is None and prompt is None:
            prompt_name = self.rules.side_prompt_name("query")
        return self._encode(sentences, prompt_name=prompt_name, prompt=prompt, **kwargs)

    def encode_document(self, sentences, prompt_name: str | None = None,
                        prompt: str | None = None, **kwargs):  # fmt: skip
        """encode() with the model's "document" (else "passage", "corpus") prompt when the caller
        names none."""
        if prompt_name is None and prompt is None:
            prompt_name = self.rules.side_prompt_name("document")
        return self._encode(sentences, prompt_name=prompt_name, prompt=prompt, **kwargs)

    def _encode(self, sentences, *, prompt_name=None, prompt=None, batch_size=None,
                show_progress_bar=True, convert_to_numpy=False, convert_to_tensor=False,
                device=None, normalize_embeddings=False, truncate_dim=None,
                max_tokens_per_batch=None):  # fmt: skip
        pairs, squeeze = text_inputs.as_pairs(sentences)
        self.rules.check()
        truncate_dim = check_truncate_dim(truncate_dim, self.dimension)
        if device is not None:
            self._place(device)
        prepared = self.prepare_pairs(pairs, prompt_name=prompt_name, prompt=prompt)
        self.last_truncations = prepared.truncations
        text_inputs.warn_truncations(prepared.truncations, len(pairs))
        out = self.embed(
            prepared.texts, normalize=normalize_embeddings, truncate_dim=truncate_dim,
            batch_size=batch_size, max_tokens_per_batch=max_tokens_per_batch,
            show_progress_bar=show_progress_bar,
        )  # fmt: skip
        if squeeze:
            out = out[0]
        if convert_to_numpy and not convert_to_tensor:
            return out.numpy()
        return out

    def _place(self, device) -> None:
        """Make the model live on `device`, re-loading it there when it lives elsewhere."""
        from l2v_models import checkpoint

        target = checkpoint.resolve_device(device)
        if _same_device(target, self.device):
            return
        if self._load_args is None:
            raise ValueError(
                f"the model lives on {self.device} and was not loaded by from_pretrained, so it "
                f"cannot be moved to {target}; build it on that device"
            )
        logger.info("l2v: re-loading the model on %s (it was on %s)", target, self.device)
        self.model = checkpoint.load_model(device=target, **self._load_args).model
        self.engine.head = self.engine.head.to(target)


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    current = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return (a.index if a.index is not None else current) == (
        b.index if b.index is not None else current
    )
