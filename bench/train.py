"""Training throughput: l2v's packed LoRA step vs a padded Hugging Face + PEFT step (llm2vec's way).

    python -m bench.train --shape smollm2-135m --stage simcse --batch-size 32    # CPU or GPU
    python -m bench.train --shape mistral-7b --stage supervised --batch-size 64  # a GPU
    python -m bench.train --smoke                                                # CI (CPU)

Both sides train the same model (random weights of a real model's shape, or the embedded
SmolLM2 with --model smollm2), the same LoRA (r 16, alpha 32, dropout 0.05, all seven
projections, B = 0 at the start), on the same token ids, with the same optimizer (AdamW,
clipping at 1.0) and the same loss:
- l2v: l2v_models.train.Trainer.train_step: packed batch (no padding), LoraOps on the torch
  backend, SimCSE = both copies of every sentence in one packed forward; MNTP = the LM head on
  the predicted rows only.
- hf-peft: transformers' model made bidirectional (l2v_models.hf_compat) + peft.get_peft_model,
  llm2vec's batches: SimCSE = two padded forwards of the batch (queries, then positives);
  MNTP = one padded forward, logits for every position, shifted cross-entropy (what
  LlamaForCausalLM computes in llm2vec's run_mntp.py); supervised = three padded forwards
  (queries with their instruction, positives, hard negatives), scale 50 (run_supervised.py).
  l2v packs the three in one forward; the query's instruction is attended, not pooled.
Before timing, both compute the loss (SimCSE: and the embeddings) of the first batch with
dropout off: `same_result` says they agree (same weights, same data, same work).

Reported per side: real tokens/s (tokens of the texts, padding not counted), padded tokens,
seconds per step (median of the timed steps), peak memory of the steps, warm-up included
(CUDA: the peak allocated above the start; CPU: the peak resident set above the start, sampled
every 2 ms; with --exact-rss glibc returns freed blocks of 64 KiB or more to the OS, without it
memory freed by an earlier side or step may stay resident and the second reading is low),
and l2v's speed-up and memory ratio. Sentence lengths are seeded log-normal (median
--median-length, clipped to [4, --max-length]); BOS is token 1, never masked or pooled.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import threading
import time

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import write_report

IMPLS = ("l2v", "hf-peft")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="smollm2-135m",
                   help="model shape with random weights (bench/workloads.MODEL_SHAPES)")
    p.add_argument("--model", default=None,
                   help="real weights instead: smollm2 (the embedded GGUF) or a HF model dir")
    p.add_argument("--stage", default="simcse", choices=("simcse", "mntp", "supervised"))
    p.add_argument("--batch-size", type=int, default=32,
                   help="sentences (supervised: query, positive, negative triples) per step")
    p.add_argument("--instruction-length", type=int, default=8,
                   help="supervised: tokens of the query's instruction (attended, not pooled)")
    p.add_argument("--median-length", type=int, default=30, help="median sentence tokens")
    p.add_argument("--max-length", type=int, default=128, help="longest sentence (tokens)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per side")
    p.add_argument("--gradient-checkpointing", action="store_true", help="on both sides")
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated: l2v,hf-peft")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 (default bf16 on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--exact-rss", action="store_true",
                   help="CPU: glibc returns freed blocks to the OS, so the peak RSS is that of "
                   "each side alone (the page faults slow both sides: time in a separate run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true",
                   help="CI: the 2-layer SmolLM2-shaped model, 8 sentences, 1 timed step")
    p.add_argument("--out", default=None, help="report folder (default bench/results)")
    p.add_argument("--name", default="train", help="report file name")
    args = p.parse_args(argv)
    if args.smoke:
        args.shape, args.model, args.batch_size, args.steps = "smoke", None, 8, 1
        args.median_length, args.max_length = 12, 24
        if args.stage == "supervised":  # three texts per example
            args.batch_size, args.instruction_length = 4, 4
    return args


# ------------------------------------------------------------------------------ memory
class PeakRSS:
    """The peak resident set size of this process while active (sampled every 2 ms)."""

    def __enter__(self):
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())
        return False


def release_freed_memory() -> bool:
    """glibc: serve every allocation of 64 KiB or more by mmap and unmap it when freed, so the
    resident set follows live memory (otherwise freed heap memory stays resident and a second
    side's peak, or a step after a warm-up, reads low). False where that cannot be set."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, 65536))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ------------------------------------------------------------------------------ data
def make_lengths(n: int, median: int, longest: int, rng: np.random.Generator) -> list[int]:
    x = np.exp(rng.normal(np.log(median), 0.5, size=n))
    return np.clip(np.round(x), 4, longest).astype(int).tolist()


def make_batches(args, vocab: int, steps: int) -> list[list[list[int]]]:
    """Per step, batch_size texts of token ids: BOS (1) + random ids in [3, vocab).
    Supervised: 3 x batch_size texts (queries, positives, negatives), each query with
    --instruction-length instruction tokens after its BOS."""
    rng = np.random.default_rng(args.seed)
    out = []
    per_step = args.batch_size * (3 if args.stage == "supervised" else 1)
    for _ in range(steps):
        lengths = make_lengths(per_step, args.median_length, args.max_length, rng)
        texts = [[1] + rng.integers(3, vocab, size=n - 1).tolist() for n in lengths]
        if args.stage == "supervised":
            k = args.instruction_length
            for i in range(args.batch_size):
                texts[i] = texts[i][:1] + rng.integers(3, vocab, size=k).tolist() + texts[i][1:]
        out.append(texts)
    return out


def pool_start(args, i: int) -> int:
    """First pooled token of text i of a step: after the BOS, and after a query's
    instruction (supervised)."""
    if args.stage == "supervised" and i < args.batch_size:
        return 1 + args.instruction_length
    return 1


# ------------------------------------------------------------------------------ the sides
def load_weights(args, device, dtype):
    """(hf_config object, HF *Model state dict, lm_head or None when tied)."""
    from bench.models import hf_config_object, random_state_dict
    from bench.workloads import model_shape

    if args.model is not None:
        from l2v_models.checkpoint import load_model, to_hf_state_dict

        loaded = load_model(args.model, dtype=dtype, device=device, backend="torch")
        state = {k: v.clone() for k, v in to_hf_state_dict(loaded.model).items()}
        return loaded.hf_config, state, None
    cfg = model_shape(args.shape)
    state = random_state_dict(cfg, device, dtype, args.seed)
    state = {k.removeprefix("model."): v for k, v in state.items()}
    lm_head = None
    if not cfg.get("tie_word_embeddings", False):
        g = torch.Generator(device=device).manual_seed(args.seed + 7)
        lm_head = (torch.randn(cfg["vocab_size"], cfg["hidden_size"], generator=g,
                               device=device) * 0.02).to(dtype)  # fmt: skip
    return hf_config_object(cfg), state, lm_head


class L2VSide:
    name = "l2v"

    def __init__(self, args, hf_config, state, lm_head, device, dtype):
        from l2v_models.checkpoint import Loaded, from_hf_state_dict
        from l2v_models.config import ModelConfig
        from l2v_models.train.trainer import TrainConfig, Trainer

        config = ModelConfig.from_hf_config(hf_config)
        model = from_hf_state_dict(config, state, dtype=dtype, device=device, backend="torch")
        loaded = Loaded(model, config, None, "", hf_config)
        head = lm_head if lm_head is not None else model.embed
        tc = TrainConfig(args.stage, steps=10**6, lr=1e-4, warmup_steps=0, seed=args.seed,
                         gradient_checkpointing=args.gradient_checkpointing,
                         mask_policy="bert", mask_prob=0.2)  # fmt: skip
        self.trainer = Trainer(loaded, tc, lm_head=head, mask_token_id=2)
        self.args = args

    def batch(self, texts):
        from l2v_models.packing import TokenizedTexts

        if self.trainer.config.stage == "mntp":
            return self.trainer.collate(texts)
        starts = [pool_start(self.args, i) for i in range(len(texts))]
        if self.trainer.config.stage == "supervised":  # one item per (query, pos, neg)
            n = self.args.batch_size
            items = [TokenizedTexts([texts[j] for j in (i, n + i, 2 * n + i)],
                                    [starts[j] for j in (i, n + i, 2 * n + i)],
                                    [len(texts[j]) - starts[j] for j in (i, n + i, 2 * n + i)])
                     for i in range(n)]  # fmt: skip
            return self.trainer.collate(items)
        items = [TokenizedTexts([t], [1], [len(t) - 1]) for t in texts]  # BOS not pooled
        return self.trainer.collate(items)

    def loss(self, batch) -> float:
        self.trainer.train(False)
        with torch.no_grad():
            return self.trainer.loss(batch).item()

    def embed(self, batch) -> torch.Tensor:
        """Pooled fp32 rows of the batch's first copy, dropout off."""
        from l2v_models.train.objectives import pooled_rows, train_forward

        self.trainer.train(False)
        with torch.no_grad():
            b = batch.to(self.trainer.model.device)
            pooled = pooled_rows(self.trainer.model, train_forward(self.trainer.model, b.packed),
                                 b.packed)  # fmt: skip
        return pooled[: batch.n].cpu()

    def step(self, batch):
        self.trainer.train_step(batch)

    def real_tokens(self, batch) -> int:
        return batch.num_tokens

    def padded_tokens(self, batch) -> int:
        return batch.num_tokens


class HFPeftSide:
    name = "hf-peft"

    def __init__(self, args, hf_config, state, lm_head, device, dtype):
        from peft import LoraConfig, get_peft_model

        from l2v_models.hf_compat import build_hf_model

        hf_config = type(hf_config).from_dict(hf_config.to_dict())
        if args.stage == "simcse":
            hf_config.attention_dropout = 0.3  # llm2vec's simcse_dropout
        self.args = args
        model = build_hf_model(hf_config, state, dtype=dtype, device=device)
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        self.model = get_peft_model(model, LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.05, bias="none",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                            "down_proj"]))  # fmt: skip
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=0.0)
        self.lm_head = lm_head if lm_head is not None else state["embed_tokens.weight"]
        self.stage, self.device = args.stage, device

    def _padded(self, texts, side: str):
        L = max(len(t) for t in texts)
        ids = torch.full((len(texts), L), 0, dtype=torch.long)
        mask = torch.zeros(len(texts), L, dtype=torch.long)
        for i, t in enumerate(texts):
            sl = slice(L - len(t), L) if side == "left" else slice(0, len(t))
            ids[i, sl] = torch.as_tensor(t)
            mask[i, sl] = 1
        return ids.to(self.device), mask.to(self.device)

    def batch(self, texts):
        """The l2v side's batch, re-laid out the way llm2vec feeds transformers."""
        return texts

    def _pooled(self, texts, starts) -> torch.Tensor:
        """One padded forward (left padding, llm2vec's tokenizer), mean over each text's tokens
        from starts[i] on (llm2vec's embed_mask) -> fp32 [len(texts), H]."""
        ids, mask = self._padded(texts, "left")
        L = ids.shape[1]
        pool = mask.clone()
        for i, (t, s) in enumerate(zip(texts, starts, strict=True)):
            pool[i, L - len(t) : L - len(t) + s] = 0
        h = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        w = pool.unsqueeze(-1).to(h.dtype)
        return ((h * w).sum(1) / w.sum(1)).float()

    def _loss(self, l2v_batch, texts, embed_only: bool = False):
        if self.stage == "supervised":  # queries, positives, negatives: three forwards
            n = self.args.batch_size
            reps = [self._pooled(texts[k * n : (k + 1) * n],
                                 [pool_start(self.args, i) for i in range(k * n, (k + 1) * n)])
                    for k in range(3)]  # fmt: skip
            if embed_only:
                return reps[0]
            q = F.normalize(reps[0], dim=-1)
            d = F.normalize(torch.cat(reps[1:]), dim=-1)
            scores = q @ d.t() * 50.0
            return F.cross_entropy(scores, torch.arange(n, device=scores.device))
        if self.stage == "simcse":  # two padded forwards, left padding (llm2vec's tokenizer)
            ids, mask = self._padded(texts, "left")
            pool = mask.clone()
            first = (mask.cumsum(1) == 1) & (mask == 1)  # BOS is not pooled
            pool[first] = 0
            reps = []
            for _ in range(2):
                h = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
                w = pool.unsqueeze(-1).to(h.dtype)
                reps.append(((h * w).sum(1) / w.sum(1)).float())
            if embed_only:
                return reps[0]
            q, d = F.normalize(reps[0], dim=-1), F.normalize(reps[1], dim=-1)
            scores = q @ d.t() * 20.0
            return F.cross_entropy(scores, torch.arange(len(texts), device=scores.device))
        # MNTP: right padding (transformers' collator), logits everywhere, shifted CE.
        l2v_batch = l2v_batch.chunks[0]
        masked = l2v_batch.packed.input_ids.long()
        cu = l2v_batch.packed.cu_seqlens.tolist()
        new_texts = [masked[cu[i] : cu[i + 1]].tolist() for i in range(len(cu) - 1)]
        ids, mask = self._padded(new_texts, "right")
        labels = torch.full_like(ids, -100)
        rows = (l2v_batch.predict_from + 1).tolist()
        seq = np.searchsorted(np.asarray(cu), rows, side="right") - 1
        for r, s, label in zip(rows, seq.tolist(), l2v_batch.labels.tolist(), strict=True):
            labels[s, r - cu[s]] = label
        h = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        logits = (h @ self.lm_head.t()).float()
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                               labels[:, 1:].reshape(-1), ignore_index=-100)  # fmt: skip

    def loss(self, pair) -> float:
        self.model.eval()
        with torch.no_grad():
            return self._loss(*pair).item()

    def embed(self, pair) -> torch.Tensor:
        self.model.eval()
        with torch.no_grad():
            return self._loss(*pair, embed_only=True).cpu()

    def step(self, pair):
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._loss(*pair)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()

    def real_tokens(self, pair) -> int:
        return pair[0].num_tokens

    def padded_tokens(self, pair) -> int:
        texts = pair[1]
        if self.stage == "supervised":
            n = self.args.batch_size
            return sum(n * max(len(t) for t in texts[k * n : (k + 1) * n]) for k in range(3))
        return (2 if self.stage == "simcse" else 1) * len(texts) * max(len(t) for t in texts)


# ------------------------------------------------------------------------------ run
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    exact_rss = release_freed_memory() if args.exact_rss else False
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, None: None}[args.dtype]
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    impls = [i for i in args.impls.split(",") if i]
    torch.manual_seed(args.seed)
    weights = load_weights(args, device, dtype)
    vocab = weights[0].vocab_size
    texts = make_batches(args, vocab, args.warmup + args.steps)
    l2v = L2VSide(args, *weights, device, dtype)
    # The l2v side builds every batch (MNTP masking drawn once) so both sides see the same.
    batches = [l2v.batch(t) for t in texts]
    losses, embeddings, rows = {}, {}, []
    sides = {"l2v": lambda: l2v, "hf-peft": lambda: HFPeftSide(args, *weights, device, dtype)}
    for name in impls:
        side = sides[name]()
        inputs = batches if name == "l2v" else list(zip(batches, texts, strict=True))
        losses[name] = side.loss(inputs[0])
        if args.stage != "mntp":
            embeddings[name] = side.embed(inputs[0])
        gc.collect()
        _sync(device)
        times, cpu_times = [], []
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            start_mem = torch.cuda.memory_allocated(device)
        with PeakRSS() as rss:  # from the first (warm-up) step on
            for b in inputs[: args.warmup]:
                side.step(b)
            _sync(device)
            for b in inputs[args.warmup :]:
                t0, c0 = time.perf_counter(), time.process_time()
                side.step(b)
                _sync(device)
                times.append(time.perf_counter() - t0)
                cpu_times.append(time.process_time() - c0)
        peak = (torch.cuda.max_memory_allocated(device) - start_mem if device.type == "cuda"
                else rss.peak - rss.start)  # fmt: skip
        timed = inputs[args.warmup :]
        real = sum(side.real_tokens(b) for b in timed)
        padded = sum(side.padded_tokens(b) for b in timed)
        rows.append({
            "impl": name, "stage": args.stage, "model": args.model or args.shape,
            "batch_size": args.batch_size, "steps": len(times),
            "s_per_step": statistics.median(times),
            "real_tokens_per_s": real / sum(times),
            "real_tokens_per_cpu_s": real / max(sum(cpu_times), 1e-9),
            "real_tokens": real, "padded_tokens": padded,
            "peak_mem_MiB": peak / 2**20, "first_loss": losses[name],
            "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
            "rss_follows_frees": exact_rss,
        })  # fmt: skip
        if name != "l2v":
            del side
        gc.collect()
    by = {r["impl"]: r for r in rows}
    if "l2v" in by and "hf-peft" in by:
        ours, base = by["l2v"], by["hf-peft"]
        ours["speedup"] = ours["real_tokens_per_s"] / base["real_tokens_per_s"]
        ours["cpu_speedup"] = ours["real_tokens_per_cpu_s"] / base["real_tokens_per_cpu_s"]
        ours["mem_ratio"] = ours["peak_mem_MiB"] / max(base["peak_mem_MiB"], 1e-9)
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        agree = abs(ours["first_loss"] - base["first_loss"]) <= tol * max(1.0,
                                                                          abs(base["first_loss"]))
        if embeddings:  # SimCSE's loss is ~0 without dropout: compare the embeddings too
            a, b = embeddings["l2v"].double(), embeddings["hf-peft"].double()
            agree = agree and ((a - b).norm() / b.norm()).item() <= (
                1e-4 if dtype == torch.float32 else 3e-2)
        for r in rows:
            r["same_result"] = agree
    notes = ("Real tokens/s counts the texts' tokens only (SimCSE: both copies). Peak memory: "
             "CUDA peak allocated above the start of the timed steps; CPU peak RSS above it.")
    write_report(args.name, rows, args.out, title=f"Training step: l2v vs HF + PEFT ({args.stage})",
                 notes=notes)  # fmt: skip
    for r in rows:
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()
               if k not in ("torch", "triton", "cuda", "commit", "date")})  # fmt: skip
    return {"rows": rows, "config": vars(args)}


if __name__ == "__main__":
    main()
