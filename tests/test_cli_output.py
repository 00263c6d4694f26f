"""`l2v encode -o PATH`: an output that cannot be written is refused before the model loads
(one `l2v: error:` line, exit 2), and the output is written atomically (no half file, no stray
temporary file, the old file kept on failure).

Permissions are real: the unwritable cases run `l2v` in a forked child, as the unprivileged
user `nobody` when the tests run as root (root may write anywhere), with the model loader
replaced by one that fails the test when reached.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

import numpy as np
import pytest

from l2v_models import cli, encode_cli

NOBODY = 65534


@pytest.fixture
def no_model_load(monkeypatch):
    from l2v_models import embedder

    def loader(*args, **kwargs):
        raise AssertionError("the model loader was called")

    monkeypatch.setattr(embedder.Embedder, "from_pretrained", loader)


def l2v_unprivileged(argv) -> tuple[int, str, str]:
    """cli.main(argv) in a forked child (as `nobody` under root) -> (exit code, stdout, stderr).
    Forked, not a new interpreter: `nobody` may not be able to read this Python's install."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave, whatever happens
        try:
            os.close(read_end)
            if os.geteuid() == 0:
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                rc = cli.main(argv)
            result = [rc, out.getvalue(), err.getvalue()]
        except BaseException as e:  # reported to the parent
            result = [-1, "", f"child failed: {e!r}"]
        finally:
            try:
                os.write(write_end, json.dumps(result).encode())
            finally:
                os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    rc, out, err = json.loads(data)
    return rc, out, err


@pytest.fixture
def shared_dir():
    """A folder everyone may enter (pytest's tmp_path is private to root when run as root)."""
    path = Path(tempfile.mkdtemp(prefix="l2v-output-test-"))
    path.chmod(0o755)
    yield path
    for p in path.rglob("*"):  # make everything removable again
        p.chmod(0o777 if p.is_dir() else 0o666)
    shutil.rmtree(path)


def test_unwritable_output_is_refused_before_the_model_loads(shared_dir, no_model_load):
    locked = shared_dir / "locked"
    locked.mkdir()
    locked.chmod(0o555)  # r-x: no new files
    target = locked / "emb.npy"
    rc, out, err = l2v_unprivileged(["encode", "a text", "-o", str(target)])
    assert rc == 2 and out == "" and err.count("\n") == 1, err
    assert err == (f"l2v: error: cannot write --output {target}: cannot create a file in "
                   f"{locked} (Permission denied)\n")
    assert list(locked.iterdir()) == []

    open_dir = shared_dir / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    old = open_dir / "emb.jsonl"
    old.write_text("old\n")
    old.chmod(0o444)  # in a writable folder: a rename would replace it, so refuse explicitly
    rc, out, err = l2v_unprivileged(["encode", "a text", "-o", str(old)])
    assert rc == 2 and out == "", err
    assert err == f"l2v: error: cannot write --output {old}: the file exists and is read-only\n"
    assert old.read_text() == "old\n" and [p.name for p in open_dir.iterdir()] == [old.name]


def test_directory_output_is_refused(tmp_path, capsys, no_model_load):
    folder = tmp_path / "emb.npy"
    folder.mkdir()
    assert cli.main(["encode", "a text", "-o", str(folder)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"l2v: error: --output {folder} is a directory; pass a file " \
        "name (.npy or .jsonl)\n"
    assert cli.main(["encode", "a text", "-o", str(tmp_path / "missing" / "emb.npy")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_output_is_written_atomically(tmp_path):
    emb = np.arange(6, dtype=np.float32).reshape(2, 3)
    items = ["a", ["do this", "b"]]
    npy, jsonl = tmp_path / "emb.npy", tmp_path / "emb.jsonl"
    for path in (npy, jsonl):
        assert encode_cli.check_output_path(str(path)) == path
    assert list(tmp_path.iterdir()) == []  # the check leaves nothing behind
    encode_cli.write_output(npy, emb, items)
    encode_cli.write_output(jsonl, emb, items)
    np.testing.assert_array_equal(np.load(npy), emb)
    assert [json.loads(line) for line in jsonl.read_text().splitlines()] == [
        {"text": "a", "embedding": [0.0, 1.0, 2.0]},
        {"instruction": "do this", "text": "b", "embedding": [3.0, 4.0, 5.0]},
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.jsonl", "emb.npy"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(npy.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600
    # A failure half-way (3 items, 2 rows) keeps the old file whole and leaves no temporary.
    jsonl.chmod(0o640)
    before = jsonl.read_text()
    with pytest.raises(ValueError):
        encode_cli.write_output(jsonl, emb + 1, [*items, "c"])  # new rows, but one short
    assert jsonl.read_text() == before and stat.S_IMODE(jsonl.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.jsonl", "emb.npy"]
    encode_cli.write_output(jsonl, emb[:1], items[:1])  # a replaced file keeps its permissions
    assert len(jsonl.read_text().splitlines()) == 1 and stat.S_IMODE(jsonl.stat().st_mode) == 0o640
