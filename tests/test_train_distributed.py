"""Data-parallel training on the CPU: 2 processes under torchrun (gloo), tiny models.

- MNTP, SimCSE and supervised on 2 processes x batch B give the losses (rtol 1e-5) and the
  adapter of 1 process x batch 2B (dropout off; MNTP masks are drawn per text from the seed),
  GradCache and FSDP2 included;
- a process killed mid-run stops the run with one line naming it and where to resume;
  `--resume` then finishes it bit for bit like an uninterrupted 2-process run (dropout on);
- resuming a 2-process checkpoint on 1 process says what changes.
Two torchrun launches and one resume: the processes' start-up (importing torch) is most of the
time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import rel_err
from safetensors.torch import load_file
from tiny import make_tiny_checkpoint

from l2v_models.train.trainer import TrainConfig, Trainer, latest_checkpoint, load_for_training

REPO = Path(__file__).resolve().parent.parent
WORDS = ("the cat sat on the mat and the dog was in the text of a passage which is for that "
         "document from it").split()  # fmt: skip
B = 3  # examples per process and step
COMMON = dict(steps=3, lr=3e-3, warmup_steps=0, lora_dropout=0.0, attn_dropout=0.0)
# The killed run and its reference: dropout on (its draws are seeded per process and step).
RESUMED = dict(stage="simcse", steps=30, batch_size=B, lr=1e-3, save_every=2)


def sentences(n: int, seed: int, lo: int = 4, hi: int = 12) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(lo, hi))) for _ in range(n)]


def env() -> dict:
    e = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]),
             OMP_NUM_THREADS="1")  # fmt: skip
    e.pop("RANK", None)
    return e


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    base = make_tiny_checkpoint(root, "llama")
    text = root / "sentences.txt"
    lines = sentences(40, 0)
    lines[7] = lines[3]  # a duplicate: a false negative when both land in one step
    text.write_text("\n".join(lines) + "\n")
    triples = root / "triples.jsonl"
    rows = []
    for i, (q, p, n1, n2) in enumerate(zip(sentences(24, 1), sentences(24, 2), sentences(24, 3),
                                           sentences(24, 4), strict=True)):  # fmt: skip
        negatives = [n1, n2][: i % 3]  # 0, 1 or 2 hard negatives
        rows.append({"query": q, "positive": p, "negatives": negatives,
                     "instruction": "find the passage"})  # fmt: skip
    triples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, base, text, triples


def runs(text, triples) -> list[dict]:
    data = {"mntp": text, "simcse": text, "supervised": triples}
    out = [{"name": s, "data": [str(data[s])], "config": dict(stage=s, batch_size=B, **COMMON)}
           for s in data]  # fmt: skip
    out.append({"name": "supervised-gradcache", "data": [str(triples)],
                "config": dict(stage="supervised", batch_size=B, grad_cache_chunk=2, **COMMON)})
    out.append({"name": "simcse-fsdp", "data": [str(text)],
                "config": dict(stage="simcse", batch_size=B, fsdp=True, **COMMON)})
    out.append({"name": "resumed-reference", "data": [str(text)], "config": RESUMED})
    return out


@pytest.fixture(scope="module")
def two_processes(setup):
    """The runs on 2 processes (one torchrun launch): {name: (losses, adapter dir)}."""
    root, base, text, triples = setup
    out = root / "two"
    out.mkdir()
    spec = root / "spec.json"
    spec.write_text(json.dumps({"base": str(base), "out": str(out),
                                "runs": runs(text, triples)}))  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", str(REPO / "tests" / "train_dist_worker.py"), str(spec)]  # fmt: skip
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = json.loads((out / "results.json").read_text())
    return {name: (values, out / name) for name, values in losses.items()}


def one_process(base, data, config: dict) -> tuple[list[float], Trainer]:
    config = dict(config)
    config.pop("fsdp", None)
    config["batch_size"] = 2 * config["batch_size"]
    loaded = load_for_training(str(base), dtype=torch.float32, device="cpu")
    trainer = Trainer(loaded, TrainConfig(**config), model_arg=str(base))
    history = trainer.fit(trainer.batches(data), progress=False)
    return [h["loss"] for h in history], trainer


@pytest.mark.parametrize("name", ["mntp", "simcse", "supervised", "supervised-gradcache",
                                  "simcse-fsdp"])  # fmt: skip
def test_two_processes_train_like_one_with_twice_the_batch(setup, two_processes, name):
    root, base, text, triples = setup
    run = next(r for r in runs(text, triples) if r["name"] == name)
    losses, trainer = one_process(base, run["data"], run["config"])
    theirs, adapter = two_processes[name]
    assert len(theirs) == len(losses) == COMMON["steps"]
    np.testing.assert_allclose(theirs, losses, rtol=1e-5)
    assert len(set(losses)) == len(losses)  # the steps saw different batches
    saved = load_file(adapter / "adapter_model.safetensors")
    mine = trainer.adapters.peft_state_dict()
    assert saved.keys() == mine.keys()
    moved = 0
    for key, value in mine.items():
        assert rel_err(saved[key], value) < 1e-4, key
        moved += "lora_B" in key and bool(value.abs().sum() > 0)
    assert moved > 0  # training changed the adapter


def cli(out: Path, base: Path, text: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "l2v_models.cli", "train", "simcse", "--model", str(base),
            "--data", str(text), "--output", str(out), "--steps", str(RESUMED["steps"]),
            "--batch-size", str(B), "--lr", str(RESUMED["lr"]), "--save-every",
            str(RESUMED["save_every"]), "--nproc-per-node", "2", "-q", *extra]  # fmt: skip


def test_killed_process_stops_the_run_and_resume_finishes_it(setup, two_processes):
    import psutil

    root, base, text, _ = setup
    out = root / "killed"
    proc = subprocess.Popen(cli(out, base, text), env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    first = out / "checkpoints" / "step-000002" / "trainer_state.pt"
    deadline = time.monotonic() + 300
    while not first.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.01)
    workers = psutil.Process(proc.pid).children(recursive=True)
    victim = next(w for w in workers if w.environ().get("RANK") == "1")
    victim.kill()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-3000:]
    # The launcher's line naming the process that died; before it, the survivor's own line when
    # it noticed the loss before the launcher stopped it (a race: it may not have).
    *survivor, line = [x for x in err.splitlines() if x.startswith("l2v: error:")]
    assert f"rank 1 (pid {victim.pid}) was killed by SIGKILL" in line, err[-3000:]
    for x in survivor:
        assert "rank 0 lost the other processes during step" in x, err[-3000:]
        assert "Connection" in x and "GLHF" not in x
    assert "--resume" in line and str(out / "checkpoints" / "step-0000") in line
    stopped_at = latest_checkpoint(out)
    assert int(stopped_at.name.split("-")[1]) < RESUMED["steps"]

    done = subprocess.run(cli(out, base, text, "--resume"), env=env(), capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {stopped_at}" in done.stdout
    reference, adapter = two_processes["resumed-reference"]
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, RESUMED["steps"] + 1))
    assert [r["loss"] for r in log] == reference  # bit for bit
    ours = load_file(out / "adapter_model.safetensors")
    for key, value in load_file(adapter / "adapter_model.safetensors").items():
        assert torch.equal(ours[key], value), key


def test_resume_on_another_number_of_processes_says_what_changes(setup, two_processes):
    root, base, text, _ = setup
    out = root / "killed"  # written by the test above on 2 processes
    done = sorted(p for p in out.glob("checkpoints/step-*") if (p / "trainer_state.pt").is_file())
    if len(done) < 2:
        pytest.skip("needs the 2-process checkpoints of the killed-run test")
    checkpoint = done[1]  # step 4: steps remain to train
    step = int(checkpoint.name.split("-")[1])
    loaded = load_for_training(str(base), dtype=torch.float32, device="cpu")
    config = TrainConfig(**RESUMED)
    trainer = Trainer(loaded, config, model_arg=str(base))
    batcher = trainer.batches([text])
    notes = trainer.load_checkpoint(checkpoint, batcher)
    assert trainer.step == step and len(notes) == 1
    assert "written by a run on 2 process(es); resuming on 1" in notes[0]
    assert f"1 x ({B} examples) instead of 2 x" in notes[0]
    history = trainer.fit(batcher, progress=False, stop_at=step + 1)
    assert len(history) == 1 and np.isfinite(history[0]["loss"])
