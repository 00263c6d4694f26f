"""The default model's training data (recipes/smollm2_llm2vec/make_data.py) keeps `l2v eval`'s
data out: no held-out WordNet synset, no Lee evaluation document, hard negatives from elsewhere.
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest

from l2v_models.eval import wordnet as wn

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def make_data():
    path = ROOT / "recipes" / "smollm2_llm2vec" / "make_data.py"
    spec = importlib.util.spec_from_file_location("make_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_wordnet_triples_use_no_heldout_synset(make_data):
    try:
        synsets = wn.read_wordnet()
    except wn.DataMissing as e:
        pytest.skip(str(e))
    kinds = make_data.wordnet_triples(random.Random(0))
    held = [s for s in synsets if wn.is_heldout(s)]
    held_texts = {s.definition for s in held} | {e for s in held for e in s.examples}
    train_texts = {s.definition for s in synsets if not wn.is_heldout(s)}
    train_texts |= {e for s in synsets if not wn.is_heldout(s) for e in s.examples}
    assert len(kinds["definition"]) > 20000 and len(kinds["lemma"]) > 90000
    # Glosses and examples are checked; words (lemma queries, synonym triples) may be shared with
    # held-out synsets, and the rare word that equals a held-out gloss ("crash") is dropped by
    # `l2v train --exclude-eval`, which the recipe passes.
    gloss_fields = {"definition": ("query", "positive", "negative"),
                    "lemma": ("positive", "negative"), "synonym": ()}  # fmt: skip
    assert set(kinds) == set(gloss_fields)
    for kind, rows in kinds.items():
        for row in rows:
            # A text shared by a held-out and a training synset (a few short glosses) is the
            # training synset's own text; every other held-out text never appears.
            for field in gloss_fields[kind]:
                assert row[field] not in held_texts or row[field] in train_texts, (kind, row)


def test_paragraph_triples_take_negatives_from_other_articles(make_data):
    articles = [
        ["The cat sat on the mat all day long. It purred loudly at every visitor there."],
        ["Stock markets fell sharply today in Asia. Investors sold shares of every bank."],
        ["A short one."],  # under two sentences of six words: no triple
    ]
    triples = make_data.paragraph_triples(articles, random.Random(0))
    assert len(triples) == 2
    for row, article in zip(triples, articles, strict=False):
        assert row["query"] in article[0] and row["positive"] in article[0]
        assert row["query"] != row["positive"] and row["negative"] not in article
    assert make_data.sentences("One two three four five six. Seven.") == [
        "One two three four five six."
    ]
    wiki = [["First paragraph about cats and their many habits.", "Second paragraph on cats."],
            ["News: " + " ".join(f"Sentence number {k} of the news story here." for k in range(4))]]
    news = make_data.sentences(wiki[1][0])
    expected = [(wiki[0][0], wiki[0][1]), (" ".join(news[:2]), " ".join(news[2:]))]
    triples = make_data.article_triples(wiki, random.Random(0))
    for row, (query, positive) in zip(triples, expected, strict=True):
        assert (row["query"], row["positive"]) == (query, positive)
        assert row["negative"] in wiki[0] + wiki[1] and row["negative"] not in (query, positive)


def test_lee_evaluation_documents_are_not_training_text(make_data):
    from l2v_models.eval import data

    try:
        lee = data.lee_documents()
    except wn.DataMissing as e:
        pytest.skip(str(e))
    articles = make_data.news_articles()
    news = {a[0].strip() for a in articles}
    assert len(articles) == 300 and len(lee) == 50 and not {d.strip() for d in lee} & news
