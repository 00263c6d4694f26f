"""The output folder of `l2v train`: never mix two runs, never lose an earlier run to an error.

    check_output(output, resume=False, overwrite=False)   # UsageError for a folder in use
    replaced = Replacement(output); replaced.begin()       # --overwrite, once the model loaded
    ... train ...
    replaced.commit()        # the new run wrote its adapter: the earlier run goes
    replaced.rollback()      # the new run failed: see Replacement

What a run writes: the adapter files (save.py), train_log.jsonl, train_summary.json and
checkpoints/; other files in the folder are never touched.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from l2v_models.errors import UsageError
from l2v_models.train.checkpoints import latest_checkpoint
from l2v_models.train.save import ADAPTER_CONFIG, ADAPTER_WEIGHTS, ENCODER_FILES

LOG_FILE = "train_log.jsonl"
SUMMARY_FILE = "train_summary.json"  # written next to the adapter at the end of a run
BACKUP_DIR = ".replaced-run"  # --overwrite keeps the earlier run here until the new one is done


def run_files(output) -> list[str]:
    """Names in `output` that a training run wrote (files and the checkpoints folder)."""
    output = Path(output)
    names = [n for n in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, *ENCODER_FILES, LOG_FILE, SUMMARY_FILE)
             if (output / n).is_file()]  # fmt: skip
    if (output / "checkpoints").is_dir():
        names.append("checkpoints")
    return names


def check_output(output, *, resume: bool, overwrite: bool) -> Path | None:
    """UsageError when the run may not write into `output`; returns the checkpoint to resume
    from (with resume), else None."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {output} is a file; pass a folder")
    if resume and overwrite:
        raise UsageError("--resume continues the run in --output and --overwrite replaces it: "
                         "pass one of them")  # fmt: skip
    if resume:
        checkpoint = latest_checkpoint(output)
        if checkpoint is None:
            raise UsageError(f"--resume: no checkpoint in {output / 'checkpoints'} (write them "
                             "with --save-every N)")  # fmt: skip
        return checkpoint
    if not overwrite and output.is_dir() and any(output.iterdir()):
        # Training into it would replace its adapter and append to its log, which would then no
        # longer describe the adapter beside it.
        if (output / "checkpoints").is_dir():
            raise UsageError(f"{output} holds checkpoints of an earlier run: pass --resume to "
                             "continue it, --overwrite to replace it, or another --output")
        raise UsageError(f"--output {output} is not empty (an earlier run's adapter and log?): "
                         "pass --overwrite to replace them, or another --output")  # fmt: skip
    return None


class Replacement:
    """--overwrite without losing the earlier run to a failed new one.

    begin(): the earlier run's files move into OUTPUT/.replaced-run/ (a leftover of an earlier
    interrupted replacement is deleted first: that run had been replaced already). commit():
    the new run finished, the backup is deleted. rollback(): the new run failed; if it wrote
    no checkpoint its files are deleted and the earlier run moves back (the folder is as it
    was), otherwise both stay (the new run can --resume) and the message says where the
    earlier one is."""

    def __init__(self, output):
        self.output = Path(output)
        self.backup = self.output / BACKUP_DIR
        self.moved: list[str] = []

    def begin(self) -> list[str]:
        if self.backup.exists():
            shutil.rmtree(self.backup)
        names = run_files(self.output)
        if names:
            self.backup.mkdir(parents=True)
            for name in names:
                os.replace(self.output / name, self.backup / name)
        self.moved = names
        return names

    def commit(self) -> None:
        if self.backup.exists():
            shutil.rmtree(self.backup)

    def rollback(self) -> str | None:
        """Undo after a failure; returns a note for the user, or None when nothing moved."""
        if not self.moved:
            return None
        if latest_checkpoint(self.output) is not None:
            return (f"the run you replaced is kept in {self.backup} (this run wrote checkpoints: "
                    "--resume continues it)")  # fmt: skip
        for name in run_files(self.output):
            target = self.output / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        for name in self.moved:
            os.replace(self.backup / name, self.output / name)
        self.backup.rmdir()
        return f"the earlier run in {self.output} was put back as it was"


def truncate_log(path, step: int) -> None:
    """Drop log lines past a checkpoint's step (a resumed run trains them again)."""
    path = Path(path)
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]  # fmt: skip
    path.write_text("".join(line + "\n" for line in keep))
