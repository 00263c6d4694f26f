"""An l2v model as an MTEB (v2) encoder: `mteb.evaluate(L2VMtebEncoder(...), tasks)`.

    import mteb
    from l2v_models.eval.mteb_model import L2VMtebEncoder

    model = L2VMtebEncoder()                                # the default smollm2-llm2vec
    model = L2VMtebEncoder("MNTP_DIR", peft="SUPERVISED_DIR", device="cuda")
    results = mteb.evaluate(model, mteb.get_tasks(tasks=["STS16", "SciFact"]), cache=None)

MTEB's encoder protocol (mteb.models.models_protocols.EncoderProtocol): `encode(inputs, *,
task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs)` -> an array [N, D], where
inputs is a DataLoader of batches {"text": [...], ...}; `similarity` / `similarity_pairwise`
(cosine) and `mteb_model_meta` come from mteb's AbsEncoder.

What each text is given:
- a model with llm2vec's text rules gets, per task and side, the instruction LLM2Vec's paper
  used (l2v_models.eval.mteb_instructions.instruction_for: the task's own entry, its type's,
  else the task's MTEB prompt; documents of a retrieval corpus get none), joined by llm2vec's
  rules, as [instruction, text] pairs;
- a sentence-transformers folder gets the named prompt MTEB would pick from its own prompts
  (task-name-side, task name, type-side, type, side: mteb.models.get_prompt_name), else its
  default prompt, exactly as mteb runs a SentenceTransformer.
`instructions=False` gives every text none (a model's default prompt still applies).

Batching: the texts of an `encode` call are gathered from MTEB's DataLoader and embedded in one
`Embedder.encode` call, so l2v packs them into token-budget forward passes (no padding, sorted
by length) whatever MTEB's batch_size; rows come back in MTEB's order, float32.

Imports mteb (the `eval` extra) at import time; nothing else in l2v imports this module.
"""

from __future__ import annotations

import re

import numpy as np
from mteb.models.abs_encoder import AbsEncoder, get_prompt_name
from mteb.models.model_meta import ModelMeta, ScoringFunction

from l2v_models import text_rules as tr
from l2v_models.eval.mteb_instructions import instruction_for


class L2VMtebEncoder(AbsEncoder):
    """MTEB's encoder protocol over an l2v_models.embedder.Embedder (see the module docstring).

    model_name: what Embedder.from_pretrained takes (None: the default encoder); revision is
    accepted for MTEB's loader signature and ignored. peft, device and load_kwargs (dtype,
    backend, attention, max_length, pooling_mode, max_tokens_per_batch...) go to
    Embedder.from_pretrained; embedder: an already loaded Embedder instead. name: the model's
    name in MTEB's results (default: l2v/<model>). instructions: False gives no instruction.
    """

    def __init__(self, model_name=None, revision: str | None = None, *, device=None, peft=None,
                 embedder=None, name: str | None = None, instructions: bool = True,
                 **load_kwargs):  # fmt: skip
        from l2v_models.checkpoint import model_label

        if embedder is None:
            from l2v_models.embedder import Embedder

            embedder = Embedder.from_pretrained(model_name, peft, device=device, **load_kwargs)
        elif load_kwargs or peft is not None:
            raise TypeError("pass either a loaded embedder or the model to load, not both")
        self.model = embedder
        self.instructions = bool(instructions)
        label = name or "l2v/" + _name_part(model_label(model_name, peft))
        self.mteb_model_meta = ModelMeta.create_empty({
            "name": label if "/" in label else f"l2v/{label}",
            "revision": revision or "l2v",
            "embed_dim": embedder.dimension,
            "max_tokens": getattr(embedder.rules, "max_length", None),
            "similarity_fn_name": ScoringFunction.COSINE,
            "use_instructions": self.instructions,
            "framework": ["PyTorch"],
            "n_parameters": sum(p.numel() for p in embedder.model.parameters()),
        })  # fmt: skip

    @property
    def llm2vec_rules(self) -> bool:
        """Whether the model follows llm2vec's rules (instructions per text) rather than a
        sentence-transformers folder's (named prompts)."""
        return isinstance(self.model.rules, tr.Llm2vecRules)

    def instruction(self, task_metadata, prompt_type=None) -> str:
        """The llm2vec instruction this model gives the texts of a task's side ("" for none)."""
        if not self.instructions:
            return ""
        side = getattr(prompt_type, "value", prompt_type)
        return instruction_for(task_metadata.name, task_metadata.type, task_metadata.prompt, side)

    def prompt_name(self, task_metadata, prompt_type=None) -> str | None:
        """The sentence-transformers folder's prompt for a task's side, as mteb picks it (None:
        the folder's default prompt, if any)."""
        if not self.instructions or not self.model.prompts:
            return None
        return get_prompt_name(self.model.prompts, task_metadata, prompt_type)

    def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str, prompt_type=None,
               **kwargs) -> np.ndarray:  # fmt: skip
        """MTEB's DataLoader of {"text": [...]} batches -> float32 [N, D] in its order."""
        texts = [text for batch in inputs for text in batch["text"]]
        if not texts:
            return np.zeros((0, self.model.dimension), dtype=np.float32)
        if self.llm2vec_rules:
            instruction = self.instruction(task_metadata, prompt_type)
            items = [[instruction, t] for t in texts] if instruction else texts
            rows = self.model.encode(items, show_progress_bar=False)
        else:
            rows = self.model.encode(texts, prompt_name=self.prompt_name(task_metadata,
                                                                         prompt_type),
                                     show_progress_bar=False)  # fmt: skip
        return rows.numpy().astype(np.float32, copy=False)


def _name_part(label: str) -> str:
    """A model label as the last part of an MTEB model name (no slashes or spaces)."""
    tail = label.rstrip("/").split("/")[-1] or "model"
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", tail)
