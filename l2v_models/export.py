"""Export an LLM2Vec model as a sentence-transformers folder that other software loads without l2v.

    from l2v_models import LLM2Vec
    from l2v_models.export import export_sentence_transformers

    encoder = LLM2Vec.from_pretrained()                   # any llm2vec-rule model l2v runs
    report = export_sentence_transformers(
        encoder, "smollm2-st", prompts={"query": "Retrieve a passage that answers the question"})
    print("\\n".join(report.lines()))                    # what was written, what was measured
    # then, anywhere: SentenceTransformer("smollm2-st").encode(texts)

What the folder holds:
- config.json, model.safetensors, the tokenizer: the merged weights `LLM2Vec.save` writes (Hugging
  Face *Model* names, the encoder's dtype). config.json says how the model attends as
  transformers >= 5.2 reads it: `is_causal: false` (Llama, Mistral, Qwen2, Qwen3, Gemma) or
  `use_bidirectional_attention: true` (Gemma-3); a causal model (llm2vec's Qwen2) says nothing.
- modules.json: Transformer (sentence_bert_config.json: max_seq_length = llm2vec's max_length,
  plain text only, so no chat template is applied), Pooling (1_Pooling/config.json), optionally
  Normalize; config_sentence_transformers.json: the instructions as named prompts.
- l2v_export.json (source, settings, the notes and checks below) and a short README.md.

llm2vec's rules, written in sentence-transformers' terms (l2v_models.text_rules.Llm2vecRules):
- an instruction I becomes the prompt `I.strip() + " "` (llm2vec's join) with `include_prompt:
  false`. Where the tokenizer makes the prompt's trailing space a token of its own (byte-level
  BPE: in the sequence the space belongs to the text's first token), the prompt ends in JOIN
  (U+FDD1) instead, which a normalizer added in front of the tokenizer's own turns into that
  space before a text and deletes at the end of the prompt tokenized alone, so the prompt counts
  the instruction's tokens. llm2vec pools the LAST N tokens, N = the text's token count when
  tokenized alone, sentence-transformers every token after the prompt: they still differ where
  a text's first word splits otherwise alone than after a space (noted and measured);
- a BOS token the tokenizer prepends is attended to but not pooled by llm2vec. sentence-
  transformers leaves it out of the mean only when a prompt is given, so the export writes a
  prompt that stands for "no instruction": U+FDD0 (a Unicode noncharacter), which a normalizer
  added in front of the tokenizer's own deletes, made the default prompt and the "query" /
  "document" prompts; the BOS loses its special-token role (sentence-transformers would not
  count a special token as the prompt's). Token ids are unchanged; embeddings are then exact;
- a chat template (picked by the config's `_name_or_path`) becomes the prompt's prefix; its
  suffix, and `eos_token` pooling's end-of-sequence suffix, cannot be written (noted);
- `doc_max_length` (llm2vec cuts a text over it by words) cannot be written: the folder cuts
  at max_seq_length tokens only (noted);
- pooling: mean -> mean, weighted_mean -> weightedmean (its weights count every token, so it
  differs; noted), eos_token / last_token -> lasttoken, bos_token -> cls.

Every export is measured: each prompt (and no prompt) on PROBE_TEXTS plus the caller's texts,
the original rules against the folder's (l2v_models.text_rules.SentenceTransformersRules, which
equal sentence-transformers') on the same weights; a text counts as exact when its token ids and
pooled tokens are identical (then its row is the same by construction; the others are embedded
both ways and compared by cosine). Differences are logged as a warning with the measured cosines
(`strict=True` refuses instead). The folder is built beside `output` and renamed into place
only when complete; an existing folder is replaced only with `force=True`, and only if it is
empty or an earlier export (it holds l2v_export.json).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from l2v_models import text_rules as tr
from l2v_models import tokenization as tk

logger = logging.getLogger("l2v_models.export")

EXPORT_FILE = "l2v_export.json"
# Stands for "no instruction" in the exported prompts; the exported tokenizer deletes it.
NO_INSTRUCTION = "\ufdd0"
# Ends an instruction's prompt: a space before a text, nothing at the end of the prompt alone.
JOIN = "\ufdd1"
_PLACEHOLDER = "\ufdd2"  # the text's place when reading llm2vec's frame around it
EXACT_COSINE = 0.99999
ST_MODULES = "sentence_transformers.models"
# How transformers (>= 5.2) is told a family attends bidirectionally: the config key and value.
# Families not listed here are exported only when they attend causally.
BIDIRECTIONAL_CONFIG = {
    "llama": ("is_causal", False),
    "mistral": ("is_causal", False),
    "qwen2": ("is_causal", False),
    "qwen3": ("is_causal", False),
    "gemma": ("is_causal", False),
    "gemma3": ("use_bidirectional_attention", True),
}
_ATTENTION_KEYS = ("is_causal", "use_bidirectional_attention")
# llm2vec pooling mode -> (sentence-transformers mode, include_prompt when skip_instruction).
_POOLING = {"mean": ("mean", False), "weighted_mean": ("weightedmean", True),
            "eos_token": ("lasttoken", True), "last_token": ("lasttoken", True),
            "bos_token": ("cls", True)}  # fmt: skip

# Short English texts of many kinds (queries, sentences, a paragraph, numbers, code, a single
# word, non-ASCII) that every export is measured on.
PROBE_TEXTS = (
    "cat",
    "A cat sits on the mat.",
    "how much protein should a female eat",
    "Stock markets fell sharply today after the central bank raised interest rates.",
    "What is the capital of France?",
    "The mitochondria is the powerhouse of the cell.",
    "Firefighters contained the bushfire before it reached the town, officials said on Monday.",
    "def add(a, b): return a + b",
    "In 1969, Apollo 11 landed on the Moon; 600 million people watched.",
    "Résumé: café, naïve, Zürich.",
    "Why do leaves change colour in autumn?",
    "The committee will meet again next week to review the budget proposal and decide whether "
    "to fund the new library, which residents have requested for years.",
    "ok",
    "Symptoms of dehydration include thirst, dark urine, fatigue and dizziness.",
    "A kitten rests on a rug.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
)


class ExportError(ValueError):
    """A model or output folder the exporter refuses (the message says what to do)."""


@dataclass
class PromptCheck:
    """One prompt measured on the probe texts: the original rules vs the exported folder's.

    name: the exported prompt name (None: no prompt, i.e. the folder's default); instruction:
    the llm2vec instruction it stands for ("" for none); same_tokens: texts whose token ids and
    pooled tokens are identical; min_cosine / mean_cosine: cosine of the two embeddings."""

    name: str | None
    instruction: str
    texts: int
    same_tokens: int
    min_cosine: float
    mean_cosine: float

    @property
    def exact(self) -> bool:
        return self.same_tokens == self.texts or self.min_cosine >= EXACT_COSINE

    def line(self) -> str:
        label = "no prompt" if self.name is None else f"prompt {self.name!r}"
        verdict = "exact" if self.exact else "differs"
        return (f"{label}: {verdict}: {self.same_tokens}/{self.texts} texts with identical tokens, "
                f"cosine min {self.min_cosine:.6f}, mean {self.mean_cosine:.6f}")  # fmt: skip


@dataclass
class ExportReport:
    """What an export wrote and measured (also written as l2v_export.json)."""

    output: str
    source: str
    attention: str
    pooling: str
    max_seq_length: int
    prompts: dict[str, str]
    instructions: dict[str, str]
    default_prompt_name: str | None
    normalize: bool
    notes: list[str] = field(default_factory=list)
    checks: list[PromptCheck] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        """Whether every measured prompt gave the original embeddings."""
        return all(c.exact for c in self.checks)

    def differences(self) -> list[PromptCheck]:
        return [c for c in self.checks if not c.exact]

    def lines(self) -> list[str]:
        """A human summary: what was written, the notes, the measured checks."""
        out = [f"exported {self.source} to {self.output}",
               f"attention: {self.attention}; pooling: {self.pooling}; max_seq_length: "
               f"{self.max_seq_length}" + ("; Normalize" if self.normalize else "")]  # fmt: skip
        if self.prompts:
            shown = ", ".join(self.prompts)
            out.append(f"prompts: {shown}" + (f" (default: {self.default_prompt_name})"
                                              if self.default_prompt_name else ""))  # fmt: skip
        out += [f"note: {n}" for n in self.notes]
        out += [f"check: {c.line()}" for c in self.checks]
        return out

    def to_json(self) -> dict:
        d = asdict(self)
        d["exact"] = self.exact
        return d


# ------------------------------------------------------------------------------ the export
def export_sentence_transformers(
    encoder,
    output,
    *,
    prompts: Mapping[str, str] | None = None,
    default_prompt_name: str | None = None,
    normalize: bool = False,
    force: bool = False,
    strict: bool = False,
    check_texts: Sequence[str] = (),
    source: str | None = None,
    log: Callable[[str], None] | None = None,
) -> ExportReport:
    """Write `encoder` (an l2v_models.LLM2Vec with llm2vec's text rules) as a sentence-
    transformers folder at `output` (see the module docstring) and return the report.

    prompts: {name: llm2vec instruction} written as named prompts. default_prompt_name: the
    prompt used when none is given (default: "no instruction"). normalize: end in a Normalize
    module. force: replace an existing folder (only an empty one or an earlier export).
    strict: refuse (ExportError, nothing written) when a measured prompt differs. check_texts:
    more texts to measure on. source: how the model is named in the report (default: its
    config's name). log: progress messages. Raises ExportError for what cannot be exported.
    """
    rules = _check_encoder(encoder)
    out = check_output(output, force)
    instructions = _check_prompts(prompts, default_prompt_name)
    say = log or (lambda msg: None)
    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.l2v-partial-", dir=parent))
    try:
        say(f"[export] writing the merged weights ({str(encoder.dtype).removeprefix('torch.')})")
        encoder.save(work, save_config=False)
        attention = _write_attention(work, encoder)
        notes = []
        frame0 = _frame(rules, "")
        edits = _edit_tokenizer(work, rules, frame0, instructions)
        notes += edits.notes
        no_instruction = frame0[0] or (NO_INSTRUCTION if edits.no_instruction else "")
        st_prompts, default_name = _st_prompts(rules, instructions, default_prompt_name,
                                               no_instruction, edits.join)  # fmt: skip
        mode, include_prompt = _pooling(rules)
        max_seq_length = _max_seq_length(encoder)
        _write_st_modules(work, encoder.hidden_size, mode, include_prompt, normalize,
                          st_prompts, default_name, max_seq_length)  # fmt: skip
        notes += _rule_notes(rules, instructions, frame0)
        report = ExportReport(
            output=str(out), source=source or _source_name(encoder), attention=attention,
            pooling=f"{rules.pooling_mode} -> {mode}"
            + ("" if include_prompt else " (include_prompt: false)"),
            max_seq_length=max_seq_length, prompts=st_prompts,
            instructions={name: instructions.get(name, "") for name in st_prompts},
            default_prompt_name=default_name, normalize=normalize, notes=notes,
        )  # fmt: skip
        say(f"[export] measuring {len(_check_cases(report))} prompt(s) on "
            f"{len(PROBE_TEXTS) + len(check_texts)} texts")  # fmt: skip
        report.checks = _measure(encoder, work, report, list(PROBE_TEXTS) + list(check_texts))
        if not report.exact and strict:
            raise ExportError(
                "the exported folder would not give l2v's embeddings exactly ("
                + "; ".join(c.line() for c in report.differences())
                + "); nothing was written (drop --strict to export anyway)"
            )
        _write_card(work, report)
        _move_into_place(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if not report.exact:
        logger.warning(
            "the exported folder differs from l2v's embeddings: %s (%s)",
            "; ".join(c.line() for c in report.differences()),
            "; ".join(report.notes) or "see l2v_export.json",
        )
    return report


def _check_encoder(encoder) -> tr.Llm2vecRules:
    rules = getattr(encoder, "rules", None)
    if isinstance(rules, tr.SentenceTransformersRules):
        raise ExportError(
            f"{rules.folder.root} is already a sentence-transformers folder: other software "
            "loads it as it is (copy the folder)"
        )
    if not isinstance(rules, tr.Llm2vecRules) or not hasattr(encoder, "save"):
        raise ExportError(
            "export takes an l2v_models.LLM2Vec loaded with LLM2Vec.from_pretrained, got "
            f"{type(encoder).__name__}"
        )
    if rules.tokenizer is None or not getattr(rules.tokenizer, "is_fast", False):
        raise ExportError(
            "the model has no fast (tokenizers) tokenizer; sentence-transformers needs one "
            "and the export edits it"
        )
    causal = encoder.model.config.causal
    arch = encoder.model.config.arch
    if not causal and arch not in BIDIRECTIONAL_CONFIG:
        raise ExportError(
            f"a bidirectional {arch} model cannot be exported: transformers has no config key "
            "that makes this family attend the way l2v does (supported: "
            f"{', '.join(BIDIRECTIONAL_CONFIG)}; any family attending causally)"
        )
    return rules


def check_output(output, force: bool) -> Path:
    out = Path(output).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file, not a folder; choose another --output")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ExportError(f"{out} exists and is not empty; pass --force to replace it")
        if not (out / EXPORT_FILE).is_file():
            raise ExportError(
                f"{out} is not an earlier export (it has no {EXPORT_FILE}), so --force will not "
                "replace it; choose another --output or delete it yourself"
            )
    return out


def _check_prompts(prompts, default_prompt_name) -> dict[str, str]:
    out = {}
    for name, instruction in (prompts or {}).items():
        if not isinstance(name, str) or not name.strip() or not isinstance(instruction, str):
            raise ExportError(f"a prompt needs a name and an instruction, got {name!r}: "
                              f"{instruction!r}")  # fmt: skip
        if not instruction.strip():
            raise ExportError(f"prompt {name!r}: the instruction is empty")
        if tk.SEPARATOR in instruction or any(m in instruction for m in (NO_INSTRUCTION, JOIN)):
            raise ExportError(f"prompt {name!r}: the instruction holds a reserved character "
                              "sequence")  # fmt: skip
        out[name] = instruction
    if default_prompt_name is not None and default_prompt_name not in out:
        raise ExportError(
            f"the default prompt {default_prompt_name!r} is not one of the prompts "
            f"({', '.join(out) or 'none given'})"
        )
    return out


def _source_name(encoder) -> str:
    name = getattr(encoder, "name_or_path", "") or ""
    return name or f"an l2v {encoder.model.config.arch} model"


# ------------------------------------------------------------------------------ config.json
def _write_attention(folder: Path, encoder) -> str:
    """Say in config.json how the model attends; returns the description for the report."""
    from l2v_models.checkpoint import attention_is_causal

    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    for key in _ATTENTION_KEYS:
        cfg.pop(key, None)
    config = encoder.model.config
    if config.causal:
        described = "causal (config.json sets nothing: transformers' default)"
    else:
        key, value = BIDIRECTIONAL_CONFIG[config.arch]
        cfg[key] = value
        described = f"bidirectional ({key}: {json.dumps(value)})"
    if attention_is_causal("config", config, cfg) != config.causal:  # the reader agrees
        raise AssertionError(f"config.json does not say {described}")
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return described


# ------------------------------------------------------------------------------ text rules
def _frame(rules: tr.Llm2vecRules, instruction: str) -> tuple[str, str]:
    """(prefix, suffix) llm2vec puts around a text given `instruction`: the join, the chat
    template the config's name picks, eos_token pooling's suffix (separator removed)."""
    joined = tk.join_instruction(instruction, _PLACEHOLDER)
    prepared = tk.prepare_for_tokenization(joined, rules.name_or_path, rules.config_family,
                                           rules.pooling_mode)  # fmt: skip
    full = prepared.replace(tk.SEPARATOR, "")
    prefix, _, suffix = full.partition(_PLACEHOLDER)
    return prefix, suffix


def _pooling(rules: tr.Llm2vecRules) -> tuple[str, bool]:
    mode, include_prompt = _POOLING[rules.pooling_mode]
    return mode, include_prompt or not rules.skip_instruction


def _leading_special(tokenizer) -> int | None:
    """The id of the one special token the tokenizer puts before every text (a BOS), or None."""
    with_special = tokenizer("a b")["input_ids"]
    without = tokenizer("a b", add_special_tokens=False)["input_ids"]
    if len(with_special) == len(without) + 1 and with_special[1:] == without:
        return int(with_special[0])
    return None


@dataclass
class _TokenizerEdits:
    """What the exported tokenizer was taught (see the module docstring)."""

    no_instruction: bool = False  # NO_INSTRUCTION is deleted: the prompt of "no instruction"
    join: bool = False  # JOIN is a space before a text and nothing at the end of the input
    notes: list[str] = field(default_factory=list)


def _edit_tokenizer(folder: Path, rules: tr.Llm2vecRules, frame0, instructions) -> _TokenizerEdits:
    """Teach the tokenizer in `folder` the two marks sentence-transformers needs to pool what
    llm2vec pools (only where the pooling leaves the prompt out and the mark is needed; each
    one kept only if the tokenizer then gives the same ids as before): NO_INSTRUCTION for a
    BOS token that is not pooled, JOIN for the space between an instruction and its text."""
    from transformers import AutoTokenizer

    edits = _TokenizerEdits()
    if rules.pooling_mode != "mean" or not rules.skip_instruction:
        return edits  # the prompt's tokens are pooled, or pooling reads one token
    tok = AutoTokenizer.from_pretrained(folder)
    bos = _leading_special(tok)
    token = tok.convert_ids_to_tokens(bos) if bos is not None else None
    want_bos = bos is not None and not frame0[0]  # a template prefix already is a prompt
    if want_bos and bos in (tok.eos_token_id, tok.pad_token_id):
        edits.notes.append(
            f"the tokenizer's first token {token!r} is also its end or padding token, so it "
            "cannot lose its special role: with no prompt, sentence-transformers pools it "
            "(llm2vec does not)"
        )
        want_bos = False
    want_join = bool(instructions) and _space_is_own_token(tok)
    for bos_edit, join_edit in ((want_bos, want_join), (want_bos, False), (False, want_join)):
        if not (bos_edit or join_edit):
            continue
        tok = AutoTokenizer.from_pretrained(folder)
        _add_marks(tok, bos_token=token if bos_edit else None, join=join_edit)
        if _marks_work(tok, bos if bos_edit else None, join_edit):
            tok.save_pretrained(folder)
            edits.no_instruction, edits.join = bos_edit, join_edit
            break
    if want_bos and not edits.no_instruction:
        edits.notes.append(
            f"the tokenizer cannot be given a prompt that stands for no instruction, so with no "
            f"prompt sentence-transformers pools its first token {token!r} (llm2vec does not)"
        )
    if edits.no_instruction:
        edits.notes.append(
            f"the first token {token!r} that the tokenizer prepends is left out of the mean as "
            f"llm2vec does: the prompt {NO_INSTRUCTION!r} (U+FDD0, which the exported tokenizer "
            "deletes) stands for no instruction and is the default; the token is no longer a "
            "special token"
        )
    if edits.join:
        edits.notes.append(
            f"each instruction's prompt ends in {JOIN!r} (U+FDD1) instead of llm2vec's space: "
            "the exported tokenizer reads it as that space before a text and deletes it at the "
            "end of a prompt tokenized alone, so the prompt's token count is the instruction's"
        )
    return edits


def _space_is_own_token(tok) -> bool:
    """Whether "instruction " tokenized alone ends in a token that "instruction text" does not
    have (byte-level BPE: the space joins the next word)."""
    alone = tok("Retrieve the passage: ", add_special_tokens=False)["input_ids"]
    bare = tok("Retrieve the passage:", add_special_tokens=False)["input_ids"]
    return alone != bare


def _add_marks(tok, *, bos_token: str | None, join: bool) -> None:
    from tokenizers import Regex, normalizers

    backend = tok.backend_tokenizer
    current = backend.normalizer
    parts = []
    if join:  # at the end of the input: nothing; elsewhere: the space llm2vec joins with
        parts += [normalizers.Replace(Regex(JOIN + r"\z"), ""), normalizers.Replace(JOIN, " ")]
    if bos_token is not None:
        parts.append(normalizers.Replace(NO_INSTRUCTION, ""))
    if isinstance(current, normalizers.Sequence):
        parts += list(current)
    elif current is not None:
        parts.append(current)
    backend.normalizer = normalizers.Sequence(parts)
    if bos_token is None:
        return
    for role in ("bos_token", "unk_token", "cls_token", "sep_token", "mask_token"):
        if getattr(tok, role, None) == bos_token:
            setattr(tok, role, None)
    extra = list(getattr(tok, "additional_special_tokens", None) or [])
    if bos_token in extra:
        tok.additional_special_tokens = [t for t in extra if t != bos_token]


def _marks_work(tok, bos: int | None, join: bool) -> bool:
    """Whether the marks do what they are for and every other text keeps its ids."""

    def ids(text):
        return tok(text)["input_ids"]

    probes = ["a", "A cat sits on the mat.", " leading space", "x\ny", "Résumé: naïve"]
    if bos is not None:
        if bos in tok.all_special_ids or ids(NO_INSTRUCTION) != [bos]:
            return False
        if any(ids(NO_INSTRUCTION + p) != ids(p) for p in probes):
            return False
    if join:
        instruction = "Retrieve the passage:"
        if ids(instruction + JOIN) != ids(instruction):
            return False
        if any(ids(instruction + JOIN + p) != ids(instruction + " " + p) for p in probes):
            return False
    return True


def _st_prompts(rules, instructions: dict[str, str], default_prompt_name, no_instruction,
                join: bool):  # fmt: skip
    """(sentence-transformers prompts, default prompt name): each instruction as llm2vec's
    prefix (its final space written as JOIN when `join`); the no-instruction prompt as "query"
    / "document" and the default when it is not empty."""
    prompts = {}
    for name, instruction in instructions.items():
        prefix = _frame(rules, instruction)[0]
        if join and prefix.endswith(" "):
            prefix = prefix[:-1] + JOIN
        prompts[name] = prefix
    default = default_prompt_name
    if no_instruction:
        for name in ("query", "document"):
            prompts.setdefault(name, no_instruction)
        if default is None:
            default = "document" if prompts["document"] == no_instruction else None
    return prompts, default


def _max_seq_length(encoder) -> int:
    limit = int(encoder.max_length)
    window = encoder.model.config.sliding_window
    return min(limit, int(window)) if window else limit


def _rule_notes(rules: tr.Llm2vecRules, instructions, frame0) -> list[str]:
    """The llm2vec rules the folder cannot write (measured by the checks)."""
    notes = []
    suffixes = {_frame(rules, i)[1] for i in [""] + list(instructions.values())}
    for suffix in sorted(s for s in suffixes if s):
        why = ("the chat template of " + rules.name_or_path
               if tk.has_chat_template(rules.name_or_path) else "eos_token pooling")
        notes.append(f"llm2vec appends {suffix!r} after each text ({why}); sentence-transformers "
                     "has no suffix, so the folder leaves it out")  # fmt: skip
    if frame0[0]:
        notes.append(f"the chat template's prefix {frame0[0]!r} is the prompt of texts without "
                     "an instruction (the default)")  # fmt: skip
    if instructions and rules.skip_instruction and rules.pooling_mode in ("mean",
                                                                          "weighted_mean"):
        notes.append(
            "with an instruction, llm2vec pools the last N tokens (N = the text's token count "
            "when tokenized alone) and sentence-transformers every token after the prompt; "
            "they differ where the text's first word is split into another number of tokens "
            "alone than after the instruction (e.g. 'Stock' vs ' Stock')"
        )
    if rules.pooling_mode == "weighted_mean":
        notes.append("weighted_mean: llm2vec weights the text's own tokens 1..N, sentence-"
                     "transformers' weightedmean every token by its position")  # fmt: skip
    notes.append(
        f"doc_max_length: llm2vec cuts a text of more than {rules.doc_max_length} tokens by "
        f"words; the folder only cuts each sequence at max_seq_length tokens, so longer texts "
        "differ"
    )
    return notes


# ------------------------------------------------------------------------------ files
def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=True) + "\n")


def _write_st_modules(folder: Path, hidden: int, mode: str, include_prompt: bool,
                      normalize: bool, prompts: dict[str, str], default_name: str | None,
                      max_seq_length: int) -> None:  # fmt: skip
    import sentence_transformers  # noqa: F401 (the folder is for it: refuse early without it)
    import transformers

    modules = [
        {"idx": 0, "name": "0", "path": "", "type": f"{ST_MODULES}.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": f"{ST_MODULES}.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": f"{ST_MODULES}.Normalize"})  # fmt: skip
        (folder / "2_Normalize").mkdir()
    _write_json(folder / "modules.json", modules)
    # Plain text: without modality_config, sentence-transformers would wrap texts in the
    # tokenizer's chat template whenever it has one.
    _write_json(folder / "sentence_bert_config.json", {
        "max_seq_length": max_seq_length, "do_lower_case": False,
        "transformer_task": "feature-extraction",
        "modality_config": {"text": {"method": "forward",
                                     "method_output_name": "last_hidden_state"}},
        "module_output_name": "token_embeddings",
    })  # fmt: skip
    _write_json(folder / "1_Pooling" / "config.json", {
        "embedding_dimension": hidden, "pooling_mode": mode, "include_prompt": include_prompt,
    })  # fmt: skip
    _write_json(folder / "config_sentence_transformers.json", {
        "model_type": "SentenceTransformer", "prompts": prompts,
        "default_prompt_name": default_name, "similarity_fn_name": "cosine",
        "__version__": {"sentence_transformers": sentence_transformers.__version__,
                        "transformers": transformers.__version__,
                        "pytorch": torch.__version__},
    })  # fmt: skip


def _write_card(folder: Path, report: ExportReport) -> None:
    _write_json(folder / EXPORT_FILE, report.to_json())
    lines = [
        "---", "library_name: sentence-transformers", "tags:", "- sentence-transformers",
        "- feature-extraction", "- llm2vec", "---", "",
        f"# {Path(report.output).name}", "",
        f"Exported by l2v (`l2v export`) from {report.source}: the merged weights, the "
        "tokenizer and sentence-transformers modules, loadable without l2v:", "",
        "```python", "from sentence_transformers import SentenceTransformer", "",
        f'model = SentenceTransformer("{Path(report.output).name}")',
        "docs = model.encode_document([\"A cat sits on the mat.\"])",
    ]  # fmt: skip
    named = [n for n, i in report.instructions.items() if i]
    if named:
        lines.append(f'queries = model.encode(["a query"], prompt_name="{named[0]}")')
    lines += ["```", "", "What was written and measured (also in l2v_export.json):", ""]
    lines += [f"- {line}" for line in report.lines()[1:]]
    (folder / "README.md").write_text("\n".join(lines) + "\n")


def _move_into_place(work: Path, out: Path) -> None:
    """Rename the finished folder to `out`; an earlier export there is removed only after."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.l2v-old-", dir=out.parent))
        os.rmdir(old)
        os.replace(out, old)
    os.replace(work, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------ checks
def _check_cases(report: ExportReport) -> list[tuple[str | None, str]]:
    """(prompt name or None, llm2vec instruction) to measure: no prompt, then each distinct
    prompt text."""
    default = report.default_prompt_name
    cases = [(None, report.instructions.get(default, "") if default else "")]
    seen = {report.prompts.get(default, "") if default else ""}
    for name, prompt in report.prompts.items():
        if prompt not in seen:
            seen.add(prompt)
            cases.append((name, report.instructions.get(name, "")))
    return cases


@torch.no_grad()
def _measure(encoder, folder: Path, report: ExportReport, texts: list[str]) -> list[PromptCheck]:
    """The original rules vs the folder's (read back from disk) on the same weights."""
    from transformers import AutoTokenizer

    from l2v_models.embedder import Embedder
    from l2v_models.st_folder import read_st_folder

    st_folder = read_st_folder(folder)
    st_rules = tr.SentenceTransformersRules(
        AutoTokenizer.from_pretrained(st_folder.transformer_dir), st_folder,
        max_position_embeddings=encoder.model.config.max_position_embeddings,
    )  # fmt: skip
    exported = Embedder(encoder.model, st_rules,
                        max_tokens_per_batch=encoder.max_tokens_per_batch)  # fmt: skip
    checks = []
    for name, instruction in _check_cases(report):
        ours = encoder.prepare([[instruction, t] if instruction else t for t in texts]).texts
        theirs = exported.prepare(texts, prompt_name=name).texts
        same = [_same_pool(ours, theirs, i, encoder.rules.pool_mode) for i in range(len(texts))]
        # Identical ids and pooled tokens on the same engine give the same row (batching never
        # changes results), so only the texts that differ are embedded.
        cos = np.ones(len(texts))
        differ = [i for i, s in enumerate(same) if not s]
        if differ:
            a = encoder.embed(_subset(ours, differ))
            b = exported.embed(_subset(theirs, differ))
            cos[differ] = torch.nn.functional.cosine_similarity(a.double(), b.double(),
                                                                dim=1).numpy()  # fmt: skip
        checks.append(PromptCheck(name, instruction, len(texts), int(sum(same)),
                                  float(np.min(cos)), float(np.mean(cos))))  # fmt: skip
    return checks


def _subset(texts, rows: list[int]):
    """The TokenizedTexts of `texts` at `rows`."""
    from l2v_models.packing import TokenizedTexts

    return TokenizedTexts([texts.input_ids[i] for i in rows], texts.pool_starts[rows],
                          texts.pool_counts[rows])  # fmt: skip


def _same_pool(a, b, i: int, mode: str) -> bool:
    """Whether text i has the same token ids and pools the same tokens in both."""
    if list(a.input_ids[i]) != list(b.input_ids[i]):
        return False
    sa, ca = int(a.pool_starts[i]), int(a.pool_counts[i])
    sb, cb = int(b.pool_starts[i]), int(b.pool_counts[i])
    if mode == "last":
        return ca > 0 and cb > 0 and sa + ca == sb + cb
    return (sa, ca) == (sb, cb)
