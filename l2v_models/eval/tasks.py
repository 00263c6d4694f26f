"""The evaluation tasks: real, human-made data that installs here (never copied into the repo).

Each task turns embeddings into one prediction per scored item, and metrics into numbers:
    task = get_task("lee"); task.load(limit=None)
    emb = encoder.encode(task.items(instructions=False))   # float32 [N_texts, D] (or sparse)
    pred = task.predict(emb)                               # float64 [N_items]
    {name: fn(pred, task.gold) for name, fn in task.metrics.items()}
The bootstrap resamples items: queries (retrieval), word pairs, or for Lee the documents (each
is in 49 pairs, so resampling pairs would understate the noise 1.7-2.8x on
the reference models).

    lee      Lee et al. (2005): 50 news documents, 1,225 pairs judged by humans; Pearson and
             Spearman of cosine vs the mean human score. gensim wheel, test/test_data.
    wordnet  WordNet 3.0 held-out synsets (l2v_models.eval.wordnet.is_heldout) that have an
             example: each definition retrieves its synset's first example sentence among all
             of them; recall@1 and MRR@10. Debian's wordnet-base.
    simlex   SimLex-999 (Hill et al. 2015): 999 word pairs rated for similarity; Spearman (and
             Pearson) of the cosine of the two words' embeddings. gensim wheel.
    wordsim  WordSim-353 (Finkelstein et al. 2002): 353 word pairs rated for relatedness; same
             metrics. gensim wheel.
    polarity 200 movie-review sentences labelled positive/negative (Pang & Lee 2005): each is
             classified by the majority label of its 9 nearest other sentences (cosine);
             accuracy. gensim wheel.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from l2v_models.eval import data, metrics
from l2v_models.eval import wordnet as wn

Item = str | list  # a text, or [instruction, text]


def _with_instruction(texts: list[str], instruction: str, instructions: bool) -> list[Item]:
    if not instructions or not instruction:
        return list(texts)
    return [[instruction, t] for t in texts]


def _normalized_rows(x):
    """L2-normalized rows of a dense [N, D] array (float64) or a scipy sparse matrix."""
    if hasattr(x, "tocsr"):  # scipy sparse (TF-IDF)
        x = x.tocsr().astype(np.float64)
        norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1))).ravel()
        scale = 1.0 / np.maximum(norms, 1e-30)
        return x.multiply(scale[:, None]).tocsr()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be 2-D [N, D], got shape {x.shape}")
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float64)


def _row_cosines(emb, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """cos(emb[a[k]], emb[b[k]]) for each k: float64 [P]."""
    e = _normalized_rows(emb)
    if hasattr(e, "tocsr"):
        return np.asarray(e[a].multiply(e[b]).sum(axis=1), dtype=np.float64).ravel()
    return np.einsum("pd,pd->p", e[a], e[b])


class Task:
    """Base class: name, description, source (where the data comes from), licence, metrics
    (name -> fn(pred [N], gold [N]) -> float), instruction (llm2vec-style, used with
    --instructions), bootstrap_unit and resampler(). After load(): gold float64 [N items],
    n_texts."""

    name = ""
    description = ""
    source = ""
    licence = ""
    instruction = ""
    metrics: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {}

    def load(self, limit: int | None = None) -> Task:
        raise NotImplementedError

    def items(self, instructions: bool = False) -> list[Item]:
        raise NotImplementedError

    def predict(self, emb) -> np.ndarray:
        raise NotImplementedError

    @property
    def n_items(self) -> int:
        return int(self.gold.shape[0])

    bootstrap_unit = "item"

    def resampler(self):
        """None (resample items) or a resample(rng) -> indices function for bootstrap_ci."""
        return None

    def score(self, pred: np.ndarray) -> dict[str, float]:
        return {name: fn(pred, self.gold) for name, fn in self.metrics.items()}


_CORRELATIONS = {
    "pearson": lambda pred, gold: metrics.pearson(pred, gold),
    "spearman": lambda pred, gold: metrics.spearman(pred, gold),
}


class PairTask(Task):
    """Cosine of two texts' embeddings vs a human score, per pair. After load(): texts [N]
    unique, a/b int64 [P] indices into texts, gold float64 [P]."""

    metrics = _CORRELATIONS
    instruction = "Retrieve semantically similar text:"

    def _set(self, texts: list[str], a, b, gold) -> None:
        self.texts = texts
        self.a = np.asarray(a, dtype=np.int64)
        self.b = np.asarray(b, dtype=np.int64)
        self.gold = np.asarray(gold, dtype=np.float64)
        self.n_texts = len(texts)

    def items(self, instructions: bool = False) -> list[Item]:
        return _with_instruction(self.texts, self.instruction, instructions)

    def predict(self, emb) -> np.ndarray:
        return _row_cosines(emb, self.a, self.b)


class LeeTask(PairTask):
    name = "lee"
    description = "Lee et al. (2005) news: cosine vs human similarity of 1,225 document pairs"
    source = (
        "gensim wheel: gensim/test/test_data/lee.cor (50 documents) + similarities0-1.txt "
        "(50x50 human judgements)"
    )
    licence = (
        "no licence stated; given by Michael D. Lee to gensim for its tests and shipped in the "
        "gensim wheel (LGPL-2.1); cite Lee, Pincombe & Welsh (2005)"
    )

    def load(self, limit: int | None = None) -> LeeTask:
        docs = data.lee_documents()
        i, j, human = data.lee_pairs()
        if limit is not None:  # the first `limit` documents and the pairs among them
            keep = (i < limit) & (j < limit)
            docs, i, j, human = docs[:limit], i[keep], j[keep], human[keep]
        self._set(docs, i, j, human)
        return self

    bootstrap_unit = "document"

    def resampler(self):
        """Resample the documents, not the pairs: every document is in 49 of the 1,225 pairs."""
        return metrics.document_pair_resampler(self.a, self.b, len(self.texts))


class WordPairTask(PairTask):
    file = ""

    def load(self, limit: int | None = None) -> WordPairTask:
        rows = data.word_pairs(self.file)[:limit]
        words = sorted({w for w1, w2, _ in rows for w in (w1, w2)})
        index = {w: k for k, w in enumerate(words)}
        self._set(
            words, [index[r[0]] for r in rows], [index[r[1]] for r in rows], [r[2] for r in rows]
        )
        return self


class SimLexTask(WordPairTask):
    name = "simlex"
    file = "simlex999.txt"
    description = "SimLex-999: cosine vs human similarity (not relatedness) of 999 word pairs"
    source = "gensim wheel: gensim/test/test_data/simlex999.txt"
    licence = (
        "no licence stated; shipped in the gensim wheel (LGPL-2.1); its authors ask users to cite "
        "Hill, Reichart & Korhonen (2015)"
    )


class WordSimTask(WordPairTask):
    name = "wordsim"
    file = "wordsim353.tsv"
    description = "WordSim-353: cosine vs human relatedness of 353 word pairs"
    source = "gensim wheel: gensim/test/test_data/wordsim353.tsv"
    licence = (
        "no licence stated; shipped in the gensim wheel (LGPL-2.1); cite Finkelstein et al. (2002)"
    )


class WordNetTask(Task):
    """Definition -> example retrieval over the held-out synsets that have an example. After
    load(): queries [Q] (definitions), docs [Q] (each synset's first example; synsets whose
    definition or example repeats an earlier one are dropped), gold = targets int [Q] (query k's
    document is docs[k])."""

    name = "wordnet"
    description = (
        "WordNet 3.0 held-out synsets: definition -> example sentence retrieval "
        "among all held-out examples"
    )
    source = "Debian wordnet-base: /usr/share/wordnet/data.{noun,verb,adj,adv} (WordNet 3.0)"
    licence = "WordNet 3.0 licence (Princeton University; permissive, BSD-like)"
    instruction = "Given a dictionary definition, retrieve a sentence that uses the defined word:"
    metrics = {
        "recall@1": lambda ranks, gold: metrics.recall_at_k(ranks, 1),
        "mrr@10": lambda ranks, gold: metrics.mrr_at_k(ranks, 10),
    }

    def load(self, limit: int | None = None, directory=None) -> WordNetTask:
        queries, docs, seen_q, seen_d = [], [], set(), set()
        for s in wn.read_wordnet(directory):
            if not s.examples or not s.definition or not wn.is_heldout(s):
                continue
            example = s.examples[0]
            if s.definition in seen_q or example in seen_d:
                continue
            seen_q.add(s.definition)
            seen_d.add(example)
            queries.append(s.definition)
            docs.append(example)
        queries, docs = queries[:limit], docs[:limit]
        self.queries, self.docs = queries, docs
        self.gold = np.arange(len(queries), dtype=np.float64)
        self.n_texts = 2 * len(queries)
        return self

    def items(self, instructions: bool = False) -> list[Item]:
        return _with_instruction(self.queries, self.instruction, instructions) + list(self.docs)

    def predict(self, emb) -> np.ndarray:
        """Rank (1-based, ties against) of each query's own example: float64 [Q]."""
        q = len(self.queries)
        e = _normalized_rows(emb)
        scores = _dense(e[:q] @ e[q:].T)
        return metrics.target_ranks(scores, np.arange(q)).astype(np.float64)


class PolarityTask(Task):
    """Leave-one-out k-nearest-neighbour sentiment classification (k = 9, odd: no tied votes).
    After load(): texts [N], labels int64 [N], gold = labels; predict -> 1.0 where the majority
    label of a sentence's k most cosine-similar other sentences is its own label."""

    name = "polarity"
    k = 9
    description = (
        "Pang & Lee sentence polarity: leave-one-out 9-nearest-neighbour accuracy on 200 "
        "labelled movie-review sentences"
    )
    source = "gensim wheel: gensim/test/test_data/pang_lee_polarity.cor (100 pos, 100 neg)"
    licence = (
        "no licence stated; from Pang & Lee's sentence polarity dataset v1.0 (2005), shipped in "
        "the gensim wheel (LGPL-2.1); cite Pang & Lee (2005)"
    )
    instruction = "Classify the sentiment of a movie review sentence:"
    metrics = {"accuracy@9nn": lambda correct, gold: float(np.mean(correct))}

    def load(self, limit: int | None = None) -> PolarityTask:
        texts, labels = data.polarity_sentences()
        if limit is not None:  # keep both classes: alternate positives and negatives
            pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
            keep = np.sort(np.r_[pos[: (limit + 1) // 2], neg[: limit // 2]])
            texts, labels = [texts[i] for i in keep], labels[keep]
        self.texts, self.labels = texts, labels
        self.gold = labels.astype(np.float64)
        self.n_texts = len(texts)
        return self

    def items(self, instructions: bool = False) -> list[Item]:
        return _with_instruction(self.texts, self.instruction, instructions)

    def predict(self, emb) -> np.ndarray:
        """1.0 where the k-NN vote (other sentences only) gets the label right: float64 [N]."""
        e = _normalized_rows(emb)
        sim = _dense(e @ e.T)
        np.fill_diagonal(sim, -np.inf)  # leave one out
        k = min(self.k, len(self.texts) - 1)
        # stable sort on -sim: equal similarities are broken by index, so results are repeatable
        nearest = np.argsort(-sim, axis=1, kind="stable")[:, :k]
        votes = self.labels[nearest].sum(axis=1)
        predicted = (2 * votes > k).astype(np.int64)
        return (predicted == self.labels).astype(np.float64)


TASKS: dict[str, type[Task]] = {
    t.name: t for t in (LeeTask, WordNetTask, SimLexTask, WordSimTask, PolarityTask)
}
DEFAULT_TASKS = ("lee", "wordnet", "simlex", "wordsim", "polarity")


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name]()


def evaluation_texts() -> set[str]:
    """Every text that any task scores (Lee documents, held-out WordNet definitions and
    examples, the SimLex/WordSim words): training data must not contain these. Raises
    DataMissing when a task's data is not installed."""
    texts: set[str] = set()
    for name in TASKS:
        task = get_task(name).load()
        texts.update(t if isinstance(t, str) else t[1] for t in task.items())
    return texts
