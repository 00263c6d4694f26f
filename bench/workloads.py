"""Model shapes and seeded token-id workloads for the end-to-end benchmark (bench/e2e.py), and
the words the serving benchmarks draw their texts from.

Workloads are token ids, not strings: both sides of the comparison (the llm2vec-style Hugging
Face baseline and our encoder) receive the very same ids, so no tokenizer or hub is needed and
tokenization cost is left out of both. A text is `[BOS] + instruction + text`; llm2vec's embed
mask is "the last N tokens" (N = the text's own token count), so each text carries `n_pool`.

MODEL_SHAPES are the `config.json` contents of the real checkpoints (only the fields the models
read); FLOP and byte counts below are derived from them, never hard-coded.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np

# The text workloads of the serving benchmarks (bench/serve.py, bench/serve_scale.py): queries
# carry this retrieval instruction, and texts are drawn from this vocabulary of common words.
QUERY_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
WORDS = (
    "the of and to in is was for on that with as by at from it an be this are or which time "
    "year people way day man thing woman life child world school state family student group "
    "country problem hand part place case week company system program question work government "
    "number night point home water room mother area money story fact month lot right study book "
    "eye job word business issue side kind head house service friend father power hour game line"
).split()

# The config.json of each published base model (fields that shape the network).
MODEL_SHAPES: dict[str, dict] = {
    "mistral-7b": {  # mistralai/Mistral-7B-v0.1 (base of McGill-NLP/LLM2Vec-Mistral-7B-*)
        "_name_or_path": "mistralai/Mistral-7B-v0.1",
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "vocab_size": 32000,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
    "llama-2-7b": {  # meta-llama/Llama-2-7b-chat-hf (LLM2Vec-Llama-2-7b-chat-hf-*)
        "_name_or_path": "meta-llama/Llama-2-7b-chat-hf",
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "vocab_size": 32000,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
    },
    "sheared-llama-1.3b": {  # princeton-nlp/Sheared-LLaMA-1.3B (LLM2Vec-Sheared-LLaMA-*)
        "_name_or_path": "princeton-nlp/Sheared-LLaMA-1.3B",
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 5504,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "vocab_size": 32000,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    },
    "smollm2-135m": {  # HuggingFaceTB/SmolLM2-135M (the embedded default model's shape)
        "_name_or_path": "HuggingFaceTB/SmolLM2-135M",
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "hidden_act": "silu",
        "initializer_range": 0.041666666666666664,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-05,
        "rope_theta": 100000.0,
        "rope_scaling": None,
        "vocab_size": 49152,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
    },
}

# The smoke run (CPU, CI): SmolLM2's widths and GQA 9/3, two layers and a small vocabulary.
SMOKE_SHAPE = {
    **MODEL_SHAPES["smollm2-135m"],
    "_name_or_path": "smoke/SmolLM2-135M-2-layers",
    "num_hidden_layers": 2,
    "vocab_size": 512,
}


def model_shape(name: str) -> dict:
    """A deep copy of the config dict for `name` ("smoke" gives the tiny CPU shape)."""
    if name == "smoke":
        return copy.deepcopy(SMOKE_SHAPE)
    if name not in MODEL_SHAPES:
        raise ValueError(f"unknown model shape {name!r}; choose from {sorted(MODEL_SHAPES)}")
    return copy.deepcopy(MODEL_SHAPES[name])


def head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def linear_params(cfg: dict) -> int:
    """Parameters of the matmuls of all layers (what every token multiplies through)."""
    h, i, d = cfg["hidden_size"], cfg["intermediate_size"], head_dim(cfg)
    hq, hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    per_layer = h * (hq + 2 * hkv) * d + hq * d * h + 3 * h * i
    return cfg["num_hidden_layers"] * per_layer


def weight_bytes(cfg: dict, bytes_per_param: int = 2) -> int:
    """Bytes a forward pass must read at least once: every layer's weights and norms.

    The embedding table is left out (a batch reads only its own rows) and so is the LM head
    (an encoder never uses it).
    """
    norms = (2 * cfg["num_hidden_layers"] + 1) * cfg["hidden_size"]
    return (linear_params(cfg) + norms) * bytes_per_param


def forward_flops(cfg: dict, lengths) -> float:
    """Useful FLOPs of one forward over texts of these lengths (real tokens only).

    2 FLOPs per multiply-add: the layer matmuls (2 * params per token) plus bidirectional
    attention (QK^T and PV: 2 * 2 * n^2 * head_dim per head per text). Padding, norms, RoPE and
    pooling are not counted: MFU is measured against useful work.
    """
    lengths = np.asarray(lengths, dtype=np.float64)
    hq, d = cfg["num_attention_heads"], head_dim(cfg)
    matmul = 2.0 * linear_params(cfg) * lengths.sum()
    attention = 4.0 * cfg["num_hidden_layers"] * hq * d * float((lengths**2).sum())
    return matmul + attention


# --------------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------------

# How many texts a 7B-class model encodes per workload; smaller models get more (SIZE_SCALE) so
# that each timed pass still runs for a second or more on an H100.
WORKLOAD_TEXTS = {"queries": 2048, "passages": 1024, "long": 256}
SIZE_SCALE = {"mistral-7b": 1, "llama-2-7b": 1, "sheared-llama-1.3b": 2, "smollm2-135m": 4}
QUICK_FRACTION = 0.5
SMOKE_TEXTS = 4
WORKLOADS = tuple(WORKLOAD_TEXTS)

INSTRUCTION_TOKENS = 16  # ~ "Given a web search query, retrieve relevant passages that answer..."
MAX_LENGTH = 512  # llm2vec's default max_length for these models


@dataclass
class Workload:
    """Texts as token ids; each text pools its last `n_pool[i]` tokens (llm2vec's embed mask)."""

    name: str
    ids: list[list[int]]
    n_pool: list[int]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> list[int]:
        return [len(t) for t in self.ids]

    @property
    def tokens(self) -> int:
        return sum(len(t) for t in self.ids)

    def subset(self, idx) -> Workload:
        return Workload(self.name, [self.ids[i] for i in idx], [self.n_pool[i] for i in idx])


def _rng(name: str, seed: int) -> np.random.Generator:
    # One stream per workload so adding a workload never changes another one's texts.
    return np.random.default_rng([seed, sum(ord(c) * 31**k for k, c in enumerate(name)) % 2**31])


def _random_ids(rng: np.random.Generator, n: int, vocab: int) -> list[int]:
    # Ids 0..2 are special (unk/bos/eos or pad) in all four vocabularies: leave them out.
    return rng.integers(3, vocab, size=n).tolist()


def make_workload(name: str, n_texts: int, cfg: dict, seed: int = 0) -> Workload:
    """Seeded workload `name` ("queries", "passages" or "long") of n_texts for config cfg.

    - queries: BOS + a fixed instruction (16 tokens) + 10-40 query tokens; pools the query.
    - passages: BOS + a log-normal number of tokens (median ~120, clipped to [8, 511]).
    - long: BOS + 399-511 tokens (400-512 tokens in all).
    Texts without an instruction pool everything but BOS (llm2vec's skip_instruction).
    """
    rng = _rng(name, seed)
    vocab, bos = cfg["vocab_size"], cfg.get("bos_token_id", 1)
    ids, n_pool = [], []
    if name == "queries":
        instruction = _random_ids(_rng("instruction", seed), INSTRUCTION_TOKENS, vocab)
        for n in rng.integers(10, 41, size=n_texts):
            ids.append([bos, *instruction, *_random_ids(rng, int(n), vocab)])
            n_pool.append(int(n))
    elif name == "passages":
        raw = rng.lognormal(mean=math.log(120), sigma=0.6, size=n_texts)
        for n in np.clip(np.round(raw), 8, MAX_LENGTH - 1).astype(int):
            ids.append([bos, *_random_ids(rng, int(n), vocab)])
            n_pool.append(int(n))
    elif name == "long":
        for n in rng.integers(MAX_LENGTH - 113, MAX_LENGTH, size=n_texts):
            ids.append([bos, *_random_ids(rng, int(n), vocab)])
            n_pool.append(int(n))
    else:
        raise ValueError(f"unknown workload {name!r}; choose from {WORKLOADS}")
    return Workload(name, ids, n_pool)


def n_texts(workload: str, model: str, *, quick: bool = False, smoke: bool = False) -> int:
    """How many texts `model` encodes for `workload` in a run of this kind."""
    if smoke:
        return SMOKE_TEXTS
    n = WORKLOAD_TEXTS[workload] * SIZE_SCALE.get(model, 1)
    return max(8, int(n * QUICK_FRACTION)) if quick else n
