"""`l2v eval --mteb TASK...`: run MTEB tasks whose data is on this machine, say which is not.

    tasks, missing = load_local_tasks(["STS12", "SciFact"])   # missing: {name: why}
    rows = run_tasks(L2VMtebEncoder(...), tasks)                # one row per task/split/subset
    print(format_rows(rows))

Data "on this machine" is what the Hugging Face datasets cache already holds (HF_HOME,
HF_DATASETS_CACHE): the tasks are loaded with the hub switched off, so nothing is downloaded and
no request waits on a network that is not there. A task whose data is not cached is reported with
the dataset MTEB reads it from; `download_hint` says how to fetch it on a machine with network.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass


class UnknownTask(ValueError):
    """A name MTEB does not know (the message names it and MTEB's suggestion)."""


@dataclass
class MtebRow:
    """One MTEB score: task, split, subset, the task's main metric and its value."""

    task: str
    task_type: str
    split: str
    subset: str
    metric: str
    value: float

    def to_json(self) -> dict:
        return asdict(self)


@contextlib.contextmanager
def hub_offline():
    """The Hugging Face hub switched off (environment and the already imported libraries)."""
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    saved_env = {n: os.environ.get(n) for n in names}
    os.environ.update({n: "1" for n in names})
    patched = []
    for module_name, attr in (("huggingface_hub.constants", "HF_HUB_OFFLINE"),
                              ("datasets.config", "HF_HUB_OFFLINE"),
                              ("datasets.config", "HF_DATASETS_OFFLINE")):  # fmt: skip
        with contextlib.suppress(ImportError):
            module = __import__(module_name, fromlist=[attr])
            if hasattr(module, attr):
                patched.append((module, attr, getattr(module, attr)))
                setattr(module, attr, True)
    try:
        yield
    finally:
        for module, attr, value in patched:
            setattr(module, attr, value)
        for n, value in saved_env.items():
            if value is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = value


def resolve_tasks(names: Sequence[str]) -> list:
    """MTEB task objects for the names; UnknownTask for a name MTEB does not have."""
    import mteb

    tasks = []
    for name in names:
        try:
            tasks.append(mteb.get_task(name))
        except KeyError as e:
            detail = str(e.args[0]) if e.args else name
            raise UnknownTask(f"unknown MTEB task {name!r} ({detail})") from None
    return tasks


def load_local_tasks(names: Sequence[str], log: Callable[[str], None] | None = None):
    """(tasks whose data loaded from the local cache, {name: why} for the others)."""
    tasks = resolve_tasks(names)
    present, missing = [], {}
    with hub_offline():
        for task in tasks:
            name = task.metadata.name
            try:
                task.load_data()
            except Exception as e:  # datasets' errors for an absent cache vary by version
                dataset = (task.metadata.dataset or {}).get("path", "?")
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                missing[name] = f"dataset {dataset} is not in the local Hugging Face cache " \
                                f"({type(e).__name__}: {first[:160]})"  # fmt: skip
                continue
            present.append(task)
            if log:
                log(f"[mteb] {name}: data found locally")
    return present, missing


def download_hint(missing: Sequence[str]) -> str:
    names = ", ".join(repr(n) for n in missing)
    return (
        "on a machine with network, fetch the data into the Hugging Face cache with "
        f"python -c \"import mteb; [t.load_data() for t in mteb.get_tasks(tasks=[{names}])]\" "
        "and copy the cache (HF_HOME) here"
    )


def run_tasks(encoder, tasks, *, log: Callable[[str], None] | None = None) -> list[MtebRow]:
    """mteb.evaluate the encoder (an MTEB encoder, e.g. L2VMtebEncoder) on loaded tasks, no
    result cache; one row per task, split and subset with the task's main score."""
    import mteb

    rows = []
    for task in tasks:
        if log:
            log(f"[mteb] running {task.metadata.name}")
        with hub_offline():
            result = mteb.evaluate(encoder, task, cache=None, show_progress_bar=False,
                                   overwrite_strategy="always")  # fmt: skip
        for task_result in result.task_results:
            for split, scores in task_result.scores.items():
                for entry in scores:
                    rows.append(MtebRow(
                        task=task_result.task_name, task_type=task.metadata.type, split=split,
                        subset=str(entry.get("hf_subset", "default")),
                        metric=task.metadata.main_score, value=float(entry["main_score"]),
                    ))  # fmt: skip
    return rows


def format_rows(rows: Sequence[MtebRow], model: str) -> str:
    """A markdown table of the rows."""
    lines = [f"MTEB, model {model}", "", "| task | type | split | subset | metric | value |",
             "| --- | --- | --- | --- | --- | ---: |"]  # fmt: skip
    lines += [f"| {r.task} | {r.task_type} | {r.split} | {r.subset} | {r.metric} | "
              f"{r.value:.4f} |" for r in rows]  # fmt: skip
    return "\n".join(lines)
