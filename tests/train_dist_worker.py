"""Run by torchrun for tests/test_train_distributed.py: training runs on several processes (gloo,
CPU), one after the other in one process group; rank 0 writes each run's step losses
(results.json) and adapter (OUT/<name>/).

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/train_dist_worker.py SPEC

SPEC (JSON): {"base": model dir, "out": folder, "runs": [{"name", "data": [files],
"config": TrainConfig keywords}, ...]}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from l2v_models.train.distributed import init_from_environment, shutdown
from l2v_models.train.trainer import TrainConfig, Trainer, load_for_training


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    d, device = init_from_environment("cpu")
    results = {}
    try:
        for run in spec["runs"]:
            loaded = load_for_training(spec["base"], dtype=torch.float32, device="cpu")
            trainer = Trainer(loaded, TrainConfig(**run["config"]), model_arg=spec["base"],
                              dist=d, device=device)  # fmt: skip
            history = trainer.fit(trainer.batches(run["data"]), progress=False)
            results[run["name"]] = [h["loss"] for h in history]
            if d.main:
                trainer.save(Path(spec["out"]) / run["name"])
        if d.main:
            (Path(spec["out"]) / "results.json").write_text(json.dumps(results))
    finally:
        shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
