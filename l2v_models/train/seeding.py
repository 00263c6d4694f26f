"""Seeds derived from the run's seed: every random draw of a step is a function of where it is.

    derive_seed(seed, MASKS, step, example)       # MNTP masks of one text of one step
    derive_seed(seed, DROPOUT, step, rank, chunk) # dropout of one forward (torch.manual_seed)

Nothing random carries state from one step to the next, so a resumed run draws exactly what the
uninterrupted run drew (no generator state to save), a text's MNTP masks are the same whether
its step runs on one process or many, and GradCache's second forward of a chunk repeats the
first one's dropout masks. Derivation: numpy's SeedSequence over the parts (a hash with good
mixing), 63 bits.
"""

from __future__ import annotations

import numpy as np

MASKS = 1
DROPOUT = 2


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from non-negative ints (the run's seed first, then a purpose and indices)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)
