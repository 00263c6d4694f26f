"""l2v train on tiny random models (CPU, fp32): the training forward and its LoRA gradients
against Hugging Face + PEFT, MNTP masking and shift token by token, SimCSE positives,
supervised pooling, each stage lowering its loss, save -> load through PEFT and l2v, resume
bit for bit, bad input; the CLI end to end. One slower test runs the three stages on the real
SmolLM2-135M.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err, skip_unless_gguf_readable
from tiny import make_lora_adapter, make_tiny_checkpoint

from l2v_models.checkpoint import load_model, to_hf_state_dict
from l2v_models.hf_compat import build_hf_model
from l2v_models.packing import TokenizedTexts, pack
from l2v_models.train.data import DataError, DataIndex, Example
from l2v_models.train.objectives import mask_tokens, mntp_loss, train_forward
from l2v_models.train.trainer import TrainConfig, Trainer, latest_checkpoint, load_for_training

WORDS = ("the cat sat on the mat and the dog was in the text of a passage which is for that "
         "document from it").split()  # fmt: skip
INSTRUCTION = "retrieve the passage"


def sentences(n: int, seed: int = 0, lo: int = 4, hi: int = 14) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(lo, hi))) for _ in range(n)]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("train"), "llama")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "sentences.txt"
    path.write_text("\n".join(sentences(48)) + "\n")
    return path


@pytest.fixture(scope="module")
def triples_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "triples.jsonl"
    qs, ps, ns = sentences(32, 1), sentences(32, 2), sentences(32, 3)
    rows = [{"query": q, "positive": p, "negative": n, "instruction": INSTRUCTION}
            for q, p, n in zip(qs, ps, ns, strict=True)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_trainer(base, stage, peft=None, **kw) -> Trainer:
    kw.setdefault("batch_size", 6)
    kw.setdefault("steps", 4)
    loaded = load_for_training(str(base), peft, dtype=torch.float32, device="cpu")
    return Trainer(loaded, TrainConfig(stage, **kw), model_arg=str(base))


def randomize_lora_(trainer: Trainer, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainer.adapters.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)


def peft_reference(trainer: Trainer, base_state):
    """HF's bidirectional model with a PEFT LoRA holding the trainer's A and B (dropout 0)."""
    from peft import LoraConfig, get_peft_model

    a = trainer.adapters
    hf = build_hf_model(trainer.loaded.hf_config, base_state)
    peft_model = get_peft_model(hf, LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=0.0,
                                               target_modules=list(a.target_modules)))  # fmt: skip
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, value in a.peft_state_dict().items():
            params[name.replace(".weight", ".default.weight")].copy_(value)
    return peft_model, params


def left_padded(packed):
    cu = packed.cu_seqlens.tolist()
    texts = [packed.input_ids[cu[i] : cu[i + 1]].long() for i in range(len(cu) - 1)]
    L = max(len(t) for t in texts)
    ids = torch.full((len(texts), L), 2, dtype=torch.long)
    mask = torch.zeros(len(texts), L, dtype=torch.long)
    for i, t in enumerate(texts):
        ids[i, L - len(t) :], mask[i, L - len(t) :] = t, 1
    return ids, mask, texts


def unpadded(hidden, texts):
    L = hidden.shape[1]
    return torch.cat([hidden[i, L - len(t) :] for i, t in enumerate(texts)])


# ------------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("stage", ["mntp", "supervised"])
def test_loss_and_lora_grads_match_hf_peft(base, triples_file, text_file, stage):
    """Same loss and LoRA gradients as a padded HF + PEFT reference (llm2vec's way)."""
    from l2v_models.train.objectives import contrastive_loss

    trainer = make_trainer(base, stage, mask_prob=0.5 if stage == "mntp" else None)
    base_state = {k: v.clone() for k, v in to_hf_state_dict(trainer.model).items()}
    randomize_lora_(trainer)
    trainer.train(False)
    data = triples_file if stage == "supervised" else text_file
    items = [item for _, item in trainer.batches([data]).next_batch()]
    batch = trainer.collate(items)
    ours = trainer.loss(batch)
    ours.backward()

    peft_model, params = peft_reference(trainer, base_state)
    ids, mask, texts = left_padded(batch.packed)
    hidden = unpadded(peft_model(input_ids=ids, attention_mask=mask).last_hidden_state, texts)
    if stage == "mntp":
        ref = mntp_loss(hidden, batch.chunks[0], trainer.lm_head)
    else:
        m = batch.packed.pool_mask.bool()
        seq = torch.repeat_interleave(torch.arange(len(texts)), torch.tensor([len(t) for t in
                                                                               texts]))
        pooled = torch.stack([hidden[(seq == i) & m].mean(0) for i in range(len(texts))])
        ref = contrastive_loss(pooled, batch.n, trainer.config.scale, keys=batch.keys)
    ref.backward()
    assert abs(ours.item() - ref.item()) <= 1e-5 * abs(ref.item()) + 1e-6
    for t, a_param, b_param in zip(trainer.adapters.targets, trainer.adapters.A,
                                   trainer.adapters.B, strict=True):  # fmt: skip
        name = f"{t.peft_prefix}.lora_A.default.weight"
        assert rel_err(a_param.grad, params[name].grad) < 1e-4, name
        name = name.replace("lora_A", "lora_B")
        assert rel_err(b_param.grad, params[name].grad) < 1e-4, name
        assert a_param.grad.abs().sum() > 0 and b_param.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_grads(base, text_file):
    runs = []
    for ckpt in (False, True):
        trainer = make_trainer(base, "simcse", gradient_checkpointing=ckpt, batch_size=4)
        randomize_lora_(trainer)
        items = [item for _, item in trainer.batches([text_file]).next_batch()]
        torch.manual_seed(3)  # the same dropout masks in both runs
        loss = trainer.loss(trainer.collate(items))
        loss.backward()
        runs.append((loss.detach(), [p.grad for p in trainer.adapters.parameters()]))
    (l0, g0), (l1, g1) = runs
    assert torch.equal(l0, l1)
    for a, b in zip(g0, g1, strict=True):
        assert rel_err(b, a) < 1e-6


# ------------------------------------------------------------------------------ MNTP
def test_mntp_masking_and_shift_token_by_token(base):
    trainer = make_trainer(base, "mntp", mask_prob=0.3)
    tok = trainer.tokenizer
    ids = [tok(s)["input_ids"] for s in sentences(200, 7, 20, 40)]
    packed = pack(TokenizedTexts.whole(ids), np.arange(len(ids)))
    special = set(tok.all_special_ids)
    mask_id = trainer.mask_token_id
    assert tok.convert_ids_to_tokens(mask_id) == "_"  # llm2vec's "blank" mask token
    for policy in ("all", "bert"):
        gen = torch.Generator().manual_seed(0)
        b = mask_tokens(packed, mask_prob=0.3, policy=policy, mask_token_id=mask_id,
                        special_ids=special, vocab_size=len(tok), generator=gen)  # fmt: skip
        orig, new = packed.input_ids.tolist(), b.packed.input_ids.tolist()
        pos, sel = packed.positions.tolist(), b.masked.tolist()
        predicted = set(b.predict_from.tolist())
        n_sel = n_mask = n_keep = 0
        labels = iter(b.labels.tolist())
        for i in range(len(orig)):
            if orig[i] in special:
                assert not sel[i] and new[i] == orig[i]
            if not sel[i]:
                assert new[i] == orig[i] and (i - 1) not in predicted or pos[i] == 0
                continue
            n_sel += 1
            n_mask += int(new[i] == mask_id)
            n_keep += int(new[i] == orig[i])
            if policy == "all":
                assert new[i] == mask_id
            if pos[i] > 0:  # predicted from the previous token of the same text
                assert (i - 1) in predicted and next(labels) == orig[i]
            else:
                assert (i - 1) not in predicted
        assert next(labels, None) is None
        candidates = sum(1 for t in orig if t not in special)
        assert abs(n_sel / candidates - 0.3) < 0.02
        if policy == "bert":
            assert abs(n_mask / n_sel - 0.8) < 0.04 and abs(n_keep / n_sel - 0.1) < 0.04

    # The loss: the LM head at row i-1 against token i, averaged.
    hidden = torch.randn(packed.num_tokens, trainer.model.config.hidden_size)
    expected = torch.stack([
        F.cross_entropy((hidden[r] @ trainer.lm_head.t())[None], torch.tensor([label]))
        for r, label in zip(b.predict_from.tolist(), b.labels.tolist(), strict=True)
    ]).mean()  # fmt: skip
    assert torch.allclose(mntp_loss(hidden, b, trainer.lm_head), expected, rtol=1e-5)
    # The LM head: this tiny base does not tie it, so it is the checkpoint's lm_head.
    from safetensors.torch import load_file

    assert torch.equal(trainer.lm_head, load_file(base / "model.safetensors")["lm_head.weight"])


# ------------------------------------------------------------------------------ contrastive
def test_simcse_positive_is_the_same_sentence_under_dropout(base, text_file):
    trainer = make_trainer(base, "simcse", batch_size=5)
    randomize_lora_(trainer)
    items = [item for _, item in trainer.batches([text_file]).next_batch()]
    batch = trainer.collate(items)
    assert batch.n == 5 and batch.num_negatives == 0
    cu = batch.packed.cu_seqlens.tolist()
    ids = [batch.packed.input_ids[cu[i] : cu[i + 1]].tolist() for i in range(10)]
    pools = [batch.packed.pool_mask[cu[i] : cu[i + 1]].tolist() for i in range(10)]
    for i in range(5):
        assert ids[i] == ids[i + 5] and pools[i] == pools[i + 5]
    assert len({tuple(x) for x in ids[:5]}) == 5
    from l2v_models.train.objectives import pooled_rows

    with torch.no_grad():
        trainer.train(False)
        pooled = pooled_rows(trainer.model, train_forward(trainer.model, batch.packed),
                             batch.packed)  # fmt: skip
        assert torch.allclose(pooled[:5], pooled[5:], atol=1e-6)
        trainer.train(True)  # dropout: the two copies differ, a little
        pooled = pooled_rows(trainer.model, train_forward(trainer.model, batch.packed),
                             batch.packed)  # fmt: skip
        cos = F.cosine_similarity(pooled[:5], pooled[5:])
        assert (cos < 0.99999).all()
        trainer.ops.attn_dropout = 0.0  # LoRA dropout alone changes them too
        pooled = pooled_rows(trainer.model, train_forward(trainer.model, batch.packed),
                             batch.packed)  # fmt: skip
        assert (F.cosine_similarity(pooled[:5], pooled[5:]) < 0.99999).all()


def test_supervised_pools_the_text_not_the_instruction(base, triples_file):
    """Training tokenizes and pools exactly as l2v's encoder does at inference."""
    from l2v_models import LLM2Vec

    trainer = make_trainer(base, "supervised")
    example = Example("x:1", query="the cat sat", positive="a dog", negative="the mat",
                      instruction=INSTRUCTION)  # fmt: skip
    (texts, _), = trainer.encode(example)
    encoder = LLM2Vec.from_pretrained(str(base), device="cpu", backend="torch")
    expected = encoder.prepare_texts([[INSTRUCTION, "the cat sat"], "a dog", "the mat"])
    assert [list(x) for x in texts.input_ids] == [list(x) for x in expected.input_ids]
    assert texts.pool_starts.tolist() == expected.pool_starts.tolist()
    assert texts.pool_counts.tolist() == expected.pool_counts.tolist()
    # The query pools its text tokens only: the instruction's are attended, not pooled.
    n_text = len(trainer.tokenizer("the cat sat", add_special_tokens=False)["input_ids"])
    assert texts.pool_counts[0] == n_text < len(texts.input_ids[0])
    batch = trainer.collate([texts, texts])
    assert batch.num_negatives == 2 and batch.n == 2
    assert int(batch.packed.pool_mask[: len(texts.input_ids[0])].sum()) == n_text


# ------------------------------------------------------------------------------ training
@pytest.mark.parametrize("stage", ["mntp", "simcse", "supervised"])
def test_each_stage_lowers_its_loss(base, text_file, triples_file, stage, tmp_path):
    data = triples_file if stage == "supervised" else text_file
    lr = 2e-3
    if stage == "mntp":  # 8 texts seen every step, fresh masks each time
        data, lr = tmp_path / "eight.txt", 1e-2
        data.write_text("\n".join(sentences(8)) + "\n")
    trainer = make_trainer(base, stage, steps=6, lr=lr, batch_size=8, warmup_steps=1)
    batcher = trainer.batches([data])
    fixed = trainer.collate([item for _, item in batcher.next_batch()])

    def held_loss():
        with torch.no_grad():
            trainer.train(False)
            return trainer.loss(fixed).item()

    before = held_loss()
    history = trainer.fit(batcher, progress=False)
    assert len(history) == 6 and all(np.isfinite(h["loss"]) for h in history)
    assert held_loss() < 0.9 * before


def test_resume_is_bit_identical(base, text_file, tmp_path):
    for stage in ("simcse", "mntp"):  # dropout draws (global RNG) and masking draws
        kw = dict(steps=4, batch_size=4, save_every=2, lr=1e-3)
        full = make_trainer(base, stage, **kw)
        full.fit(full.batches([text_file]), output=tmp_path / f"full-{stage}", progress=False)
        out = tmp_path / f"part-{stage}"
        first = make_trainer(base, stage, **kw)
        batcher = first.batches([text_file])
        first.fit(batcher, output=out, progress=False, stop_at=2)  # as if interrupted
        resumed = make_trainer(base, stage, **kw)
        batcher = resumed.batches([text_file])
        ckpt = latest_checkpoint(out)
        assert ckpt.name == "step-000002"
        resumed.load_checkpoint(ckpt, batcher)
        resumed.fit(batcher, output=out, progress=False)
        for a, b in zip(full.adapters.parameters(), resumed.adapters.parameters(), strict=True):
            assert torch.equal(a, b), stage
        assert not torch.equal(full.adapters.B[0], torch.zeros_like(full.adapters.B[0]))


# ------------------------------------------------------------------------------ save / load
def test_saved_adapters_load_in_l2v_and_peft(base, text_file, tmp_path):
    from peft import PeftModel

    from l2v_models import LLM2Vec

    probe = sentences(5, 11)
    # MNTP adapter: l2v merges it and embeds as the trainer does; PEFT's hidden states agree.
    mntp = make_trainer(base, "mntp", steps=3, lr=2e-3)
    mntp.fit(mntp.batches([text_file]), output=tmp_path / "mntp", progress=False)
    cfg = json.loads((tmp_path / "mntp" / "adapter_config.json").read_text())
    assert cfg["r"] == 16 and cfg["lora_alpha"] == 32 and cfg["peft_type"] == "LORA"
    assert cfg["base_model_name_or_path"] == str(base.resolve())
    assert sorted(cfg["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    encoder = LLM2Vec.from_pretrained(str(base), peft_model_name_or_path=str(tmp_path / "mntp"),
                                      device="cpu", backend="torch")  # fmt: skip
    assert rel_err(encoder.encode(probe, show_progress_bar=False), mntp.embed(probe)) < 1e-5
    plain = load_model(str(base), dtype=torch.float32, device="cpu", backend="torch")
    hf = build_hf_model(plain.hf_config, to_hf_state_dict(plain.model))
    peft_model = PeftModel.from_pretrained(hf, str(tmp_path / "mntp"))
    ids = [mntp.tokenizer(s)["input_ids"] for s in probe]
    packed = pack(TokenizedTexts.whole(ids), np.arange(len(ids)))
    pids, mask, texts = left_padded(packed)
    with torch.no_grad():
        ref = unpadded(peft_model(input_ids=pids, attention_mask=mask).last_hidden_state, texts)
        mntp.train(False)
        assert rel_err(train_forward(mntp.model, packed), ref) < 1e-5
    # SimCSE on top of the MNTP dir (the -mntp layout: config, tokenizer, adapter).
    simcse = make_trainer(tmp_path / "mntp", "simcse", steps=3, lr=2e-3)
    simcse.fit(simcse.batches([text_file]), output=tmp_path / "simcse", progress=False)
    encoder = LLM2Vec.from_pretrained(str(tmp_path / "mntp"),
                                      peft_model_name_or_path=str(tmp_path / "simcse"),
                                      device="cpu", backend="torch")  # fmt: skip
    ours = simcse.embed(probe)
    assert rel_err(encoder.encode(probe, show_progress_bar=False), ours) < 1e-5
    assert rel_err(mntp.embed(probe), ours) > 1e-3  # the second adapter changed something


# ------------------------------------------------------------------------------ bad input
def test_bad_data_files_are_named(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match="empty.txt: no training examples"):
        DataIndex.scan([empty])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": "cut\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: invalid JSON"):
        DataIndex.scan([bad])
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"query": "q", "positive": 3}\n')
    with pytest.raises(DataError, match=r'wrong\.jsonl:1: "positive" must be a string'):
        DataIndex.scan([wrong], "triplet")
    with pytest.raises(DataError, match=r'wrong\.jsonl:1: missing the string field "text"'):
        DataIndex.scan([wrong], "text")
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"ok\ncaf\xe9\n")
    with pytest.raises(DataError, match=r"latin\.txt:2: not UTF-8"):
        DataIndex.scan([latin])
    with pytest.raises(DataError, match="not found"):
        DataIndex.scan([tmp_path / "missing.txt"])


def test_evaluation_data_is_kept_out(tmp_path):
    from l2v_models.train.data import refuse_evaluation_files

    path = tmp_path / "mixed.txt"
    path.write_text("keep me\nan evaluation text\nkeep me too\n")
    index = DataIndex.scan([path], exclude=lambda e: e.text == "an evaluation text")
    assert len(index) == 2 and index.excluded == 1 and index.linenos.tolist() == [1, 3]
    with pytest.raises(DataError, match="every example is evaluation data"):
        DataIndex.scan([path], exclude=lambda e: True)
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("gensim")  # located, not imported (slow)
    if spec is None:
        pytest.skip("the Lee corpus ships with gensim, which is not installed")
    lee = Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data" / "lee.cor"
    with pytest.raises(DataError, match="Lee evaluation corpus"):
        refuse_evaluation_files([path, lee])
    refuse_evaluation_files([path, lee.with_name("lee_background.cor")])


def test_long_lines_policies(base, tmp_path):
    path = tmp_path / "long.txt"
    long_line = " ".join(["cat"] * 40)
    path.write_text(f"a short line\n{long_line}\n")
    for policy, expect in (("split", None), ("truncate", [10]), ("skip", [])):
        trainer = make_trainer(base, "mntp", max_length=10, long_lines=policy)
        pieces = trainer.encode(Example(f"{path}:2", text=long_line))
        n = len(trainer.tokenizer(long_line)["input_ids"])
        if policy == "split":
            assert [k for _, k in pieces] == [10] * (n // 10) + ([n % 10] if n % 10 else [])
        else:
            assert [k for _, k in pieces] == expect
    trainer = make_trainer(base, "simcse", max_length=10, long_lines="error")
    batcher = trainer.batches([path])
    batcher.stream.shuffle = False
    with pytest.raises(DataError, match=r"long\.txt:2: more than 10 tokens, over the simcse"):
        for _ in range(3):
            batcher.next_batch()
    trainer = make_trainer(base, "simcse", max_length=10)  # truncate: llm2vec's word cut
    (texts, _), = trainer.encode(Example("x:2", text=long_line))
    assert texts.pool_counts[0] <= 10


def test_adapter_for_another_base_is_refused(base, tmp_path):
    other = make_tiny_checkpoint(tmp_path, "llama", hidden_size=64, num_attention_heads=4,
                                 num_key_value_heads=2)  # fmt: skip
    adapter = make_lora_adapter(tmp_path, other, rank=4, alpha=8)
    with pytest.raises(ValueError, match="trained for another base model"):
        load_for_training(str(base), str(adapter), dtype=torch.float32, device="cpu")


# ------------------------------------------------------------------------------ CLI
def test_cli_trains_resumes_and_reports_errors(base, text_file, tmp_path, capsys):
    from l2v_models.cli import main

    out = tmp_path / "cli"
    args = ["train", "simcse", "--model", str(base), "--data", str(text_file), "--output",
            str(out), "--steps", "4", "--batch-size", "4", "--save-every", "2", "-q"]
    assert main(args) == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(r["tokens"] > 0 for r in log)
    assert (out / "adapter_model.safetensors").is_file()
    assert main(args) == 2  # checkpoints of an earlier run: refuse to mix
    assert "--resume" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 0  # the newest checkpoint is the last step: no-op
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["train", "mntp", "--data", str(empty), "--output", str(tmp_path / "x")]) == 2
    assert f"{empty}: no training examples" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------ real model
@pytest.mark.slow
def test_three_stages_on_smollm2(tmp_path):
    """Two steps of each stage on the embedded SmolLM2-135M (GGUF base, tied LM head), loaded
    once: the MNTP adapter is merged in place before SimCSE and supervised (merge_adapter_,
    what load_for_training(extra_peft=...) does), and l2v's loader gives the same embeddings."""
    from l2v_models.checkpoint import read_lora_adapter
    from l2v_models.train.lora import merge_adapter_

    skip_unless_gguf_readable()
    text = tmp_path / "t.txt"
    text.write_text("\n".join(sentences(16, 3)) + "\n")
    triples = tmp_path / "t.jsonl"
    triples.write_text("".join(json.dumps({"query": q, "positive": p, "negative": n}) + "\n"
                               for q, p, n in zip(sentences(8, 4), sentences(8, 5),
                                                  sentences(8, 6), strict=True)))  # fmt: skip
    loaded = load_for_training(None, dtype=torch.float32, device="cpu")
    trainer = Trainer(loaded, TrainConfig("mntp", steps=2, batch_size=4, max_length=16))
    assert trainer.lm_head is trainer.model.embed  # tied
    history = trainer.fit(trainer.batches([text]), output=tmp_path / "mntp", progress=False)
    assert all(np.isfinite(h["loss"]) for h in history)
    probe = sentences(3, 9, 3, 6)  # under max_length: both encoders see the same ids
    after_mntp = trainer.embed(probe)
    merge_adapter_(loaded.model, read_lora_adapter(tmp_path / "mntp"))
    for stage, data in (("simcse", text), ("supervised", triples)):
        trainer = Trainer(loaded, TrainConfig(stage, steps=2, batch_size=4, max_length=16))
        assert rel_err(trainer.embed(probe), after_mntp) < 1e-4  # merged == unmerged (30 layers)
        history = trainer.fit(trainer.batches([data]), output=tmp_path / stage, progress=False)
        assert all(np.isfinite(h["loss"]) for h in history)
        cfg = json.loads((tmp_path / stage / "adapter_config.json").read_text())
        assert cfg["base_model_name_or_path"] == "smollm2"


# ------------------------------------------------------------------------------ stacking
def test_stacked_adapter_merges_like_the_chain(base, tmp_path):
    """stack_adapters([a, b]) is one adapter whose merge equals merging a, then b (the shipped
    default model stores its SimCSE + supervised chain this way); a float16 copy stays close."""
    from safetensors import safe_open

    from l2v_models.train.save import stack_adapters

    first = make_lora_adapter(tmp_path, base, rank=4, alpha=8, seed=1, subdir="first")
    second = make_lora_adapter(tmp_path, base, rank=2, alpha=3, seed=2, subdir="second",
                               llm2vec_config={"pooling_mode": "mean"})  # fmt: skip
    stacked = stack_adapters([first, second], tmp_path / "stacked")
    cfg = json.loads((stacked / "adapter_config.json").read_text())
    assert cfg["r"] == 6 and cfg["lora_alpha"] == 6 and (stacked / "llm2vec_config.json").is_file()
    kw = {"dtype": torch.float32, "device": "cpu"}
    plain = load_for_training(str(base), **kw).model.state_dict()
    chain = load_for_training(str(base), str(first), extra_peft=[second], **kw).model.state_dict()
    one = load_for_training(str(base), str(stacked), **kw).model.state_dict()
    changed = 0
    for name, weight in chain.items():
        torch.testing.assert_close(one[name], weight, rtol=1e-5, atol=1e-6, msg=name)
        changed += not torch.equal(weight, plain[name])
    assert changed >= 4  # attention and MLP weights of both layers moved
    half = stack_adapters([stacked], tmp_path / "half", dtype=torch.float16)
    with safe_open(str(half / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    for name, weight in load_for_training(str(base), str(half), **kw).model.state_dict().items():
        assert rel_err(weight, one[name]) < 1e-3, name
    narrow = make_lora_adapter(tmp_path, base, target_modules=["q_proj"], subdir="narrow")
    with pytest.raises(ValueError, match="other modules"):
        stack_adapters([first, narrow], tmp_path / "bad")


def test_bos_token_is_prepended_saved_and_never_pooled(base, text_file, tmp_path, capsys):
    """--bos-token: every text starts with the token in training, MNTP saves the tokenizer with
    it, the encoder loading that -mntp folder does the same, and the token is never pooled."""
    from l2v_models import LLM2Vec
    from l2v_models.cli import main
    from l2v_models.tokenization import join_instruction

    kw = {"dtype": torch.float32, "device": "cpu"}
    eos = 2  # the tiny tokenizer's </s>, made the first token instead of its <s>
    loaded = load_for_training(str(base), bos_token="</s>", **kw)
    assert loaded.tokenizer("the cat")["input_ids"][0] == eos
    trainer = Trainer(loaded, TrainConfig("mntp", steps=2, batch_size=4), model_arg=str(base))
    trainer.fit(trainer.batches([text_file]), output=tmp_path / "mntp", progress=False)
    probe = sentences(4, 12)
    encoder = LLM2Vec.from_pretrained(str(tmp_path / "mntp"), device="cpu", backend="torch")
    assert encoder.tokenizer("the cat")["input_ids"][0] == eos
    ours = encoder.encode(probe, show_progress_bar=False)
    assert rel_err(ours, trainer.embed(probe)) < 1e-5
    # The token is attended to, not pooled: the mean covers the text's own tokens only.
    batch = encoder.tokenize([join_instruction("", probe[0])])  # what encode() tokenizes
    assert batch["input_ids"][0, 0] == eos and batch["embed_mask"][0, 0] == 0
    assert batch["embed_mask"][0].sum() == len(encoder.tokenizer(probe[0])["input_ids"]) - 1
    with pytest.raises(ValueError, match="not a token of this tokenizer"):
        load_for_training(str(base), bos_token="<nope>", **kw)
    plain = loaded.tokenizer.convert_ids_to_tokens(loaded.tokenizer("cat")["input_ids"][-1])
    with pytest.raises(ValueError, match="not a special token"):
        load_for_training(str(base), bos_token=plain, **kw)
    args = ["train", "simcse", "--model", str(base), "--data", str(text_file), "--output",
            str(tmp_path / "x"), "--bos-token", "<nope>", "-q"]  # fmt: skip
    assert main(args) == 2 and "not a token of this tokenizer" in capsys.readouterr().err
