"""How far `l2v export`'s folder is from l2v's embeddings under sentence-transformers, on real text.

    python -m bench.export_check [--output DIR] [--instruction TEXT] [--limit N]

Exports the default encoder (smollm2-llm2vec, fp32, CPU) with one instruction as the prompt
"query", then embeds real texts that install with l2v's set-up (gensim's test data: the 50 Lee
news documents, 200 Pang & Lee review sentences, the SimLex-999 words) twice: with l2v (the
original model, llm2vec's rules) and with `SentenceTransformer(folder)`, each without and with
the instruction. Prints one markdown row per (texts, prompt): how many texts, the share whose
cosine is >= 0.99999, and the min and mean cosine; the README quotes this table.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch


def texts_by_kind(limit: int | None) -> dict[str, list[str]]:
    from l2v_models.eval.data import lee_documents, polarity_sentences, word_pairs

    words = sorted({w for a, b, _ in word_pairs("simlex999.txt") for w in (a, b)})
    kinds = {
        "Lee news documents": [" ".join(d.split()) for d in lee_documents()],
        "Pang & Lee sentences": list(polarity_sentences()[0][:200]),
        "SimLex-999 words": words,
    }
    return {k: v[:limit] if limit else v for k, v in kinds.items()}


def cosines(a, b) -> np.ndarray:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return torch.nn.functional.cosine_similarity(a, b, dim=1).numpy()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default=None, help="the export folder (default: a temp dir)")
    p.add_argument("--instruction", default="Retrieve semantically similar text")
    p.add_argument("--limit", type=int, default=None, help="at most N texts of each kind")
    args = p.parse_args(argv)

    from sentence_transformers import SentenceTransformer

    from l2v_models.encoder import LLM2Vec
    from l2v_models.export import export_sentence_transformers

    encoder = LLM2Vec.from_pretrained(device_map="cpu", torch_dtype=torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.output or Path(tmp) / "smollm2-llm2vec-st")
        export_sentence_transformers(encoder, out, prompts={"query": args.instruction},
                                     force=True)  # fmt: skip
        model = SentenceTransformer(str(out), device="cpu")
        print(f"instruction: {args.instruction!r}\n")
        print("| texts | n | prompt | cosine >= 0.99999 | min cosine | mean cosine |")
        print("| --- | ---: | --- | ---: | ---: | ---: |")
        for kind, texts in texts_by_kind(args.limit).items():
            for prompt in (None, "query"):
                items = [[args.instruction, t] for t in texts] if prompt else texts
                ours = encoder.encode(items, show_progress_bar=False)
                theirs = model.encode(texts, prompt_name=prompt, batch_size=16)
                cos = cosines(ours, theirs)
                label = "none" if prompt is None else "the instruction"
                print(f"| {kind} | {len(texts)} | {label} | {np.mean(cos >= 0.99999):.1%} | "
                      f"{cos.min():.4f} | {cos.mean():.5f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
