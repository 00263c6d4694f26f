"""`python -m l2v_models.train STAGE ...` is `l2v train STAGE ...`: what torchrun runs on every
process (`torchrun --nproc-per-node N -m l2v_models.train supervised --data ...`)."""

import sys

from l2v_models.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
