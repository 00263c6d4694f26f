"""llm2vec 0.2.3 text rules, one test per rule, against a transcription of llm2vec's own code.

`Llm2vecTextRef` below is llm2vec's `LLM2Vec._convert_to_str`, `prepare_for_tokenization` and
`tokenize` transcribed as literally as possible (padded, left side, torch tensors), so the packed
implementation in l2v_models.tokenization is checked against the original, not against itself.
test_encoder.py imports it for the pooling comparison.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Gemma2Config,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from l2v_models import tokenization as tk

SEP = "!@#$%^&*()"


# ----------------------------------------------------------------------------- test tokenizer
def make_bpe_tokenizer(add_bos: bool = True) -> PreTrainedTokenizerFast:
    """A tiny offline byte-level BPE tokenizer that adds a BOS token (like Llama/Mistral), or
    none (like Qwen2/SmolLM2) with add_bos=False.

    Its corpus always has a space before "supercalifragilistic" and "Buddhism", so those words
    are one or two tokens after a space but many tokens at the start of a string: the boundary
    effect behind llm2vec issue 80.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    corpus = [
        "The quick brown fox jumps over the lazy dog.",
        "Retrieve documents that answer the question: what is it",
        " Buddhism religion philosophy" * 5,
        " supercalifragilistic" * 5,
        "hello world, how are you today? I am fine thank you.",
    ] * 20
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>", "<unk>", "[INST]", "[/INST]"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    if add_bos:
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def tok():
    return make_bpe_tokenizer()


# ------------------------------------------------------------- llm2vec 0.2.3, transcribed
class Llm2vecTextRef:
    """llm2vec 0.2.3's LLM2Vec text methods, transcribed (model config replaced by arguments)."""

    def __init__(
        self, tokenizer, name_or_path, hf_config, pooling_mode, max_length, doc_max_length
    ):
        tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        self.tokenizer = tokenizer
        self.name_or_path = name_or_path
        self.config = hf_config
        self.pooling_mode = pooling_mode
        self.max_length = max_length
        self.doc_max_length = doc_max_length

    def _convert_to_str(self, instruction, text):
        kw = dict(
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=self.max_length,
            add_special_tokens=False,
        )
        tokenized_q_length = len(self.tokenizer(text, **kw)["input_ids"][0])
        while tokenized_q_length > self.doc_max_length:
            reduction_ratio = self.doc_max_length / tokenized_q_length
            reduced_length = int(len(text.split()) * reduction_ratio)
            text = " ".join(text.split()[:reduced_length])
            tokenized_q_length = len(self.tokenizer(text, **kw)["input_ids"][0])
        return f"{instruction.strip()} !@#$%^&*(){text}" if instruction else f"!@#$%^&*(){text}"

    def prepare_for_tokenization(self, text):
        name = self.name_or_path
        if name == "meta-llama/Meta-Llama-3-8B-Instruct":
            return "<|start_header_id|>user<|end_header_id|>\n\n" + text.strip() + "<|eot_id|>"
        if name in ["mistralai/Mistral-7B-Instruct-v0.2", "meta-llama/Llama-2-7b-chat-hf"]:
            text = "[INST] " + text.strip() + " [/INST]"
        if name in ["google/gemma-2-9b-it"]:
            text = "<bos><start_of_turn>user\n" + text.strip() + "<end_of_turn>"
        if name in ["Qwen/Qwen2-1.5B-Instruct", "Qwen/Qwen2-7B-Instruct"]:
            text = "<|im_start|>user\n" + text.strip() + "<|im_end|>"
        if self.pooling_mode == "eos_token":
            if name == "meta-llama/Meta-Llama-3-8B":
                text = text.strip() + "<|end_of_text|>"
            elif isinstance(self.config, LlamaConfig) or isinstance(self.config, MistralConfig):
                text = text.strip() + " </s>"
            elif isinstance(self.config, GemmaConfig):
                text = text.strip() + "<eos>"
            elif isinstance(self.config, Qwen2Config):
                text = text.strip() + "<|endoftext|>"
        return text

    def tokenize(self, texts):
        texts_2, original_texts = [], []
        for text in texts:
            t = text.split("!@#$%^&*()")
            texts_2.append(t[1] if len(t) > 1 else "")
            original_texts.append("".join(t))
        original = self.tokenizer(
            original_texts,
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=self.max_length,
        )
        rows = []
        for t_i, t in enumerate(texts_2):
            ids = self.tokenizer(
                [t],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
                add_special_tokens=False,
            )
            e_m = torch.zeros_like(original["attention_mask"][t_i])
            if len(ids["input_ids"][0]) > 0:
                e_m[-len(ids["input_ids"][0]) :] = torch.ones(len(ids["input_ids"][0]))
            rows.append(e_m)
        original["embed_mask"] = torch.stack(rows)
        return original

    def features(self, pairs):
        """encode()'s text path for one batch: pairs -> padded features with embed_mask."""
        texts = [self._convert_to_str(i, t) for i, t in pairs]
        return self.tokenize([self.prepare_for_tokenization(t) for t in texts])


def ours(tok, pairs, name="tiny", config=None, pooling="mean", max_length=512, doc_max_length=400):
    return tk.prepare_inputs(
        tok,
        pairs,
        name_or_path=name,
        family=tk.config_family(config if config is not None else LlamaConfig()),
        pooling_mode=pooling,
        max_length=max_length,
        doc_max_length=doc_max_length,
    )


def assert_matches_ref(tok, pairs, **kw):
    """Our packed ids / embed lengths equal the unpadded rows of llm2vec's padded features."""
    config = kw.get("config", LlamaConfig())
    ref = Llm2vecTextRef(
        tok,
        kw.get("name", "tiny"),
        config,
        kw.get("pooling", "mean"),
        kw.get("max_length", 512),
        kw.get("doc_max_length", 400),
    )
    feats = ref.features(pairs)
    got = ours(tok, pairs, **kw)
    for b in range(len(pairs)):
        real = feats["attention_mask"][b].bool()
        assert got.input_ids[b] == feats["input_ids"][b][real].tolist(), pairs[b]
        n = int(feats["embed_mask"][b].sum())
        assert got.embed_lengths[b] == n, pairs[b]
        # llm2vec's mask is the last n positions; ours is "the last n ids": same tokens.
        assert bool(feats["embed_mask"][b][-n:].all()) if n else True
    return got


# ------------------------------------------------------------------------------- the rules
def test_join_and_separator():
    assert tk.join_instruction("  Retrieve docs:  ", "hello") == f"Retrieve docs: {SEP}hello"
    assert tk.join_instruction("", " hello ") == f"{SEP} hello "
    # a whitespace-only instruction is truthy in llm2vec: stripped to "", the space stays
    assert tk.join_instruction("  ", "x") == f" {SEP}x"
    assert tk.split_instruction(f"Q: {SEP}text") == ("Q: text", "text")
    assert tk.split_instruction("no separator") == ("no separator", "")
    # a separator inside the text: llm2vec's t[1] stops there, the join drops every separator
    assert tk.split_instruction(f"Q {SEP}a{SEP}b") == ("Q ab", "a")


def test_embed_mask_is_last_n_tokens(tok):
    pairs = [("Retrieve documents", "the quick brown fox"), ("", "hello world"), ("Q", "Buddhism")]
    got = assert_matches_ref(tok, pairs)
    assert got.input_ids[0] == tok("Retrieve documents the quick brown fox")["input_ids"]
    assert got.embed_lengths[0] == len(
        tok("the quick brown fox", add_special_tokens=False)["input_ids"]
    )
    # "Buddhism" alone splits into more tokens than " Buddhism" in context: the last-N mask
    # then reaches into the instruction ("Q"), exactly as llm2vec does
    alone = len(tok("Buddhism", add_special_tokens=False)["input_ids"])
    in_context = len(tok(" Buddhism", add_special_tokens=False)["input_ids"])
    assert alone > in_context
    assert got.embed_lengths[2] == alone


def test_instruction_whitespace_and_separator_in_text(tok):
    assert_matches_ref(tok, [("  ", "hello"), ("Q ", f"a{SEP}b"), ("Q", "  spaced  out  ")])


@pytest.mark.parametrize(
    "name,prefix,suffix",
    [
        ("mistralai/Mistral-7B-Instruct-v0.2", "[INST] ", " [/INST]"),
        ("meta-llama/Llama-2-7b-chat-hf", "[INST] ", " [/INST]"),
        ("google/gemma-2-9b-it", "<bos><start_of_turn>user\n", "<end_of_turn>"),
        ("Qwen/Qwen2-1.5B-Instruct", "<|im_start|>user\n", "<|im_end|>"),
        ("Qwen/Qwen2-7B-Instruct", "<|im_start|>user\n", "<|im_end|>"),
        (
            "meta-llama/Meta-Llama-3-8B-Instruct",
            "<|start_header_id|>user<|end_header_id|>\n\n",
            "<|eot_id|>",
        ),
        ("mistralai/Mistral-7B-v0.1", "", ""),
        ("McGill-NLP/LLM2Vec-Mistral-7B-Instruct-v2-mntp", "", ""),  # not a base name: no wrap
    ],
)
def test_chat_wrapping_by_name_or_path(tok, name, prefix, suffix):
    joined = f"Q: {SEP}  some text "
    body = joined.strip() if prefix else joined
    assert tk.prepare_for_tokenization(joined, name, "mistral", "mean") == prefix + body + suffix
    if "Gemma" not in name and "gemma" not in name:
        assert_matches_ref(
            tok, [("Q:", "  some text "), ("", "x")], name=name, config=MistralConfig()
        )


@pytest.mark.parametrize(
    "config,name,suffix",
    [
        (LlamaConfig(), "any/llama", " </s>"),
        (MistralConfig(), "any/mistral", " </s>"),
        (GemmaConfig(), "any/gemma", "<eos>"),
        (Qwen2Config(), "any/qwen", "<|endoftext|>"),
        (Gemma2Config(), "any/gemma2", ""),  # not a GemmaConfig subclass: llm2vec adds nothing
        (LlamaConfig(), "meta-llama/Meta-Llama-3-8B", "<|end_of_text|>"),
    ],
)
def test_eos_suffix_by_config_class(tok, config, name, suffix):
    joined = f"Q {SEP}text  "
    family = tk.config_family(config)
    out = tk.prepare_for_tokenization(joined, name, family, "eos_token")
    assert out == (joined.strip() + suffix if suffix else joined)
    assert tk.prepare_for_tokenization(joined, name, family, "mean") == joined
    assert_matches_ref(
        tok, [("Q", "text  "), ("", "hello world")], name=name, config=config, pooling="eos_token"
    )


def test_llama3_instruct_gets_no_eos_suffix():
    out = tk.prepare_for_tokenization(
        f"{SEP}x", "meta-llama/Meta-Llama-3-8B-Instruct", "llama", "eos_token"
    )
    assert out.endswith("<|eot_id|>") and "</s>" not in out


def test_doc_max_length_truncation_by_words(tok):
    long_text = " ".join(["The quick brown fox jumps over the lazy dog."] * 12)
    messy = "hello   world,\n how are   you " * 9
    pairs = [("Q", long_text), ("", messy), ("", "short   text  "), ("", "supercalifragilistic")]
    for doc_max_length in (7, 20, 33):
        got = assert_matches_ref(tok, pairs, doc_max_length=doc_max_length)
        for ids, n in zip(got.input_ids, got.embed_lengths, strict=True):
            assert n <= max(doc_max_length, 0) or n == len(ids)
    texts, lengths = tk.truncate_by_words(tok, [long_text, "short   text  "], 512, 20)
    assert lengths[0] <= 20 and texts[0] == " ".join(texts[0].split())  # rewritten by words
    assert texts[1] == "short   text  "  # never cut: whitespace kept
    ref = Llm2vecTextRef(tok, "x", LlamaConfig(), "mean", 512, 20)
    assert tk.convert_to_str(tok, " Q ", long_text, 512, 20) == ref._convert_to_str(
        " Q ", long_text
    )


def test_max_length_truncates_the_joined_text(tok):
    pairs = [("Retrieve documents that answer the question:", "hello world " * 30)]
    got = assert_matches_ref(tok, pairs, max_length=16)
    assert len(got.input_ids[0]) == 16 and got.embed_lengths[0] == 16  # N covers all, BOS too


def test_issue80_text_longer_alone_is_clamped():
    # " supercalifragilistic" is one token after "Q" but three alone, and this tokenizer adds no
    # BOS: N = 3 > 2 ids. llm2vec crashes (issue 80); we clamp N to the sequence length.
    tok = make_bpe_tokenizer(add_bos=False)
    got = ours(tok, [("Q", "supercalifragilistic")])
    alone = len(tok("supercalifragilistic", add_special_tokens=False)["input_ids"])
    assert alone > len(got.input_ids[0])
    assert got.embed_lengths[0] == len(got.input_ids[0])
    ref = Llm2vecTextRef(tok, "x", LlamaConfig(), "mean", 512, 400)
    with pytest.raises(RuntimeError):
        ref.features([("Q", "supercalifragilistic")])


def test_empty_and_whitespace_texts(tok):
    got = assert_matches_ref(tok, [("Q", ""), ("", ""), ("Q", "   "), ("", " \n ")])
    assert got.embed_lengths[0] == 0 and got.embed_lengths[1] == 0
    assert got.input_ids[1] == [tok.bos_token_id]


def test_batched_calls_equal_single_calls(tok):
    texts = ["hello world", "", "  x ", "The quick brown fox", "supercalifragilistic " * 3]
    batched = tk.token_lengths(tok, texts, 8)
    single = [
        len(tok(t, add_special_tokens=False, truncation=True, max_length=8)["input_ids"])
        for t in texts
    ]
    assert batched == single
    got = tk.tokenize(tok, [f"Q {SEP}{t}" for t in texts], 8)
    for t, ids in zip(texts, got.input_ids, strict=True):
        assert ids == tok(f"Q {t}", truncation=True, max_length=8)["input_ids"]
    assert tk.tokenize(tok, [], 8).input_ids == []


def test_config_family():
    assert tk.config_family(LlamaConfig()) == "llama"
    assert tk.config_family(MistralConfig()) == "mistral"
    assert tk.config_family(GemmaConfig()) == "gemma"
    assert tk.config_family(Qwen2Config()) == "qwen2"
    assert tk.config_family(Gemma2Config()) == ""
    assert tk.config_family(object()) == ""


# -------------------------------------------- l2v's difference: truncation by tokens (issue 9)
def _count(tok, text, max_length=512):
    return len(tok(text, add_special_tokens=False, truncation=True, max_length=max_length)[
        "input_ids"])  # fmt: skip


def _text_with_tokens(tok, unit: str, n: int) -> str:
    """The shortest repetition of `unit` (no whitespace) with exactly n tokens, or more."""
    text = ""
    while _count(tok, text) < n:
        text += unit
    return text


@pytest.mark.parametrize("doc_max_length", [10, 37])
def test_texts_without_a_kept_word_are_cut_by_tokens(tok, doc_max_length):
    doc = doc_max_length
    cjk = "自然语言处理是人工智能的一个分支。" * 20  # no space; 3 byte tokens per character here
    url = "https://example.com/" + "a1b2c3d4e5" * 40  # one word
    over = _text_with_tokens(tok, "zq", doc + 1)  # just over the limit, no space
    first_word_long = over + " and then some words"  # llm2vec: 1 round keeps 0 words
    texts = [cjk, url, over, first_word_long, "中文 " + cjk]
    ref = Llm2vecTextRef(tok, "x", LlamaConfig(), "mean", 512, doc)
    for t in texts:
        assert _count(tok, t) > doc
        assert ref._convert_to_str("", t) == SEP  # llm2vec: the text is gone
    exact, _ = tk.truncate_by_words(tok, texts, 512, doc, by_tokens_when_no_word=False)
    assert exact == [""] * len(texts)  # the exact mode is llm2vec's
    cut, lengths = tk.truncate_by_words(tok, texts, 512, doc)
    for t, c, n in zip(texts, cut, lengths, strict=True):
        assert c and t.startswith(c), (t[:20], c)  # a prefix of the original string
        assert n == _count(tok, c) and doc - 3 <= n <= doc, (c, n)
        assert "\ufffd" not in c  # never a half character
    got = ours(tok, [("Q", t) for t in texts], doc_max_length=doc)
    assert all(0 < n <= doc for n in got.embed_lengths)


def test_texts_around_the_limit(tok):
    doc = 16
    ref = Llm2vecTextRef(tok, "x", LlamaConfig(), "mean", 512, doc)
    for n in (doc - 1, doc):  # within the limit: untouched, as in llm2vec
        t = _text_with_tokens(tok, "zq", n)
        if _count(tok, t) <= doc:
            (c,), (m,) = tk.truncate_by_words(tok, [t], 512, doc)
            assert c == t and m == _count(tok, t)
            assert tk.convert_to_str(tok, "Q", t, 512, doc) == ref._convert_to_str("Q", t)
    # spaced text over the limit: llm2vec's words rule, string for string
    spaced = "hello world how are you " * 10
    assert tk.convert_to_str(tok, "Q", spaced, 512, doc) == ref._convert_to_str("Q", spaced)
    # mixed: words kept by llm2vec's rule stay llm2vec's; the degenerate round goes by tokens
    mixed = "hello " + "中" * 30 + " world"
    (c,), (m,) = tk.truncate_by_words(tok, [mixed], 512, doc)
    assert ref._convert_to_str("", mixed) == SEP and c.startswith("hello ") and 0 < m <= doc


def test_truncate_by_tokens_bisects_split_characters(tok):
    text = "语" * 10  # 3 byte-level tokens per character in this tokenizer
    assert _count(tok, "语") == 3
    for budget in (1, 2, 3, 4, 7, 9, 30, 31):
        c, n = tk.truncate_by_tokens(tok, text, 512, budget)
        assert c == "语" * min(budget // 3, 10) and n == 3 * len(c)
    assert tk.truncate_by_tokens(tok, "abc", 512, 0) == ("", 0)


def test_truncate_by_tokens_without_offsets(tok):
    class NoOffsets:  # a slow tokenizer: offsets raise NotImplementedError
        def __call__(self, texts, **kw):
            if kw.get("return_offsets_mapping"):
                raise NotImplementedError("return_offset_mapping is not available")
            return tok(texts, **kw)

    text = "supercalifragilistic" * 5
    c, n = tk.truncate_by_tokens(NoOffsets(), text, 512, 12)
    assert text.startswith(c) and n == _count(tok, c) <= 12 and _count(tok, text[: len(c) + 1]) > 12
