"""WordNet 3.0 from Debian's `wordnet-base` data files, and the held-out split.

    synsets = read_wordnet()                 # every synset of data.noun/verb/adj/adv
    heldout = [s for s in synsets if is_heldout(s)]       # evaluation synsets (~10%)
    train = [s for s in synsets if not is_heldout(s)]     # what training may use

The split is a pure function of the synset id (a SHA-256 of it), so it never changes with the
order of the files, the Python version or the machine, and training code (`l2v train`) can import
`is_heldout` to keep every evaluation synset out of its data. Held out means: neither the
synset's definition nor its examples may be trained on; its lemmas may (they are shared with
other synsets).

The data-file format is wndb(5WN): one synset per line,
    offset lex_filenum ss_type w_cnt (word lex_id)*w_cnt p_cnt (ptr)*p_cnt [frames] | gloss
with w_cnt in hex, and a gloss of a definition followed by `; "example"` quotations.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

WORDNET_DIR = Path("/usr/share/wordnet")
WORDNET_ENV = "L2V_WORDNET_DIR"
DATA_FILES = {"n": "data.noun", "v": "data.verb", "a": "data.adj", "r": "data.adv"}
HELDOUT_PERCENT = 10
_SPLIT_SALT = "l2v-wordnet-heldout-v1:"
INSTALL_HINT = (
    "install Debian's wordnet-base package (apt-get install wordnet-base; ./run.sh setup does "
    f"it when run as root), or point ${WORDNET_ENV} at a folder with WordNet 3.0's data.noun, "
    "data.verb, data.adj and data.adv"
)
_QUOTED = re.compile(r'"([^"]*)"')


class DataMissing(FileNotFoundError):
    """Evaluation data is not installed; the message says what to install."""


@dataclass(frozen=True)
class Synset:
    """One WordNet synset.

    id: "<offset:08d>-<file pos>", e.g. "02084071-n" (offsets are unique within a data file;
    adjective satellites live in data.adj and get "-a"). ss_type: n, v, a, s or r.
    lemmas: words with "_" turned into spaces. definition: the gloss before its examples.
    examples: the quoted example sentences, in file order. lex_filenum: the lexicographer file
    (lexnames(5WN): 5 = noun.animal, ...). pointers: (symbol, target id) pairs, e.g. ("@", id)
    for a hypernym.
    """

    id: str
    ss_type: str
    lemmas: tuple[str, ...]
    definition: str
    examples: tuple[str, ...]
    lex_filenum: int
    pointers: tuple[tuple[str, str], ...] = field(default=(), repr=False)


def wordnet_dir() -> Path:
    """$L2V_WORDNET_DIR, else /usr/share/wordnet (Debian's wordnet-base)."""
    return Path(os.environ.get(WORDNET_ENV) or WORDNET_DIR)


def _file_pos(ss_type: str) -> str:
    return "a" if ss_type == "s" else ss_type


def synset_id(offset: int, pos: str) -> str:
    """The id of the synset at `offset` of the data file for `pos` (n, v, a, s or r)."""
    return f"{int(offset):08d}-{_file_pos(pos)}"


def is_heldout(synset: Synset | str) -> bool:
    """True for the ~10% of synsets kept for evaluation (a Synset or its id "02084071-n")."""
    sid = synset.id if isinstance(synset, Synset) else str(synset)
    digest = hashlib.sha256((_SPLIT_SALT + sid).encode("ascii")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < HELDOUT_PERCENT


def parse_gloss(gloss: str) -> tuple[str, tuple[str, ...]]:
    """Split a gloss into (definition, examples): the examples are its double-quoted parts; the
    definition is the text before the first of them, without its trailing "; "."""
    first = gloss.find('"')
    definition = (gloss if first < 0 else gloss[:first]).strip().rstrip(";").strip()
    examples = tuple(e.strip() for e in _QUOTED.findall(gloss) if e.strip())
    return definition, examples


def parse_data_line(line: str) -> Synset:
    """One data-file line (not a licence line, which starts with two spaces) -> Synset."""
    head, sep, gloss = line.partition(" | ")
    if not sep:
        head, gloss = line.rstrip().rstrip("|"), ""
    fields = head.split()
    offset, lex_filenum, ss_type = fields[0], int(fields[1]), fields[2]
    w_cnt = int(fields[3], 16)
    words = fields[4 : 4 + 2 * w_cnt : 2]
    lemmas = tuple(re.sub(r"\([a-z]+\)$", "", w).replace("_", " ") for w in words)
    at = 4 + 2 * w_cnt
    p_cnt = int(fields[at])
    pointers = []
    for i in range(p_cnt):
        symbol, target, pos = fields[at + 1 + 4 * i : at + 4 + 4 * i]
        pointers.append((symbol, synset_id(int(target), pos)))
    definition, examples = parse_gloss(gloss.strip())
    return Synset(
        id=synset_id(int(offset), ss_type),
        ss_type=ss_type,
        lemmas=lemmas,
        definition=definition,
        examples=examples,
        lex_filenum=lex_filenum,
        pointers=tuple(pointers),
    )


def read_wordnet(directory: Path | str | None = None, pos: str = "nvar") -> list[Synset]:
    """Every synset of the data files for the parts of speech in `pos` (n, v, a, r), in file
    order (read once per process and directory). Raises DataMissing, saying what to install,
    when a file is absent."""
    directory = Path(directory) if directory is not None else wordnet_dir()
    return [s for p in pos for s in _read_data_file(str(directory), p)]


@functools.lru_cache(maxsize=8)
def _read_data_file(directory: str, pos: str) -> tuple[Synset, ...]:
    path = Path(directory) / DATA_FILES[pos]
    if not path.is_file():
        raise DataMissing(f"WordNet data file {path} not found: {INSTALL_HINT}")
    synsets = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("  ") or not line.strip():
                continue  # the licence header
            synsets.append(parse_data_line(line))
    return tuple(synsets)
