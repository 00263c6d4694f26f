"""`l2v eval`: real human-labelled evaluation data, metrics with bootstrap noise, reference rows.

    metrics.py   Pearson/Spearman, recall@k/MRR@k, percentile bootstrap (numpy)
    wordnet.py   WordNet 3.0 reader (Debian wordnet-base) and the held-out split `is_heldout`
                 that training imports to keep evaluation synsets out of its data
    data.py      readers for the gensim wheel's test data (Lee corpus, SimLex-999, WordSim-353)
    tasks.py     the tasks (lee, wordnet, simlex, wordsim) and `evaluation_texts()`
    encoders.py  the l2v model and the references (TF-IDF, all-MiniLM-L6-v2)
    runner.py    rows, paired comparisons, table, JSON
    cli.py       the `eval` subcommand (imports argparse only)
Nothing heavy is imported here.
"""
