"""Several training files mixed with weights (`--data a.jsonl b.parquet --data-weights 3 1`).

    stream = MixedStream(index, weights=[3, 1], seed=0)   # a drop-in for data.ExampleStream
    example = stream.next()

Draw k picks file f with probability w_f / sum(w) (numpy's PCG64, seeded (seed, k // 1024) per
block of 1024 draws), then takes that file's next example in the file's own seeded order: epoch
e of file f is a permutation seeded (seed, e, f + 1), so a small file with a large weight is
read again sooner than a large one. Without weights the files are one pool (ExampleStream:
each example once per epoch, so a file's share is its size). The state (draws so far, each
file's epoch and cursor, the weights) resumes exactly; resuming with other weights is refused.
"""

from __future__ import annotations

import math

import numpy as np

from l2v_models.train.data import DataError, DataIndex, Example

_BLOCK = 1024
_MIX_STREAM = 0x6D6978  # separates the file draws from the permutations' seeds


def check_weights(weights, paths) -> list[float]:
    """Validated weights, one per data file (DataError naming the problem)."""
    weights = [float(w) for w in weights]
    if len(weights) != len(paths):
        raise DataError(f"--data-weights gives {len(weights)} weights for {len(paths)} data "
                        "files; give one weight per file, in the same order")  # fmt: skip
    for w, p in zip(weights, paths, strict=True):
        if not (math.isfinite(w) and w > 0):
            raise DataError(f"--data-weights: the weight of {p} must be a positive number, got "
                            f"{w}")  # fmt: skip
    return weights


class MixedStream:
    """Examples of several files drawn by weight (see the module docstring); the interface of
    data.ExampleStream (next, state, restore, close, index)."""

    def __init__(self, index: DataIndex, weights, seed: int = 0, shuffle: bool = True):
        self.index, self.seed, self.shuffle = index, int(seed), shuffle
        self.weights = check_weights(weights, index.paths)
        total = sum(self.weights)
        self.probs = np.asarray([w / total for w in self.weights])
        self.ranges = [index.file_range(f) for f in range(len(index.paths))]
        self.draws = 0
        self.files = [[0, 0] for _ in self.ranges]  # [epoch, cursor] per file
        self._orders: dict[int, tuple[int, np.ndarray]] = {}
        self._block: tuple[int, np.ndarray] | None = None
        self._handles: dict = {}

    def _file_for(self, k: int) -> int:
        block = k // _BLOCK
        if self._block is None or self._block[0] != block:
            rng = np.random.default_rng([self.seed, _MIX_STREAM, block])
            self._block = (block, rng.choice(len(self.probs), size=_BLOCK, p=self.probs))
        return int(self._block[1][k % _BLOCK])

    def _order(self, f: int, epoch: int) -> np.ndarray:
        cached = self._orders.get(f)
        if cached is None or cached[0] != epoch:
            lo, hi = self.ranges[f]
            perm = (np.random.default_rng([self.seed, epoch, f + 1]).permutation(hi - lo)
                    if self.shuffle else np.arange(hi - lo))  # fmt: skip
            cached = self._orders[f] = (epoch, lo + perm)
        return cached[1]

    def next(self) -> Example:
        f = self._file_for(self.draws)
        lo, hi = self.ranges[f]
        epoch, cursor = self.files[f]
        if cursor >= hi - lo:
            epoch, cursor = epoch + 1, 0
        example = self.index.read(int(self._order(f, epoch)[cursor]), self._handles)
        self.files[f] = [epoch, cursor + 1]
        self.draws += 1
        return example

    def state(self) -> dict:
        return {"mix": list(self.weights), "draws": self.draws,
                "files": [list(x) for x in self.files]}  # fmt: skip

    def restore(self, state: dict) -> None:
        if state.get("mix") != self.weights:
            was = state.get("mix")
            raise DataError(f"cannot resume: the checkpoint's data was mixed with --data-weights "
                            f"{was if was is not None else '(none)'}, this run gives "
                            f"{self.weights}; resume with the same data options")  # fmt: skip
        if len(state["files"]) != len(self.ranges):
            raise DataError("cannot resume: the checkpoint was written with another number of "
                            "data files; resume with the same --data")  # fmt: skip
        self.draws = int(state["draws"])
        self.files = [[int(e), int(c)] for e, c in state["files"]]

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()
