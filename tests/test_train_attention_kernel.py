"""Training with the packed Triton attention (forward + backward), as LoraOps runs it on CUDA.

On CPU the trainer keeps TorchOps' padded SDPA path (LoraOps turns the kernel on only where
the Triton backend runs); here `ops.attention_kernel = True` runs the kernels in the Triton
interpreter on a tiny random Gemma-2 (GQA 2/1, soft-capping, local layers with a window) with
head_dim 64 (the kernel's smallest), fp32: the loss and every LoRA gradient equal the padded
path's, nothing is padded, and gradient checkpointing with attention dropout repeats the
kernel's dropout mask. The `gpu` test does the same on CUDA in bf16, where LoraOps picks the
kernel by itself.
"""

from __future__ import annotations

import pytest
import torch
from helpers import rel_err
from test_train import make_trainer, randomize_lora_, sentences
from tiny import make_tiny_checkpoint

HEAD_64 = dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
               intermediate_size=96)  # fmt: skip


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("kernel-train"), "gemma2", **HEAD_64)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "sentences.txt"
    path.write_text("\n".join(sentences(24, seed=4, lo=6, hi=30)) + "\n")
    return path


def _loss_and_grads(trainer, items, *, kernel: bool, seed: int = 3):
    trainer.ops.attention_kernel = kernel
    for p in trainer.adapters.parameters():
        p.grad = None
    torch.manual_seed(seed)
    loss = trainer.loss(trainer.collate(items))
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in trainer.adapters.parameters()]


def _forbid_padded_attention(monkeypatch):
    def no_padding(*args, **kwargs):
        raise AssertionError("the padded SDPA path ran")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", no_padding)


def test_kernel_attention_gives_the_padded_paths_loss_and_grads(base, text_file, monkeypatch):
    trainer = make_trainer(base, "simcse", batch_size=4, attn_dropout=0.0,
                           lora_dropout=0.0)
    assert trainer.ops.attention_kernel is False  # CPU: the torch path unless asked
    randomize_lora_(trainer)
    items = [item for _, item in trainer.batches([text_file]).next_batch()]
    ref_loss, ref_grads = _loss_and_grads(trainer, items, kernel=False)

    _forbid_padded_attention(monkeypatch)
    loss, grads = _loss_and_grads(trainer, items, kernel=True)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    for g, r in zip(grads, ref_grads, strict=True):
        assert rel_err(g, r) < 1e-4
    assert any(g.abs().sum() > 0 for g in grads)


def test_kernel_attention_dropout_under_gradient_checkpointing(base, text_file, monkeypatch):
    """SimCSE's attention dropout in the kernel: checkpointed layers recompute the forward with
    the same dropout mask, so loss and gradients equal those without checkpointing; the dropout
    is active (another seed changes the loss)."""
    _forbid_padded_attention(monkeypatch)
    runs = []
    for ckpt in (False, True):
        trainer = make_trainer(base, "simcse", batch_size=2, attn_dropout=0.3,
                               gradient_checkpointing=ckpt)
        randomize_lora_(trainer)
        items = [item for _, item in trainer.batches([text_file]).next_batch()]
        runs.append(_loss_and_grads(trainer, items, kernel=True))
    (l0, g0), (l1, g1) = runs
    assert torch.equal(l0, l1)
    for a, b in zip(g0, g1, strict=True):
        assert rel_err(b, a) < 1e-6
    with torch.no_grad():
        trainer.step += 1  # dropout is drawn per (seed, step, rank, chunk): another step's
        other = trainer.loss(trainer.collate(items))
    assert not torch.equal(other, l1)


@pytest.mark.gpu
def test_gpu_training_uses_the_kernel_and_matches_the_padded_path(base, text_file):
    """On CUDA LoraOps runs attention on the packed kernel by itself; bf16 loss and LoRA
    gradients agree with the padded SDPA path (bf16 tolerance)."""
    from l2v_models.train.trainer import TrainConfig, Trainer, load_for_training

    loaded = load_for_training(str(base), None, dtype=torch.bfloat16, device="cuda")
    trainer = Trainer(loaded, TrainConfig("simcse", batch_size=8, attn_dropout=0.0,
                                          lora_dropout=0.0), model_arg=str(base))  # fmt: skip
    assert trainer.ops.attention_kernel is True
    randomize_lora_(trainer)
    items = [item for _, item in trainer.batches([text_file]).next_batch()]
    loss, grads = _loss_and_grads(trainer, items, kernel=True)
    ref_loss, ref_grads = _loss_and_grads(trainer, items, kernel=False)
    assert abs(loss.item() - ref_loss.item()) <= 2e-2 * abs(ref_loss.item())
    for g, r in zip(grads, ref_grads, strict=True):
        assert rel_err(g, r) < 5e-2


def test_padded_path_grads_are_finite_with_windowed_layers(tmp_path, text_file):
    """The padded SDPA path (CPU training) on Gemma-2 (local layers, window 8) with texts of
    different lengths: a padded query row far past its text's end sees no key in its window;
    its softmax was NaN and, although the row is discarded, the NaN reached every LoRA
    gradient through the backward. The gradients are finite and the loss equals the kernel's."""
    base = make_tiny_checkpoint(tmp_path, "gemma2")  # head_dim 16: the torch path only
    trainer = make_trainer(base, "simcse", batch_size=4, attn_dropout=0.0, lora_dropout=0.0)
    randomize_lora_(trainer)
    items = [item for _, item in trainer.batches([text_file]).next_batch()]
    batch = trainer.collate(items)
    lengths = (batch.packed.cu_seqlens[1:] - batch.packed.cu_seqlens[:-1]).tolist()
    assert max(lengths) - min(lengths) > 8  # some padded rows see no key in their window
    loss, grads = _loss_and_grads(trainer, items, kernel=False)
    assert torch.isfinite(loss)
    assert all(torch.isfinite(g).all() for g in grads)
