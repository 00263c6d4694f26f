"""A request body -> work for the model (or a finished answer), by the model's text rules.

    preparer = Preparer(ServedModel.of(embedder, "l2v"), max_client_batch_size=128, ...)
    work = preparer.run("openai", body_bytes)    # Work | ApiError | bytes (a finished body)

What a tokenizer process runs (l2v_models.serve.tokenizer_pool), so the JSON parsing, the
validation and the tokenization of a request never run in the model workers' interpreter:
parse the body (schemas), resolve the model name (the base or an adapter) and the prompt, run the
model's text rules (`embedder.rules`, the object `embedder.prepare` runs: the process holds
neither weights nor torch), count or refuse what a rule cut, and send back the texts compactly
(one int32 array of ids and the lengths). /tokenize and /decode are answered here
whole.

Everything in a Preparer is picklable (the text rules carry their tokenizer), so a process pool
or a Ray ingress gets a copy.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import numpy as np

from l2v_models import text_inputs
from l2v_models.packing import TokenizedTexts
from l2v_models.serve.schemas import (
    ApiError,
    EmbedRequest,
    parse_decode,
    parse_json,
    parse_openai,
    parse_similarity,
    parse_tei,
    parse_tokenize,
)
from l2v_models.text_rules import Truncation

logger = logging.getLogger("l2v.serve")

ROUTES = ("openai", "tei", "similarity", "tokenize", "decode")
INPUT_FIELD = {"openai": "input", "tei": "inputs", "similarity": "inputs", "tokenize": "inputs"}


@dataclass
class ServedModel:
    """What the HTTP side knows of the model, without weights (picklable).

    name: the served name; adapters: the adapter names requests may pick as "model"; rules: a
    copy of the embedder's text rules (l2v_models.text_rules; with its tokenizer; None when the
    model has no tokenizer); vocab_size, dimension (features per row), normalizes (its rows are unit
    vectors), max_length (its token limit per text), pool_mode; device: where it runs (text)."""

    name: str
    adapters: tuple[str, ...]
    rules: object  # the model's text rules (l2v_models.text_rules)
    vocab_size: int
    dimension: int
    normalizes: bool
    max_length: int
    pool_mode: str
    device: str = ""

    @classmethod
    def of(cls, embedder, name: str, adapters=(), device: str = "") -> ServedModel:
        rules = copy.copy(embedder.rules)  # without a tokenizer: pool spans of token ids only
        return cls(name=name, adapters=tuple(adapters), rules=rules,
                   vocab_size=embedder.engine.vocab_size, dimension=embedder.dimension,
                   normalizes=embedder.normalizes, max_length=int(embedder.rules.max_length),
                   pool_mode=embedder.rules.pool_mode,
                   device=device or str(embedder.device))  # fmt: skip

    @property
    def has_tokenizer(self) -> bool:
        return getattr(self.rules, "tokenizer", None) is not None

    @property
    def names(self) -> list[str]:
        return [self.name, *self.adapters]


@dataclass
class Work:
    """A validated, tokenized request: the texts (compact: flat int32 ids and lengths, pool
    spans), which model runs them (an adapter name, None for the base), what a rule cut."""

    route: str
    request: EmbedRequest
    model: str | None
    ids: np.ndarray
    lengths: np.ndarray
    pool_starts: np.ndarray
    pool_counts: np.ndarray
    truncations: list[Truncation] = field(default_factory=list)

    def texts(self) -> TokenizedTexts:
        return TokenizedTexts.from_flat(self.ids, self.lengths, self.pool_starts,
                                        self.pool_counts)  # fmt: skip

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())


class Preparer:
    """Runs one route's request body to Work (or a finished body, or an ApiError); see the
    module docstring. Settings as in ServeSettings."""

    def __init__(self, served: ServedModel, *, max_client_batch_size: int,
                 max_input_tokens: int | None = None, default_instruction: str | None = None,
                 accept_any_model_name: bool = False,
                 accept_token_ids: bool = False):  # fmt: skip
        self.served = served
        self.accept_token_ids = accept_token_ids
        self.max_inputs = max_client_batch_size
        self.max_input_tokens = max_input_tokens or served.max_length
        self.default_instruction = default_instruction
        self.accept_any_model_name = accept_any_model_name

    def run(self, route: str, body: bytes):
        """Work, bytes (the answer of /tokenize and /decode) or ApiError; never raises."""
        try:
            return self._run(route, body)
        except ApiError as e:
            return e
        except Exception as e:  # a bug: answered 500, logged here, never a dead process
            logger.exception("l2v serve: preparing a %s request failed", route)
            return ApiError(500, f"internal server error ({type(e).__name__}); see the server log")

    def _run(self, route: str, body: bytes):
        obj = parse_json(body)
        s = self.served
        common = dict(max_inputs=self.max_inputs, default_instruction=self.default_instruction,
                      has_tokenizer=s.has_tokenizer)  # fmt: skip
        if route == "decode":
            ids, skip = parse_decode(obj, vocab_size=s.vocab_size, max_inputs=self.max_inputs)
            return self._decode(ids, skip)
        if route == "tokenize":
            req, special = parse_tokenize(obj, **common)
            return self._tokenize(req, special)
        model = None
        if route == "openai":
            model = self.resolve_model(obj.get("model"))
            req = parse_openai(obj, vocab_size=s.vocab_size, dimension=s.dimension, **common)
        elif route == "tei":
            req = parse_tei(obj, vocab_size=s.vocab_size, **common)
        elif route == "similarity":
            req = parse_similarity(obj, **common)
        else:
            raise ValueError(f"unknown route {route!r}")
        name = INPUT_FIELD[route]
        if req.tokens and s.has_tokenizer and not self.accept_token_ids:
            raise ApiError(422, TOKEN_IDS_REFUSED.format(name=name), name)
        texts, cuts = self.prepare(req, name)
        if cuts and not req.truncate:
            raise ApiError(413, truncation_refusal(cuts[0], name), f"{name}[{cuts[0].index}]")
        ids, lengths = texts.flat()
        req.items = []  # tokenized: the texts need not travel back
        return Work(route, req, model, ids, lengths, texts.pool_starts, texts.pool_counts, cuts)

    def resolve_model(self, name) -> str | None:
        """The adapter a request's "model" names (None: the base model); ApiError 404
        model_not_found for a name this server does not serve (unless accept_any_model_name;
        a non-string name is left to the validation)."""
        s = self.served
        if not isinstance(name, str) or name == s.name:
            return None
        if name in s.adapters:
            return name
        if self.accept_any_model_name:
            return None
        raise model_not_found(name, s.names, '; send one of those names or omit "model"')

    def prepare(self, req: EmbedRequest, name: str) -> tuple[TokenizedTexts, list[Truncation]]:
        """The request's inputs -> (TokenizedTexts, the inputs a rule cut), by the model's text
        rules (token-id inputs: pooled whole, cut at the limit), cut at the end or, with
        truncation_direction "left", at the beginning."""
        limit = self.max_input_tokens
        left = req.truncation_direction == "left"
        if req.tokens:
            over = [Truncation(i, len(ids), limit, "max_length")
                    for i, ids in enumerate(req.items) if len(ids) > limit]  # fmt: skip
            items = req.items
            if over:
                items = [ids[-limit:] if left else ids[:limit] for ids in items]
            return self.served.rules.from_token_ids(items), over
        rules = self.served.rules
        try:
            prompt = rules.resolve_prompt(req.prompt_name, req.prompt)
        except ValueError as e:
            raise ApiError(422, str(e), "prompt_name") from None
        # What Embedder.prepare does, on the rules alone (no torch in this process).
        pairs, _ = text_inputs.as_pairs(req.items)
        pairs = text_inputs.with_prompt(pairs, prompt)
        text_inputs.warn_empty_texts(text_inputs.empty_text_indices(pairs), name)
        tokenizer = rules.tokenizer
        side = getattr(tokenizer, "truncation_side", "right")
        tokenizer.truncation_side = "left" if left else "right"
        try:
            prepared = rules.prepare(pairs, max_length=limit)
        finally:
            tokenizer.truncation_side = side
        return prepared.texts, prepared.truncations

    def _tokenize(self, req: EmbedRequest, special: bool) -> bytes:
        from l2v_models.serve.encoding import dumps

        tok = self.served.rules.tokenizer
        if special:  # what the model runs: its text rules (prompt, template, limit)
            texts, _ = self.prepare(req, "inputs")
            seqs = [list(map(int, x)) for x in texts.input_ids]
            spans = list(zip(texts.pool_starts.tolist(), texts.pool_counts.tolist(), strict=True))
        else:  # the tokenizer alone on each text
            seqs = [list(tok(t, add_special_tokens=False)["input_ids"]) for t in req.items]
            spans = [(0, len(x)) for x in seqs]
        specials = set(getattr(tok, "all_special_ids", []) or [])
        out = []
        for seq, (start, count) in zip(seqs, spans, strict=True):
            out.append([{"id": t, "text": tok.decode([t]), "special": t in specials,
                         "pooled": start <= j < start + count} for j, t in enumerate(seq)])
        return dumps(out)

    def _decode(self, ids: list, skip: bool) -> bytes:
        from l2v_models.serve.encoding import dumps

        if not self.served.has_tokenizer:
            raise ApiError(422, "this server's model has no tokenizer", "ids")
        tok = self.served.rules.tokenizer
        return dumps([tok.decode(seq, skip_special_tokens=skip) for seq in ids])


# Token ids mean nothing without the tokenizer that made them, and no check on the ids can tell
# (a foreign tokenizer's in-vocabulary ids often decode and re-encode unchanged), so a server
# whose model has a tokenizer takes text unless its operator says otherwise.
TOKEN_IDS_REFUSED = (
    '"{name}" holds token ids, which this server refuses: it cannot tell which tokenizer made '
    "them, and another tokenizer's ids give wrong embeddings (LangChain's OpenAIEmbeddings "
    "sends tiktoken ids unless given check_embedding_ctx_length=False); send the text, or "
    "start the server with --accept-token-ids if you tokenize with this model's own tokenizer"
)


def model_not_found(name: str, served: list[str], hint: str = "") -> ApiError:
    names = ", ".join(repr(n) for n in served)
    return ApiError(
        404, f"the model {name!r:.200} does not exist on this server: it serves {names} "
        f"(GET /v1/models){hint}", "model", code="model_not_found",
    )  # fmt: skip


def truncation_refusal(cut: Truncation, name: str) -> str:
    """The 413 message for an input a rule would cut when the request says "truncate": false."""
    where = f"{name}[{cut.index}]"
    if cut.rule == "doc_max_length":
        return (f"{where} has {cut.tokens} text tokens, over the model's doc_max_length of "
                f"{cut.limit} (llm2vec cuts longer texts by words); shorten it or send "
                '"truncate": true')  # fmt: skip
    return (f"{where} has {cut.tokens} tokens, over this server's limit of {cut.limit} "
            '(--max-input-tokens); shorten it or send "truncate": true')  # fmt: skip
