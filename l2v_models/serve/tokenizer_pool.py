"""Tokenizer processes: request parsing, validation and tokenization outside the server's
interpreter, so they never compete with the model workers for the GIL.

    pool = TokenizerPool(preparer, workers=4)
    await pool.start()                       # in the server's event loop
    result = await pool.run("openai", body)  # Work | ApiError | bytes (see serve.preparer)
    await pool.close()

Each process is a fresh interpreter (`python -m l2v_models.serve.tokenizer_pool --fd N`: no
copy of the server's threads, CUDA state or weights, and never a re-run of the caller's main
script; it imports the text rules and the tokenizer only, never torch). It reads a pickled
Preparer, then answers requests one at a time over its own socket pair: the event loop writes a
request and reads the answer without blocking and without threads (each message: an 8-byte
big-endian length, then a pickle). A request goes to the process with the fewest requests in
hand. A process that dies (killed, out of memory) is noticed at once by the end of its socket:
every request it held is answered with TokenizerDied (the server's 503, never a hang) and a
fresh process replaces it. The processes ignore SIGINT (a Ctrl-C in the terminal reaches the
whole process group: the server drains and closes them) and exit when the server's end of their
socket closes, so none outlives the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys

logger = logging.getLogger("l2v.serve")

_HEADER = struct.Struct("!Q")


class TokenizerDied(RuntimeError):
    """The tokenizer process holding the request died before answering."""


def default_workers(cores: int | None = None) -> int:
    """Tokenizer processes when none are asked for: half the cores (the rest run the model
    workers, the event loop and the kernels' host threads), at least 1, at most 8."""
    cores = cores or os.cpu_count() or 1
    return max(1, min(8, cores // 2))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _recv(sock: socket.socket) -> bytes:
    (n,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    return _recv_exact(sock, n)


def child_main(fd: int) -> None:
    """A tokenizer process: the Preparer, then requests in, answers out, until the server
    closes the socket."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=fd)
    try:
        preparer = pickle.loads(_recv(sock))
    except (EOFError, OSError):
        return
    while True:
        try:
            task_id, route, body = pickle.loads(_recv(sock))
        except (EOFError, OSError):
            return
        result = preparer.run(route, body)
        data = pickle.dumps((task_id, result), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            sock.sendall(_HEADER.pack(len(data)) + data)
        except OSError:
            return


class _Child:
    """One process and the requests it holds."""

    def __init__(self, payload: bytes, index: int):
        import l2v_models

        ours, theirs = socket.socketpair()
        root = os.path.dirname(os.path.dirname(os.path.abspath(l2v_models.__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        fd = theirs.fileno()
        self.index = index
        self.process = subprocess.Popen(
            [sys.executable, "-m", "l2v_models.serve.tokenizer_pool", "--fd", str(fd)],
            pass_fds=(fd,), env=env, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        theirs.close()
        self.sock = ours
        self.payload = payload
        self.pending: dict[int, asyncio.Future] = {}
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.listener: asyncio.Task | None = None

    @property
    def pid(self) -> int:
        return self.process.pid


class TokenizerPool:
    """`workers` tokenizer processes over one Preparer (see the module docstring)."""

    def __init__(self, preparer, workers: int):
        if workers < 1:
            raise ValueError(f"tokenizer workers must be >= 1, got {workers}")
        self.workers = workers
        self._payload = pickle.dumps(preparer, protocol=pickle.HIGHEST_PROTOCOL)
        self._children: list[_Child] = []
        self._ids = itertools.count()
        self._closing = False
        self.replaced = 0  # processes that died and were replaced

    async def start(self) -> None:
        for i in range(self.workers):
            self._children.append(await self._spawn(i))

    async def _spawn(self, index: int) -> _Child:
        loop = asyncio.get_running_loop()
        # Popen forks and execs: a few ms, off the event loop anyway.
        child = await loop.run_in_executor(None, _Child, self._payload, index)
        child.reader, child.writer = await asyncio.open_connection(sock=child.sock)
        child.writer.write(_HEADER.pack(len(self._payload)) + self._payload)
        child.listener = asyncio.ensure_future(self._listen(child))
        return child

    @property
    def pending(self) -> int:
        """Requests sent to the processes and not answered yet."""
        return sum(len(c.pending) for c in self._children)

    @property
    def pids(self) -> list[int]:
        return [c.pid for c in self._children]

    async def run(self, route: str, body: bytes):
        """The Preparer's answer for one request; TokenizerDied when its process died."""
        if not self._children:
            raise TokenizerDied("the tokenizer processes are not running")
        child = min(self._children, key=lambda c: len(c.pending))
        task_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        child.pending[task_id] = future
        data = pickle.dumps((task_id, route, body), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            child.writer.write(_HEADER.pack(len(data)) + data)
            await child.writer.drain()
        except (ConnectionError, OSError):
            pass  # the listener sees the end and fails the future
        return await future

    async def _listen(self, child: _Child) -> None:
        try:
            while True:
                head = await child.reader.readexactly(_HEADER.size)
                (n,) = _HEADER.unpack(head)
                task_id, result = pickle.loads(await child.reader.readexactly(n))
                future = child.pending.pop(task_id, None)
                if future is not None and not future.done():
                    future.set_result(result)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            self._fail(child, TokenizerDied("the server is shutting down"))
            raise
        await self._died(child)

    def _fail(self, child: _Child, error: Exception) -> None:
        for future in child.pending.values():
            if not future.done():
                future.set_exception(error)
        child.pending.clear()

    async def _died(self, child: _Child) -> None:
        """A process ended: fail what it held, replace it (unless the pool is closing)."""
        loop = asyncio.get_running_loop()
        code = await loop.run_in_executor(None, _wait, child.process, 5)
        self._fail(child, TokenizerDied(
            f"the tokenizer process {child.pid} died (exit code {code}) while preparing this "
            "request; retry it"))  # fmt: skip
        with contextlib.suppress(Exception):
            child.writer.close()
        if self._closing or child not in self._children:
            return
        logger.error("l2v serve: tokenizer process %s died (exit code %s); starting a new one",
                     child.pid, code)  # fmt: skip
        position = self._children.index(child)
        self._children.remove(child)
        replacement = await self._spawn(child.index)
        self._children.insert(position, replacement)
        self.replaced += 1

    async def close(self) -> None:
        """Close every process's socket (they exit), wait for them briefly, kill stragglers."""
        self._closing = True
        children, self._children = self._children, []
        for child in children:
            with contextlib.suppress(Exception):
                child.writer.close()
        loop = asyncio.get_running_loop()
        for child in children:
            if await loop.run_in_executor(None, _wait, child.process, 5) is None:
                child.process.kill()
                await loop.run_in_executor(None, _wait, child.process, 5)
            if child.listener is not None:
                child.listener.cancel()
            self._fail(child, TokenizerDied("the server is shutting down"))


def _wait(process: subprocess.Popen, timeout: float) -> int | None:
    """The exit code, or None if the process still runs after `timeout` seconds."""
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


if __name__ == "__main__":  # a tokenizer process (started by TokenizerPool)
    import argparse

    parser = argparse.ArgumentParser(description="an l2v serve tokenizer process")
    parser.add_argument("--fd", type=int, required=True)
    child_main(parser.parse_args().fd)
