"""Training data for the default model (recipes/smollm2_llm2vec/train.sh), from text that l2v's
set-up installs. Nothing here is an evaluation text of `l2v eval`:

    python recipes/smollm2_llm2vec/make_data.py OUT_DIR

writes
- OUT_DIR/mntp.txt: paragraphs of gensim's shortened English Wikipedia dump and the 300 Lee
  *background* news articles (lee_background.cor; the 50 Lee evaluation documents are lee.cor,
  a different file that `l2v train` refuses);
- OUT_DIR/sentences.txt: the sentences of those paragraphs and articles (SimCSE);
- OUT_DIR/supervised.jsonl: (query, positive, hard negative) triples of three kinds
  - WordNet definition -> an example sentence of its synset; negative: an example of a sibling
    synset (same hypernym);
  - WordNet lemma -> the definition of one of its synsets; negative: a sibling's definition;
  - WordNet lemma -> another lemma of the same synset (a synonym); negative: a word of a random
    other synset;
  - a sentence of a paragraph (or news article) -> the rest of that paragraph; negative: a
    paragraph of another article;
  - a paragraph -> another paragraph of the same Wikipedia article (a news article: its first
    half -> its second half); negative: a paragraph of another article.
  WordNet triples use only synsets outside the held-out split (l2v_models.eval.wordnet.is_heldout);
  `l2v train --exclude-eval` then drops any example that still contains a scored text (e.g. a
  lemma that is a SimLex or WordSim word).

Everything is seeded (random.Random(0)), so the files are the same on every machine.
"""

from __future__ import annotations

import bz2
import json
import os
import random
import re
import sys
from pathlib import Path

from l2v_models.eval.data import gensim_file
from l2v_models.eval.wordnet import is_heldout, read_wordnet

WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")
# Triples of each kind (the trainer shuffles all of them together).
MAX_TRIPLES = {"definition": 8000, "lemma": 6000, "synonym": 6000, "paragraph": 4000,
               "article": 5000}  # fmt: skip


def wiki_articles() -> list[list[str]]:
    """The shortened Wikipedia dump -> articles -> clean paragraphs (>= 8 words, no lists,
    tables or headings)."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    articles = []
    with bz2.open(gensim_file(WIKI_DUMP)) as f:
        for _, text, _ in extract_pages(f):
            paragraphs = []
            for para in filter_wiki(text).split("\n"):
                para = " ".join(para.replace("'''", "").replace("''", "").split())
                if len(para.split()) >= 8 and not para.startswith(("*", "|", "!", "{", "=")):
                    paragraphs.append(para)
            if paragraphs:
                articles.append(paragraphs)
    return articles


def news_articles() -> list[list[str]]:
    """lee_background.cor: one news article per line, kept as it is (trailing space included);
    each article is one 'paragraph'."""
    with open(gensim_file("lee_background.cor"), encoding="latin-1") as f:
        return [[line.rstrip("\r\n")] for line in f if line.strip()]


def sentences(paragraph: str) -> list[str]:
    return [s.strip() for s in SENTENCE_END.split(paragraph.strip()) if len(s.split()) >= 6]


def wordnet_triples(rng: random.Random) -> dict[str, list[dict]]:
    synsets = [s for s in read_wordnet() if not is_heldout(s)]
    by_id = {s.id: s for s in synsets}
    children: dict[str, list[str]] = {}
    for s in synsets:
        for symbol, target in s.pointers:
            if symbol == "@":
                children.setdefault(target, []).append(s.id)

    def sibling(s, need_examples: bool):
        pool = [by_id[c] for p, t in s.pointers if p == "@" for c in children.get(t, ())
                if c != s.id and (by_id[c].examples or not need_examples)]  # fmt: skip
        if pool:
            return rng.choice(pool)
        while True:  # no sibling: any other synset
            other = rng.choice(synsets)
            if other.id != s.id and (other.examples or not need_examples):
                return other

    definition, lemma, synonym = [], [], []
    for s in synsets:
        if s.examples:
            definition.append({"query": s.definition, "positive": rng.choice(s.examples),
                               "negative": rng.choice(sibling(s, True).examples)})  # fmt: skip
        word = rng.choice(s.lemmas)
        lemma.append({"query": word, "positive": s.definition,
                      "negative": sibling(s, False).definition})  # fmt: skip
        words = sorted({w.lower() for w in s.lemmas})
        if len(words) >= 2:  # negative: a word of any other synset (a sibling may be related)
            query, positive = rng.sample(words, 2)
            other = rng.choice(synsets)
            while other.id == s.id:
                other = rng.choice(synsets)
            synonym.append({"query": query, "positive": positive,
                            "negative": rng.choice(other.lemmas).lower()})  # fmt: skip
    return {"definition": definition, "lemma": lemma, "synonym": synonym}


def paragraph_triples(articles: list[list[str]], rng: random.Random) -> list[dict]:
    triples = []
    for i, article in enumerate(articles):
        for para in article:
            parts = sentences(para)
            if len(parts) < 2:
                continue
            k = rng.randrange(len(parts))
            rest = " ".join(parts[:k] + parts[k + 1 :])
            j = rng.randrange(len(articles) - 1)
            other = articles[j + (j >= i)]
            triples.append({"query": parts[k], "positive": rest, "negative": rng.choice(other)})
    return triples


def article_triples(articles: list[list[str]], rng: random.Random) -> list[dict]:
    triples = []
    for i, article in enumerate(articles):
        if len(article) >= 2:
            pairs = list(zip(article, article[1:], strict=False))
        else:  # one paragraph (a news article): its halves, by sentence
            parts = sentences(article[0])
            half = len(parts) // 2
            pairs = [(" ".join(parts[:half]), " ".join(parts[half:]))] if half >= 2 else []
        for query, positive in pairs:
            j = rng.randrange(len(articles) - 1)
            other = articles[j + (j >= i)]
            triples.append({"query": query, "positive": positive, "negative": rng.choice(other)})
    return triples


def main(out: Path) -> None:
    rng = random.Random(0)
    out.mkdir(parents=True, exist_ok=True)
    articles = wiki_articles() + news_articles()
    paragraphs = [p for a in articles for p in a]
    (out / "mntp.txt").write_text("".join(p + "\n" for p in paragraphs), encoding="utf-8")
    sents = [s for p in paragraphs for s in sentences(p)]
    (out / "sentences.txt").write_text("".join(s + "\n" for s in sents), encoding="utf-8")
    kinds = wordnet_triples(rng)
    kinds["paragraph"] = paragraph_triples(articles, rng)
    kinds["article"] = article_triples(articles, rng)
    triples = []
    for kind, rows in kinds.items():
        rng.shuffle(rows)
        triples += rows[: MAX_TRIPLES[kind]]
        print(f"{kind}: {min(len(rows), MAX_TRIPLES[kind])} of {len(rows)} triples")
    rng.shuffle(triples)
    with open(out / "supervised.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(t) + "\n" for t in triples)
    print(f"{out}: {len(paragraphs)} paragraphs, {len(sents)} sentences, {len(triples)} triples")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: python {os.path.relpath(__file__)} OUT_DIR")
    main(Path(sys.argv[1]))
