#!/usr/bin/env bash
# Train l2v's default encoder, smollm2-llm2vec: the embedded SmolLM2-135M-Instruct (Q4_1 GGUF)
# made an LLM2Vec encoder by `l2v train` on text that l2v's set-up installs (make_data.py says
# what and how the evaluation data is kept out), then write the two adapter folders l2v ships:
#   bash recipes/smollm2_llm2vec/train.sh [WORK_DIR] [SHIP_DIR]
# WORK_DIR (default ~/l2v-default) gets the data and each stage's adapter, log and summary;
# SHIP_DIR (default l2v_models/checkpoint/smollm2_llm2vec) gets mntp/ and simcse-supervised/
# in float16. Every stage is seeded (--seed 0). On a 2-core CPU: about 16 + 20 + 35 minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."
W=${1:-$HOME/l2v-default}
SHIP=${2:-l2v_models/checkpoint/smollm2_llm2vec}
THREADS=${L2V_TRAIN_THREADS:-2}
mkdir -p "$W"
./run.sh setup
"${L2V_VENV:-.venv}/bin/python" recipes/smollm2_llm2vec/make_data.py "$W/data"
# LoRA r 8 / alpha 16 (llm2vec: 16 / 32) keeps the shipped files small. SmolLM2's tokenizer has
# no BOS, so the first text token would be the model's attention sink (nearly the same vector for
# every text, in the mean of every text): --bos-token gives every text a first token that takes
# the sink and is never pooled. MNTP saves the tokenizer with it; the later stages repeat it.
LORA=(--lora-r 8 --lora-alpha 16 --seed 0 --threads "$THREADS" --exclude-eval --save-every 20
      --bos-token "<|endoftext|>")

# 1. MNTP: Wikipedia paragraphs + Lee background news, 20% of tokens masked.
./run.sh train mntp --data "$W/data/mntp.txt" --output "$W/mntp" "${LORA[@]}" \
    --steps 100 --batch-tokens 2048 --max-length 128 --lr 2e-4 --warmup-steps 10
# 2. SimCSE on top of MNTP: sentences of the same text, each its own positive under dropout.
./run.sh train simcse --peft "$W/mntp" --data "$W/data/sentences.txt" --output "$W/simcse" \
    "${LORA[@]}" --steps 90 --batch-size 64 --max-length 32 --lr 3e-4 --warmup-steps 10
# 3. Supervised on top of MNTP + SimCSE: WordNet, paragraph and article triples with hard
#    negatives (similarity scale 20, not llm2vec's 50: at 50 this short run got worse on Lee).
./run.sh train supervised --peft "$W/mntp" "$W/simcse" --data "$W/data/supervised.jsonl" \
    --output "$W/supervised" "${LORA[@]}" --steps 250 --batch-size 32 --max-length 64 \
    --lr 2e-4 --warmup-steps 10 --scale 20

# Ship: the MNTP folder (adapter, config, tokenizer) and SimCSE + supervised stacked into one
# adapter (exactly their chained merge), both in float16.
"${L2V_VENV:-.venv}/bin/python" - "$W" "$SHIP" <<'PY'
import sys
from pathlib import Path

import torch

from l2v_models.train.save import stack_adapters

work, ship = Path(sys.argv[1]), Path(sys.argv[2])
stack_adapters([work / "mntp"], ship / "mntp", dtype=torch.float16)
stack_adapters([work / "simcse", work / "supervised"], ship / "simcse-supervised",
               dtype=torch.float16)
print(f"wrote {ship}/mntp and {ship}/simcse-supervised")
PY
