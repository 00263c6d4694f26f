"""The trainer: LLM2Vec's recipe (MNTP, SimCSE, supervised) on l2v's model, packed batches.

    from l2v_models.train import TrainConfig, Trainer, load_for_training
    loaded = load_for_training("smollm2", peft="out/mntp")          # adapters merged
    trainer = Trainer(loaded, TrainConfig("simcse", steps=100, batch_size=32, max_length=32))
    trainer.fit(trainer.batches(["wiki.txt"]), output="out/simcse")  # or drive it yourself:
    batch = trainer.collate([trainer.encode(Example("mine:1", text="A cat."))[0][0], ...])
    stats = trainer.train_step(batch)                                # {"loss", "tokens", "lr"}
    trainer.save("out/simcse")                                       # PEFT adapter folder

One step: forward with autograd through the frozen model (torch backend, LoraOps: unmerged
LoRA, dropout), the stage's loss, backward into the LoRA matrices only, gradient clipping,
AdamW with a linear warm-up / decay schedule. Everything random is seeded: LoRA init and the
data order from `seed`, MNTP masking from its own generator, dropout from torch's global
generator (seeded at construction); a checkpoint stores all of them with the optimizer, so a
resumed run is bit-identical to an uninterrupted one (same machine, same thread count).

Defaults follow llm2vec's published train_configs: LoRA r 16, alpha 32, dropout 0.05 on all
seven projections; MNTP lr 5e-5 (transformers' default: the configs set none), batch 32, 512
tokens, mask 20% with BERT's 80/10/10 replacement (Mistral: 80%, all replaced by the mask
token); SimCSE lr 3e-5, batch 128, 128 tokens, attention dropout 0.3, scale 20; supervised
lr 2e-4, 300 warm-up steps, batch 64, 512 tokens, scale 50; 1000 steps; weight decay 0,
gradient clipping at 1.0 (transformers' Trainer defaults).

Longer than ~500 lines on purpose: the Trainer is the recipe's one stateful object (optimizer,
schedule, checkpoints and bit-exact resume, the three stages' batching); objectives, data, LoRA
and saving live in their own modules.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from l2v_models import text_inputs, text_rules
from l2v_models import tokenization as tk
from l2v_models.engine import Engine
from l2v_models.packing import TokenizedTexts, pack
from l2v_models.train.data import DataError, DataIndex, Example, ExampleStream, TrainingBatcher
from l2v_models.train.lora import LORA_TARGETS, LoraAdapters, LoraOps, merge_adapter_
from l2v_models.train.objectives import (
    MASK_POLICIES,
    ContrastiveBatch,
    contrastive_loss,
    duplicate_rows,
    mask_tokens,
    mntp_loss,
    pooled_rows,
    train_forward,
)

logger = logging.getLogger(__name__)

STAGES = ("mntp", "simcse", "supervised")
LONG_LINE_POLICIES = ("split", "truncate", "skip", "error")
STAGE_DEFAULTS = {
    "mntp": dict(lr=5e-5, warmup_steps=0, max_length=512, batch_size=32, attn_dropout=0.0,
                 scale=None, long_lines="split"),
    "simcse": dict(lr=3e-5, warmup_steps=0, max_length=128, batch_size=128, attn_dropout=0.3,
                   scale=20.0, long_lines="truncate"),
    "supervised": dict(lr=2e-4, warmup_steps=300, max_length=512, batch_size=64,
                       attn_dropout=0.0, scale=50.0, long_lines="truncate"),
}  # fmt: skip
# llm2vec's MNTP settings per family (train_configs/mntp/*.json): Mistral 80% all-mask.
MNTP_DEFAULTS = {"mistral": (0.8, "all")}
MNTP_DEFAULT = (0.2, "bert")
# A text longer than this many characters per token of the limit is cut before tokenization
# under --long-lines truncate (no tokenizer makes tokens that long on real text).
_CHARS_PER_TOKEN_BOUND = 64
CHECKPOINT_FILE = "trainer_state.pt"
CONFIG_FILE = "train_config.json"
LOG_FILE = "train_log.jsonl"


@dataclass
class TrainConfig:
    """A training run's settings; None fields take the stage's (and family's) default."""

    stage: str
    steps: int = 1000
    lr: float | None = None
    warmup_steps: int | None = None
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int | None = None  # examples per step (SimCSE: sentences; supervised: triples)
    batch_tokens: int | None = None  # real tokens per step (all texts of the step)
    max_length: int | None = None  # tokens per text
    long_lines: str | None = None  # over max_length: split (MNTP) | truncate | skip | error
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = LORA_TARGETS
    attn_dropout: float | None = None
    scale: float | None = None  # contrastive: cosine similarity x scale
    mask_prob: float | None = None
    mask_policy: str | None = None
    mask_token: str | None = None  # None: the tokenizer's, else "_" (llm2vec's "blank")
    seed: int = 0
    shuffle: bool = True
    gradient_checkpointing: bool = False
    save_every: int = 0
    base_model_name_or_path: str | None = None  # written to adapter_config.json

    def resolved(self, family: str = "") -> TrainConfig:
        """A copy with every default filled in, checked."""
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        d = STAGE_DEFAULTS[self.stage]
        out = replace(self, lora_targets=tuple(self.lora_targets))
        for key, value in d.items():
            if getattr(out, key) is None:
                setattr(out, key, value)
        if self.batch_size is None and self.batch_tokens is not None:
            out.batch_size = None  # a token budget alone
        if out.stage == "mntp":
            prob, policy = MNTP_DEFAULTS.get(family, MNTP_DEFAULT)
            out.mask_prob = prob if out.mask_prob is None else out.mask_prob
            out.mask_policy = policy if out.mask_policy is None else out.mask_policy
        _check_int("steps", out.steps, 1)
        _check_int("warmup_steps", out.warmup_steps, 0)
        _check_int("max_length", out.max_length, 1)
        _check_int("lora_r", out.lora_r, 1)
        _check_int("save_every", out.save_every, 0)
        for name in ("batch_size", "batch_tokens"):
            if getattr(out, name) is not None:
                _check_int(name, getattr(out, name), 1)
        if out.stage != "mntp" and out.batch_size is not None and out.batch_size < 2:
            # The other examples of the batch are the negatives: with one example the SimCSE
            # loss (and the supervised one without hard negatives) is 0 and nothing is learned.
            raise ValueError(f"{out.stage}: the batch size must be at least 2, got "
                             f"{out.batch_size} (contrastive training compares each example "
                             "with the others of its batch)")  # fmt: skip
        if not out.lr > 0:
            raise ValueError(f"lr must be > 0, got {out.lr!r}")
        if out.long_lines not in LONG_LINE_POLICIES:
            raise ValueError(f"long_lines must be one of {LONG_LINE_POLICIES}, got "
                             f"{out.long_lines!r}")  # fmt: skip
        if out.long_lines == "split" and out.stage != "mntp":
            raise ValueError("long_lines='split' is for MNTP only (a contrastive example is one "
                             "text); use truncate, skip or error")  # fmt: skip
        if out.stage == "mntp":
            if out.mask_policy not in MASK_POLICIES:
                raise ValueError(f"mask policy must be one of {MASK_POLICIES}, got "
                                 f"{out.mask_policy!r}")  # fmt: skip
            if not 0.0 < out.mask_prob <= 1.0:
                raise ValueError(f"mask probability must be in (0, 1], got {out.mask_prob!r}")
        return out


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def lr_at(step: int, config: TrainConfig) -> float:
    """transformers' linear schedule: 0 -> lr over warm-up, then linearly to 0 at `steps`.
    `step` counts from 0 (the learning rate of the step about to run)."""
    warm = min(config.warmup_steps, config.steps)
    if step < warm:
        return config.lr * step / max(1, warm)
    return config.lr * max(0.0, (config.steps - step) / max(1, config.steps - warm))


# ------------------------------------------------------------------------------ loading
def load_for_training(model=None, peft=None, *, dtype=None, device=None, extra_peft=(),
                      attention: str = "bidirectional", bos_token: str | None = None):  # fmt: skip
    """l2v_models.checkpoint.load_model on the torch backend (training needs autograd), with
    `peft` (a previous stage's adapter) merged; `extra_peft` adapters are merged after it (a
    chain longer than load_model's). model None: the untrained embedded SmolLM2 ("smollm2").
    An adapter whose shapes do not fit the base raises ValueError saying so. attention:
    "bidirectional" (LLM2Vec's recipe, every family, Qwen2 included), or load_model's "llm2vec"
    / "causal". bos_token: see prepend_special_token.
    Returns the Loaded (model in the given dtype: default bf16 on CUDA, fp32 on CPU)."""
    from l2v_models.checkpoint import load_model, read_lora_adapter

    try:
        loaded = load_model(_base_arg(model), peft, dtype=dtype, device=device, backend="torch",
                            attention=attention)  # fmt: skip
        for path in extra_peft:
            merge_adapter_(loaded.model, read_lora_adapter(Path(path)))
    except ValueError as e:
        text = str(e)
        if "LoRA adapter" in text and ("lora_A is" in text or "not in this model" in text):
            raise ValueError(
                f"{text.splitlines()[0]}. The adapter was trained for another base model: "
                f"pass the --model it was trained on (its adapter_config.json names it)"
            ) from None
        raise
    loaded.model.requires_grad_(False)
    if bos_token is not None:
        prepend_special_token(loaded.tokenizer, bos_token)
    return loaded


class BosTokenError(ValueError):
    """--bos-token names a token that cannot be every text's first token (a user error)."""


def prepend_special_token(tokenizer, token: str) -> None:
    """Make a fast tokenizer put `token` (one of its special tokens) before every text, as
    Llama's tokenizer puts its BOS, and keep it when saved (MNTP writes the tokenizer into its
    -mntp folder, so the next stages and the encoder tokenize the same way).

    Why: a decoder's first position is an attention sink whose hidden state is nearly the same
    for every text; a tokenizer without a BOS (SmolLM2's) makes that position a text token, so
    mean pooling over a one-word text returns almost the same vector for every word. The
    prepended token takes the sink, and like any special token it is attended to but never
    pooled (llm2vec pools the text's own tokens). A no-op when the tokenizer already does it."""
    from tokenizers import processors

    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id and token != tokenizer.unk_token:
        raise BosTokenError(f"--bos-token {token!r} is not a token of this tokenizer")
    if token not in tokenizer.all_special_tokens:
        # A plain token would be pooled like the text's own tokens (only special ones are not).
        raise BosTokenError(f"--bos-token {token!r} is not a special token of this tokenizer; "
                            f"its special tokens: {' '.join(tokenizer.all_special_tokens)}")
    if tokenizer("a")["input_ids"][:1] == [token_id]:
        return
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise BosTokenError("--bos-token needs a fast tokenizer (tokenizer.json)")
    backend.post_processor = processors.TemplateProcessing(
        single=f"{token} $A", pair=f"{token} $A $B:1", special_tokens=[(token, token_id)]
    )
    tokenizer.bos_token = token
    if tokenizer("a")["input_ids"][:1] != [token_id]:
        raise BosTokenError(f"could not make this tokenizer prepend {token!r}")


def _base_arg(model) -> str:
    from l2v_models.checkpoint import BASE_MODEL

    return BASE_MODEL if model is None else str(model)


def read_lm_head(model_arg, loaded) -> torch.Tensor:
    """The LM head [V, H] for MNTP: the input embeddings where the config ties them (SmolLM2,
    Gemma), else `lm_head.weight` of the base checkpoint (an -mntp dir's base weights)."""
    from l2v_models.checkpoint import PACKAGED_MODELS, read_lora_adapter
    from l2v_models.checkpoint.hub import _resolve_dir
    from l2v_models.checkpoint.sources import _checkpoint_files, _load_bin, _safe_open

    model = loaded.model
    if getattr(loaded.hf_config, "tie_word_embeddings", True):
        return model.embed
    arg = _base_arg(model_arg)
    if arg.endswith(".gguf") or arg.lower() in PACKAGED_MODELS:
        raise ValueError(f"{arg}: MNTP on an untied GGUF model is not supported (its LM head "
                         "is not read); pass the Hugging Face model directory")  # fmt: skip
    directory = _resolve_dir(arg, "base model")
    if (directory / "adapter_config.json").is_file():  # an -mntp dir: the base weights
        base = read_lora_adapter(directory).base_model_name_or_path
        directory = _resolve_dir(str(base), "base weights")
    fmt, files = _checkpoint_files(directory)
    for f in files:
        if fmt == "safetensors":
            handle = _safe_open(f)
            for key in ("lm_head.weight", "model.lm_head.weight"):
                if key in handle.keys():
                    w = handle.get_tensor(key)
                    return w.to(device=model.device, dtype=model.dtype)
        else:
            state = _load_bin(f)
            if "lm_head.weight" in state:
                return state["lm_head.weight"].to(device=model.device, dtype=model.dtype)
    raise ValueError(
        f"{directory}: the config does not tie the LM head to the embeddings and the checkpoint "
        "has no lm_head.weight; MNTP needs the model's LM head (save the *ForCausalLM)"
    )


# ------------------------------------------------------------------------------ trainer
class Trainer:
    """Trains one LoRA adapter of one stage on a loaded model (see the module docstring).

    loaded: l2v_models.checkpoint.Loaded on the torch backend (load_for_training). config: the
    run's TrainConfig. lm_head: MNTP's LM head [V, H] (default: read_lm_head(model_arg)).
    mask_token_id: MNTP's mask token (default: from the tokenizer; needed without one, as in
    benchmarks on token ids)."""

    def __init__(self, loaded, config: TrainConfig, *, model_arg=None,
                 lm_head: torch.Tensor | None = None,
                 mask_token_id: int | None = None):  # fmt: skip
        model = loaded.model
        if model.backend != "torch":
            raise ValueError("training runs on the torch backend: load with backend='torch' "
                             "(load_for_training does)")  # fmt: skip
        self.loaded, self.model, self.tokenizer = loaded, model, loaded.tokenizer
        self.config = config = config.resolved(model.config.arch)
        self.model_arg = _base_arg(model_arg)
        torch.manual_seed(config.seed)  # dropout draws from the global generator
        init = torch.Generator().manual_seed(config.seed)
        self.adapters = LoraAdapters(model.config, config.lora_r, config.lora_alpha,
                                     config.lora_targets, generator=init,
                                     device=model.device)  # fmt: skip
        self.ops = LoraOps(model, self.adapters, lora_dropout=config.lora_dropout,
                           attn_dropout=config.attn_dropout)  # fmt: skip
        model.build_ops(self.ops)
        self.optimizer = torch.optim.AdamW(self.adapters.parameters(), lr=config.lr,
                                           weight_decay=config.weight_decay)  # fmt: skip
        self.mask_generator = torch.Generator().manual_seed(config.seed + 1)
        self.step = 0
        self.rules = None
        if config.stage == "mntp":
            self.lm_head = lm_head if lm_head is not None else read_lm_head(model_arg, loaded)
            self.final_softcap = getattr(loaded.hf_config, "final_logit_softcapping", None)
            self.mask_token_id = mask_token_id
            if mask_token_id is None:
                self.mask_token_id = self._mask_token_id()
            self.special_ids = set(getattr(self.tokenizer, "all_special_ids", None) or [])
            vocab = model.config.vocab_size
            self.random_vocab = min(len(self.tokenizer), vocab) if self.tokenizer else vocab
        else:
            # llm2vec's text rules (instruction attended, not pooled), mean pooling.
            self.rules = llm2vec_rules(loaded, config.max_length)

    # ------------------------------------------------------------------ text -> items
    def prepare(self, sentences, rules=None):
        """Strings and [instruction, text] pairs -> TokenizedTexts by the stage's text rules."""
        pairs, _ = text_inputs.as_pairs(sentences)
        return (rules or self.rules).prepare(pairs).texts

    def _mask_token_id(self) -> int:
        tok, c = self.tokenizer, self.config
        name = c.mask_token or getattr(tok, "mask_token", None) or "_"
        ids = tok.convert_tokens_to_ids([name])
        if not ids or ids[0] is None or ids[0] == getattr(tok, "unk_token_id", -1):
            raise ValueError(f"mask token {name!r} is not a token of this tokenizer; pass "
                             "--mask-token with one that is")  # fmt: skip
        return int(ids[0])

    def _text_tokens(self, text: str, special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special,
                                   return_attention_mask=False)["input_ids"])  # fmt: skip

    def _over_limit(self, example: Example, text: str, n: int) -> str:
        c = self.config
        # MNTP counts the whole text; contrastive stages count up to limit + 1 tokens.
        count = f"{n} tokens" if c.stage == "mntp" else f"more than {c.max_length} tokens"
        return (f"{example.where}: {count}, over the {c.stage} limit of {c.max_length} "
                "(--max-length); pass --long-lines truncate or skip, or shorten the line")

    def _cut(self, example: Example, text: str) -> str | None:
        """Contrastive text under the long-line policy: the text (cut later by llm2vec's word
        truncation), or None to skip it."""
        c = self.config
        if c.long_lines == "truncate":
            return text[: c.max_length * _CHARS_PER_TOKEN_BOUND]
        n = len(self.tokenizer(text, add_special_tokens=False, truncation=True,
                               max_length=c.max_length + 1)["input_ids"])  # fmt: skip
        if n <= c.max_length:
            return text
        if c.long_lines == "skip":
            return None
        raise DataError(self._over_limit(example, text, n))

    def encode(self, example: Example) -> list:
        """One example -> [(item, real tokens), ...] (see data.TrainingBatcher): MNTP a list of ids
        per piece; SimCSE a TokenizedTexts of 1 text (run twice); supervised one of 3 (or 2)
        texts: [instruction, query], positive, negative."""
        c = self.config
        if c.stage == "mntp":
            if example.text is None:
                raise DataError(f"{example.where}: MNTP reads texts, not triples")
            text = example.text
            if c.long_lines == "truncate":
                text = text[: c.max_length * _CHARS_PER_TOKEN_BOUND]
            ids = self._text_tokens(text, special=True)
            if len(ids) > c.max_length:
                if c.long_lines == "error":
                    raise DataError(self._over_limit(example, text, len(ids)))
                if c.long_lines == "skip":
                    return []
                if c.long_lines == "truncate":
                    ids = ids[: c.max_length]
            pieces = [ids[i : i + c.max_length] for i in range(0, len(ids), c.max_length)]
            return [(p, len(p)) for p in pieces if p]
        if c.stage == "simcse":
            if example.text is None:
                raise DataError(f"{example.where}: SimCSE reads texts, not triples")
            text = self._cut(example, example.text)
            if text is None:
                return []
            texts = self.prepare([text])
            return [(texts, 2 * int(texts.lengths.sum()))]
        if example.query is None:
            raise DataError(f'{example.where}: supervised training reads {{"query", '
                            '"positive", "negative", "instruction"} objects')  # fmt: skip
        parts = [example.query, example.positive]
        if example.negative is not None:
            parts.append(example.negative)
        cut = [self._cut(example, t) for t in parts]
        if any(t is None for t in cut):
            return []
        query = [example.instruction, cut[0]] if example.instruction else cut[0]
        texts = self.prepare([query, *cut[1:]])
        return [(texts, int(texts.lengths.sum()))]

    def collate(self, items: list):
        """Items of one step -> the stage's batch on the host (MNTP masking drawn here)."""
        if not items:
            raise ValueError("collate: no items")
        c = self.config
        if c.stage == "mntp":
            texts = TokenizedTexts.whole(items)
            packed = pack(texts, np.arange(len(items)))
            return mask_tokens(packed, mask_prob=c.mask_prob, policy=c.mask_policy,
                               mask_token_id=self.mask_token_id, special_ids=self.special_ids,
                               vocab_size=self.random_vocab,
                               generator=self.mask_generator)  # fmt: skip
        texts = TokenizedTexts.concat(items)
        n = len(items)
        groups = {2} if c.stage == "simcse" else {len(t) for t in items}
        if len(groups) != 1:
            raise DataError("supervised examples must all have a negative or all have none; "
                            "this batch mixes both")  # fmt: skip
        g = groups.pop()
        if n < 2 and g == 2:  # only --batch-tokens can get here (batch_size >= 2 is checked)
            raise DataError(f"a {c.stage} step got 1 example, so no negative: the loss would be "
                            f"0; raise --batch-tokens (now {c.batch_tokens}) to hold at least "
                            "2 examples, or lower --max-length")  # fmt: skip
        if c.stage == "simcse":
            return ContrastiveBatch(pack(texts, duplicate_rows(n)), n, 2)
        rows = np.concatenate([np.arange(n) * g + j for j in range(g)])
        return ContrastiveBatch(pack(texts, rows), n, g)

    # ------------------------------------------------------------------ loss and step
    def train(self, mode: bool = True) -> Trainer:
        """Dropout on (True) or off (False, for checks and embedding)."""
        self.ops.training = mode
        return self

    def loss(self, batch) -> torch.Tensor:
        """The stage's loss of one batch (host or device), with autograd."""
        c = self.config
        batch = batch.to(self.model.device)
        hidden = train_forward(self.model, batch.packed, checkpointing=c.gradient_checkpointing)
        if c.stage == "mntp":
            return mntp_loss(hidden, batch, self.lm_head, self.final_softcap)
        pooled = pooled_rows(self.model, hidden, batch.packed)
        return contrastive_loss(pooled, batch.n, batch.groups, c.scale)

    def train_step(self, batch) -> dict:
        """One optimizer step on one batch -> {"loss", "tokens", "texts", "lr", "grad_norm"}."""
        c = self.config
        self.train(True)
        lr = lr_at(self.step, c)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(batch)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(list(self.adapters.parameters()), c.max_grad_norm)
        self.optimizer.step()
        self.step += 1
        return {"loss": float(loss.detach()), "tokens": batch.num_tokens,
                "texts": batch.packed.num_texts, "lr": lr, "grad_norm": float(norm)}  # fmt: skip

    # ------------------------------------------------------------------ data
    def batches(self, paths, *, index: DataIndex | None = None) -> TrainingBatcher:
        """A TrainingBatcher over data files for this stage (validated now; seeded order)."""
        c = self.config
        kind = "triplet" if c.stage == "supervised" else "text"
        index = index if index is not None else DataIndex.scan(paths, kind)
        stream = ExampleStream(index, seed=c.seed, shuffle=c.shuffle)
        return TrainingBatcher(stream, self.encode, batch_size=c.batch_size,
                               batch_tokens=c.batch_tokens)  # fmt: skip

    # ------------------------------------------------------------------ the loop
    def fit(self, batcher: TrainingBatcher, *, output=None, progress: bool = True,
            log_path=None, stop_at: int | None = None) -> list[dict]:  # fmt: skip
        """Run until config.steps: batches from `batcher`, a JSON line per step in `log_path`
        (default output/train_log.jsonl), a checkpoint every save_every steps, the adapter in
        `output` at the end. stop_at: stop after that step instead (an interrupted run; the
        schedule still runs to config.steps). Returns the steps' stats."""
        from tqdm.auto import tqdm

        c = self.config
        output = Path(output) if output is not None else None
        if log_path is None and output is not None:
            log_path = output / LOG_FILE
        history = []
        log = None
        if log_path is not None:
            Path(log_path).parent.mkdir(parents=True, exist_ok=True)
            log = open(log_path, "a", encoding="utf-8")
        bar = tqdm(total=c.steps, initial=self.step, desc=f"train {c.stage}", unit="step",
                   disable=not progress)  # fmt: skip
        start, tokens_done = time.perf_counter(), 0
        try:
            while self.step < (c.steps if stop_at is None else min(stop_at, c.steps)):
                t0 = time.perf_counter()
                items = [item for _, item in batcher.next_batch()]
                stats = self.train_step(self.collate(items))
                stats["step"] = self.step
                stats["seconds"] = time.perf_counter() - t0
                tokens_done += stats["tokens"]
                rate = tokens_done / max(time.perf_counter() - start, 1e-9)
                stats["tokens_per_s"] = stats["tokens"] / max(stats["seconds"], 1e-9)
                history.append(stats)
                if log is not None:
                    log.write(json.dumps(stats) + "\n")
                    log.flush()
                bar.set_postfix(loss=f"{stats['loss']:.4f}", tok_s=f"{rate:.0f}")
                bar.update(1)
                if not math.isfinite(stats["loss"]):
                    raise FloatingPointError(
                        f"the loss became {stats['loss']} at step {self.step}; lower --lr"
                    )
                if output is not None and c.save_every and self.step % c.save_every == 0:
                    self.save_checkpoint(output / "checkpoints" / f"step-{self.step:06d}",
                                         batcher)  # fmt: skip
        finally:
            bar.close()
            if log is not None:
                log.close()
        if output is not None:
            self.save(output)
        return history

    # ------------------------------------------------------------------ output
    def llm2vec_config(self) -> dict:
        """The encoder settings the adapter is used with (llm2vec_config.json)."""
        return {"pooling_mode": "mean", "max_length": 512, "doc_max_length": 400,
                "skip_instruction": True}  # fmt: skip

    def save(self, output) -> Path:
        """The PEFT adapter folder (see save.save_adapter); MNTP also writes the base's
        config.json and tokenizer (LLM2Vec's -mntp layout)."""
        from l2v_models.train.save import save_adapter

        c = self.config
        base = c.base_model_name_or_path or _adapter_base_name(self.model_arg)
        return save_adapter(
            output, self.adapters, base_model_name_or_path=base,
            lora_dropout=c.lora_dropout, llm2vec_config=self.llm2vec_config(),
            mntp_layout=(self.loaded, self.model_arg) if c.stage == "mntp" else None,
        )  # fmt: skip

    def state_dict(self, batcher: TrainingBatcher | None = None) -> dict:
        state = {
            "step": self.step,
            "lora": self.adapters.peft_state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "mask_rng": self.mask_generator.get_state(),
            "data": json.dumps(batcher.state()) if batcher is not None else None,
        }
        if torch.cuda.is_available() and self.model.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.model.device)
        return state

    def save_checkpoint(self, directory, batcher: TrainingBatcher | None = None) -> Path:
        """A resumable checkpoint: the adapter (usable as is) + trainer_state.pt + the config."""
        directory = Path(directory)
        self.save(directory)
        (directory / CONFIG_FILE).write_text(json.dumps(self.config_record(), indent=2) + "\n")
        tmp = directory / (CHECKPOINT_FILE + ".tmp")
        torch.save(self.state_dict(batcher), tmp)
        tmp.replace(directory / CHECKPOINT_FILE)
        return directory

    def config_record(self) -> dict:
        """What must match for a resume to continue the same run."""
        record = asdict(self.config)
        record["lora_targets"] = list(record["lora_targets"])
        record["model"] = self.model_arg
        return record

    def load_checkpoint(self, directory, batcher: TrainingBatcher | None = None) -> None:
        """Restore a checkpoint written by save_checkpoint (same config required)."""
        directory = Path(directory)
        saved = json.loads((directory / CONFIG_FILE).read_text())
        mine = self.config_record()
        diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
        if diff:
            raise ValueError(
                f"cannot resume from {directory}: the run's settings differ in "
                + ", ".join(f"{k} ({saved.get(k)!r} -> {mine.get(k)!r})" for k in diff)
                + "; resume with the same options, or start a new --output"
            )
        state = torch.load(directory / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
        self.adapters.load_peft_state_dict(state["lora"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        self.mask_generator.set_state(state["mask_rng"])
        if "cuda_rng" in state and self.model.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.model.device)
        self.step = int(state["step"])
        if batcher is not None and state["data"] is not None:
            batcher.restore(json.loads(state["data"]))

    # ------------------------------------------------------------------ embeddings
    @torch.no_grad()
    def embed(self, sentences) -> torch.Tensor:
        """Embeddings fp32 [N, H] (CPU) of the current, unmerged model, dropout off, by
        llm2vec's rules with mean pooling: what the saved adapter must reproduce."""
        rules = self.rules or llm2vec_rules(self.loaded, 512)
        was = self.ops.training
        self.train(False)
        try:
            texts = self.prepare(sentences, rules)
            return Engine(self.model).run_batch(texts, mode="mean").cpu()
        finally:
            self.train(was)


def llm2vec_rules(loaded, max_length: int) -> text_rules.Llm2vecRules:
    """llm2vec's text rules for training a stage: the instruction attended to but not pooled,
    mean pooling, no cut by words below max_length (each stage cuts its texts itself)."""
    return text_rules.Llm2vecRules(
        loaded.tokenizer, name_or_path=loaded.name_or_path,
        config_family=tk.config_family(loaded.hf_config), pooling_mode="mean",
        max_length=max_length, doc_max_length=max_length, skip_instruction=True,
    )  # fmt: skip


def latest_checkpoint(output) -> Path | None:
    """The newest output/checkpoints/step-N with a complete trainer state, or None."""
    root = Path(output) / "checkpoints"
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("step-*") if (p / CHECKPOINT_FILE).is_file())
    return done[-1] if done else None


def _adapter_base_name(model_arg: str) -> str:
    """adapter_config's base_model_name_or_path: a packaged model's name ("smollm2" for the
    default); a local dir or GGUF as an absolute path (loads from any working directory); a hub
    id as given."""
    from l2v_models.checkpoint import PACKAGED_MODELS

    if model_arg.lower() in PACKAGED_MODELS:
        return model_arg.lower()
    path = Path(model_arg).expanduser()
    if path.exists():
        return str(path.resolve())
    return model_arg

