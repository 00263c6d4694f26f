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
data order from `seed`; MNTP masks per text and dropout per forward from seeds derived from
(seed, step, ...) (seeding), so a resumed run is bit-identical to an uninterrupted one (same
machine, same thread count, same number of processes).

Data parallel (under torchrun; distributed, step, collate): every rank reads the same data
stream and takes its own `batch_size` examples of each step (the step is world x batch_size
examples), DDP averages the LoRA gradients, contrastive stages gather the pooled rows of every
rank with their gradients, MNTP divides by the predicted tokens of all ranks: 2 processes x
batch B train like 1 x 2B. config.fsdp shards the frozen base over the ranks (FSDP2).
config.grad_cache_chunk: GradCache for contrastive batches larger than memory.

Defaults follow llm2vec's published train_configs: LoRA r 16, alpha 32, dropout 0.05 on all
seven projections; MNTP lr 5e-5 (transformers' default: the configs set none), batch 32, 512
tokens, mask 20% with BERT's 80/10/10 replacement (Mistral: 80%, all replaced by the mask
token); SimCSE lr 3e-5, batch 128, 128 tokens, attention dropout 0.3, scale 20; supervised
lr 2e-4, 300 warm-up steps, batch 64, 512 tokens, scale 50; 1000 steps; weight decay 0,
gradient clipping at 1.0 (transformers' Trainer defaults).

Longer than ~500 lines on purpose: the Trainer is the recipe's one stateful object (optimizer,
schedule, the loop, the three stages' text handling); objectives, data, collation, the step's
forward / backward, distribution, checkpoints, LoRA and saving live in their own modules.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from l2v_models import text_inputs, text_rules
from l2v_models import tokenization as tk
from l2v_models.packing import pack
from l2v_models.train import checkpoints
from l2v_models.train.checkpoints import CHECKPOINT_FILE, CONFIG_FILE, latest_checkpoint
from l2v_models.train.collate import StepBatch, collate_contrastive, collate_mntp
from l2v_models.train.data import DataError, DataIndex, Example, ExampleStream, TrainingBatcher
from l2v_models.train.distributed import (
    Dist,
    is_collective_failure,
    replicate,
    shard_base,
)
from l2v_models.train.loading import (  # the loading API, re-exported
    BosTokenError,
    base_arg,
    load_for_training,
    prepend_special_token,
    read_lm_head,
)
from l2v_models.train.lora import LORA_TARGETS, LoraAdapters, LoraOps
from l2v_models.train.objectives import MASK_POLICIES, pooled_rows, train_forward
from l2v_models.train.seeding import MASKS, derive_seed
from l2v_models.train.step import StepRunner

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
LOG_FILE = "train_log.jsonl"
__all__ = ["CHECKPOINT_FILE", "CONFIG_FILE", "LOG_FILE", "BosTokenError", "RankLost",
           "TrainConfig", "Trainer", "latest_checkpoint", "load_for_training",
           "prepend_special_token", "read_lm_head"]  # fmt: skip


@dataclass
class TrainConfig:
    """A training run's settings; None fields take the stage's (and family's) default."""

    stage: str
    steps: int = 1000
    lr: float | None = None
    warmup_steps: int | None = None
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # Per process: a step of a run on N processes takes N x these.
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
    temperature: float | None = None  # contrastive: scale = 1 / temperature (give one of them)
    symmetric: bool = False  # contrastive: + the document-to-query loss
    mask_false_negatives: bool = True  # candidates with the target's text leave the softmax
    false_negative_margin: float | None = None  # and those scoring above target - margin
    grad_cache_chunk: int | None = None  # GradCache: forward this many examples at a time
    fsdp: bool = False  # shard the frozen base over the processes (FSDP2)
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
        _check_int("seed", out.seed, 0)
        if out.grad_cache_chunk is not None:
            _check_int("grad_cache_chunk", out.grad_cache_chunk, 1)
        if out.temperature is not None:
            if not out.temperature > 0:
                raise ValueError(f"temperature must be > 0, got {out.temperature!r}")
            if self.scale is not None and self.scale != 1.0 / self.temperature:
                raise ValueError("give the scale or the temperature (scale = 1 / temperature), "
                                 "not both")  # fmt: skip
            out.scale = 1.0 / out.temperature
        if out.false_negative_margin is not None and not math.isfinite(out.false_negative_margin):
            raise ValueError("false_negative_margin must be a finite number")
        if out.stage == "mntp":
            given = [name for name in ("temperature", "false_negative_margin")
                     if getattr(out, name) is not None] + (["symmetric"] if out.symmetric else [])
            if given:
                raise ValueError(f"{', '.join(given)}: contrastive settings (simcse, supervised), "
                                 "not for mntp")  # fmt: skip
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


class RankLost(RuntimeError):
    """A data-parallel run lost one of its processes: the message says where to resume."""


# ------------------------------------------------------------------------------ trainer
class Trainer:
    """Trains one LoRA adapter of one stage on a loaded model (see the module docstring).

    loaded: l2v_models.checkpoint.Loaded on the torch backend (load_for_training). config: the
    run's TrainConfig. lm_head: MNTP's LM head [V, H] (default: read_lm_head(model_arg)).
    mask_token_id: MNTP's mask token (default: from the tokenizer; needed without one, as in
    benchmarks on token ids). dist: this process's place in a data-parallel run
    (distributed.init_from_environment; default one process). device: where to train with
    config.fsdp (the model is loaded on the CPU and its shards move there; default the
    model's device)."""

    def __init__(self, loaded, config: TrainConfig, *, model_arg=None,
                 lm_head: torch.Tensor | None = None, mask_token_id: int | None = None,
                 dist: Dist | None = None, device=None):  # fmt: skip
        model = loaded.model
        if model.backend != "torch":
            raise ValueError("training runs on the torch backend: load with backend='torch' "
                             "(load_for_training does)")  # fmt: skip
        self.loaded, self.model, self.tokenizer = loaded, model, loaded.tokenizer
        self.config = config = config.resolved(model.config.arch)
        self.model_arg = base_arg(model_arg)
        self.dist = dist if dist is not None else Dist()
        if config.stage == "mntp" and lm_head is None:
            lm_head = read_lm_head(model_arg, loaded)
        if config.fsdp:
            device = torch.device(device) if device is not None else model.device
            if lm_head is not None and lm_head is model.embed:  # tied: keep a whole copy
                lm_head = lm_head.detach().clone()
            shard_base(model, device, self.dist)
            lm_head = lm_head.to(device) if lm_head is not None else None
        init = torch.Generator().manual_seed(config.seed)
        self.adapters = LoraAdapters(model.config, config.lora_r, config.lora_alpha,
                                     config.lora_targets, generator=init,
                                     device=model.device)  # fmt: skip
        self.ops = LoraOps(model, self.adapters, lora_dropout=config.lora_dropout,
                           attn_dropout=config.attn_dropout)  # fmt: skip
        model.build_ops(self.ops)
        self.holder = replicate(self.adapters, self.dist)  # DDP with several processes
        self.optimizer = torch.optim.AdamW(self.adapters.parameters(), lr=config.lr,
                                           weight_decay=config.weight_decay)  # fmt: skip
        self.step = 0
        self.rules = None
        self.lm_head = lm_head
        self.final_softcap = None
        if config.stage == "mntp":
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
        self.runner = StepRunner(model, config, self.dist, self.holder, lm_head=self.lm_head,
                                 final_softcap=self.final_softcap)  # fmt: skip

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
        """One example -> [(item, real tokens), ...] (see data.TrainingBatcher): MNTP a list of
        ids per piece; SimCSE a TokenizedTexts of 1 text (run twice); supervised one of 2 + k
        texts: [instruction, query], positive, its k hard negatives."""
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
                            '"positive", "negatives", "instruction"} objects')  # fmt: skip
        parts = [example.query, example.positive, *example.negatives]
        cut = [self._cut(example, t) for t in parts]
        if any(t is None for t in cut):
            return []
        query = [example.instruction, cut[0]] if example.instruction else cut[0]
        texts = self.prepare([query, *cut[1:]])
        return [(texts, int(texts.lengths.sum()))]

    def collate(self, items: list, splits=None) -> StepBatch:
        """Items of one step -> this process's batch on the host (collate.StepBatch; MNTP
        masks drawn here, per text). items: the items of every process's share of the step,
        in rank order; splits: how many each process takes (default: all on one process, or
        as even as possible over the processes)."""
        if not items:
            raise ValueError("collate: no items")
        c, d = self.config, self.dist
        if splits is None:
            splits = [len(a) for a in np.array_split(np.arange(len(items)), d.world)]
        if len(splits) != d.world:
            raise ValueError(f"collate: {len(splits)} splits for {d.world} processes")
        if c.stage == "mntp":
            seeds = [derive_seed(c.seed, MASKS, self.step, i) for i in range(len(items))]
            mask = dict(mask_prob=c.mask_prob, policy=c.mask_policy,
                        mask_token_id=self.mask_token_id, special_ids=self.special_ids,
                        vocab_size=self.random_vocab)  # fmt: skip
            return collate_mntp(items, splits, d.rank, chunk=c.grad_cache_chunk, seeds=seeds,
                                mask=mask)  # fmt: skip
        return collate_contrastive(items, splits, d.rank, simcse=c.stage == "simcse",
                                   chunk=c.grad_cache_chunk, keys=c.mask_false_negatives,
                                   batch_tokens=c.batch_tokens)  # fmt: skip

    def next_step_items(self, batcher: TrainingBatcher) -> tuple[list, list]:
        """(items, splits) of the next step: each process's batch in rank order, every
        process reading the same stream (so the data order does not depend on their number)."""
        items, splits = [], []
        for _ in range(self.dist.world):
            batch = [item for _, item in batcher.next_batch()]
            items.extend(batch)
            splits.append(len(batch))
        return items, splits

    # ------------------------------------------------------------------ loss and step
    def train(self, mode: bool = True) -> Trainer:
        """Dropout on (True) or off (False, for checks and embedding)."""
        self.ops.training = mode
        return self

    def loss(self, batch: StepBatch) -> torch.Tensor:
        """The step's loss (all processes) of one batch (host or device), with autograd
        through this process's part; dropout drawn as train_step would at this step."""
        return self.runner.loss(batch.to(self.model.device), self.step)

    def train_step(self, batch: StepBatch) -> dict:
        """One optimizer step on one batch -> {"loss", "tokens", "texts", "lr", "grad_norm"}
        (tokens: real tokens of the step over all processes; texts: this process's)."""
        c = self.config
        self.train(True)
        lr = lr_at(self.step, c)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.runner.backward(batch.to(self.model.device), self.step)
        norm = torch.nn.utils.clip_grad_norm_(list(self.adapters.parameters()), c.max_grad_norm)
        self.optimizer.step()
        self.step += 1
        return {"loss": loss, "tokens": batch.step_tokens, "texts": batch.num_texts, "lr": lr,
                "grad_norm": float(norm)}  # fmt: skip

    # ------------------------------------------------------------------ data
    def batches(self, paths, *, index: DataIndex | None = None, weights=None) -> TrainingBatcher:
        """A TrainingBatcher over data files for this stage (validated now; seeded order). weights:
        one per file to mix the files by weight (mixing.MixedStream) instead of pooling
        their examples."""
        c = self.config
        kind = "triplet" if c.stage == "supervised" else "text"
        index = index if index is not None else DataIndex.scan(paths, kind)
        if weights is not None:
            from l2v_models.train.mixing import MixedStream

            stream = MixedStream(index, weights, seed=c.seed, shuffle=c.shuffle)
        else:
            stream = ExampleStream(index, seed=c.seed, shuffle=c.shuffle)
        return TrainingBatcher(stream, self.encode, batch_size=c.batch_size,
                       batch_tokens=c.batch_tokens)  # fmt: skip

    # ------------------------------------------------------------------ the loop
    def fit(self, batcher: TrainingBatcher, *, output=None, progress: bool = True, log_path=None,
            stop_at: int | None = None) -> list[dict]:  # fmt: skip
        """Run until config.steps: batches from `batcher`, a JSON line per step in `log_path`
        (default output/train_log.jsonl), a checkpoint every save_every steps, the adapter in
        `output` at the end. stop_at: stop after that step instead (an interrupted run; the
        schedule still runs to config.steps). Returns the steps' stats. With several processes
        only rank 0 logs, shows progress and writes files; a process that loses the others
        raises RankLost."""
        from tqdm.auto import tqdm

        c, main = self.config, self.dist.main
        output = Path(output) if output is not None else None
        if log_path is None and output is not None:
            log_path = output / LOG_FILE
        history = []
        log = None
        if log_path is not None and main:
            Path(log_path).parent.mkdir(parents=True, exist_ok=True)
            log = open(log_path, "a", encoding="utf-8")
        bar = tqdm(total=c.steps, initial=self.step, desc=f"train {c.stage}", unit="step",
                   disable=not (progress and main))  # fmt: skip
        start, tokens_done = time.perf_counter(), 0
        try:
            while self.step < (c.steps if stop_at is None else min(stop_at, c.steps)):
                t0 = time.perf_counter()
                try:
                    stats = self.train_step(self.collate(*self.next_step_items(batcher)))
                except (RuntimeError, ValueError) as e:
                    if self.dist.active and is_collective_failure(e):
                        raise RankLost(self._lost_message(e, output)) from None
                    raise
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
                    if main:
                        self.save_checkpoint(output / "checkpoints" / f"step-{self.step:06d}",
                                             batcher)  # fmt: skip
        finally:
            bar.close()
            if log is not None:
                log.close()
        if output is not None and main:
            self.save(output)
        return history

    def _lost_message(self, error: BaseException, output) -> str:
        # gloo: "[.../pair.cc:545] Read error [addr]: Connection reset by peer. This is ...".
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        first = re.sub(r"^\[[^\]]*\.(cc|cpp):\d+\]\s*", "", text).split(". ")[0].rstrip(".")
        newest = latest_checkpoint(output) if output is not None else None
        where = (f"the newest checkpoint is {newest}: rerun the same command with --resume"
                 if newest is not None else "no checkpoint was written (--save-every N)")
        return (f"rank {self.dist.rank} lost the other processes during step {self.step + 1} "
                f"(another process stopped or was killed: {first}); the run stopped on every "
                f"process, {where}")

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
        return checkpoints.state_dict(self, batcher)

    def save_checkpoint(self, directory, batcher: TrainingBatcher | None = None) -> Path:
        """A resumable checkpoint (checkpoints.save_checkpoint): call it on rank 0 only."""
        return checkpoints.save_checkpoint(self, directory, batcher)

    def config_record(self) -> dict:
        """What must match for a resume to continue the same run."""
        return checkpoints.config_record(self)

    def load_checkpoint(self, directory=None, batcher: TrainingBatcher | None = None, *,
                        checkpoint: dict | None = None) -> list[str]:  # fmt: skip
        """Restore a checkpoint written by save_checkpoint (same config required): from
        `directory`, or an already read checkpoints.read_checkpoint() (what rank 0 broadcasts).
        Returns notes on what differs from the uninterrupted run (another world size)."""
        if checkpoint is None:
            checkpoint = checkpoints.read_checkpoint(directory)
        return checkpoints.restore_checkpoint(self, checkpoint, batcher)

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
            batch = pack(texts, np.arange(len(texts))).to(self.model.device)
            hidden = train_forward(self.model, batch)
            return pooled_rows(self.model, hidden, batch).cpu()
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

