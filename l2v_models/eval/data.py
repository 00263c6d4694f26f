"""Readers for the human-labelled data in the gensim wheel's test data (gensim/test/test_data).

gensim is located, not imported (importing it pulls in scipy and takes seconds):
    lee_documents()   -> 50 news texts (Lee et al. 2005, lee.cor)
    lee_similarities() -> float64 [50, 50] human similarity matrix (similarities0-1.txt; the upper
                          triangle holds the 1,225 judged pairs, the lower one is zero)
    word_pairs("simlex999.txt") -> [(word1, word2, score)]: SimLex-999 (999 pairs), and
    word_pairs("wordsim353.tsv") for WordSim-353 (353 pairs)
    polarity_sentences() -> (200 movie-review sentences, int64 [200] labels: 1 positive)
Every reader raises DataMissing with the install command when the file is absent.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from l2v_models.eval.wordnet import DataMissing

GENSIM_HINT = (
    "the data ships in the gensim wheel's test data: pip install gensim (./run.sh setup installs "
    "it with l2v's [eval] extra)"
)


def gensim_test_data_dir() -> Path:
    """gensim/test/test_data of the installed gensim (not imported)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise DataMissing(f"gensim is not installed; {GENSIM_HINT}")
    return Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data"


def gensim_file(name: str) -> Path:
    """The path of one gensim test-data file, or DataMissing."""
    path = gensim_test_data_dir() / name
    if not path.is_file():
        raise DataMissing(f"{path} not found; {GENSIM_HINT}")
    return path


def lee_documents() -> list[str]:
    """The 50 Lee et al. (2005) news documents, one per line of lee.cor (Latin-1, as gensim's own
    test reads it), in the order of the similarity matrix."""
    text = gensim_file("lee.cor").read_bytes().decode("latin-1")
    docs = [line.strip() for line in text.splitlines() if line.strip()]
    if len(docs) != 50:
        raise ValueError(f"lee.cor: expected 50 documents, found {len(docs)}")
    return docs


def lee_background_documents() -> list[str]:
    """The 300 Lee background news documents (lee_background.cor): not evaluation data."""
    text = gensim_file("lee_background.cor").read_bytes().decode("latin-1")
    return [line.strip() for line in text.splitlines() if line.strip()]


def lee_similarities() -> np.ndarray:
    """float64 [50, 50]: the mean human similarity judgements of the Lee documents (values in
    [0.2, 1] above the diagonal, 1 on it, 0 below); the pairs are its strict upper triangle."""
    path = gensim_file("similarities0-1.txt")
    matrix = np.loadtxt(path, dtype=np.float64)
    if matrix.shape != (50, 50):
        raise ValueError(f"{path}: expected a 50x50 matrix, got {matrix.shape}")
    return matrix


def lee_pairs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i int64 [1225], j int64 [1225], human float64 [1225]): the judged pairs i < j."""
    i, j = np.triu_indices(50, k=1)
    return i.astype(np.int64), j.astype(np.int64), lee_similarities()[i, j]


def word_pairs(name: str) -> list[tuple[str, str, float]]:
    """(word1, word2, mean human score) rows of a gensim word-similarity file (tab-separated,
    "#" comment lines): simlex999.txt (0-10 similarity) or wordsim353.tsv (0-10 relatedness)."""
    path = gensim_file(name)
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 3:
            raise ValueError(f"{path}:{lineno}: expected 3 tab-separated fields, got {line!r}")
        rows.append((parts[0].strip(), parts[1].strip(), float(parts[2])))
    return rows


def polarity_sentences() -> tuple[list[str], np.ndarray]:
    """The 200 sentences of pang_lee_polarity.cor (Pang & Lee's sentence polarity data, lower-
    cased and tokenized, "__label__pos " / "__label__neg " prefixed, Windows-1252):
    (texts, int64 [200] labels, 1 = positive, 0 = negative)."""
    path = gensim_file("pang_lee_polarity.cor")
    texts, labels = [], []
    # Windows-1252, like the original release (0x97 is an em dash, 0xe9 an e-acute)
    for lineno, line in enumerate(path.read_bytes().decode("cp1252").splitlines(), 1):
        if not line.strip():
            continue
        label, _, text = line.strip().partition(" ")
        if label not in ("__label__pos", "__label__neg") or not text.strip():
            raise ValueError(f"{path}:{lineno}: expected '__label__pos|neg TEXT', got {line!r}")
        texts.append(text.strip())
        labels.append(1 if label == "__label__pos" else 0)
    return texts, np.asarray(labels, dtype=np.int64)
