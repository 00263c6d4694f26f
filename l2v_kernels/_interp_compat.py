"""Compatibility of the Triton CPU interpreter (TRITON_INTERPRET=1) with newer numpy.

Triton's interpreter holds every scalar kernel argument as a 1-element numpy array and turns it
into a Python int with `int(array)` where a kernel uses it as a loop bound
(`for t0 in range(0, n_tokens, BLOCK_T)`). numpy >= 2.4 refuses that for arrays with ndim > 0
("only 0-dimensional arrays can be converted to Python scalars"), so on triton <= 3.6 + numpy 2.4
every kernel with such a loop fails in the interpreter (pooling, attention). Triton 3.8 converts
with `int(array.squeeze())`. `install()` gives older interpreters the same conversion; it changes
nothing where the interpreter already does it, and nothing on GPUs (compiled kernels never use
the interpreter's tensor class).
"""

from __future__ import annotations

import inspect

_installed = False


def _needs_patch(patch_fn) -> bool:
    try:
        source = inspect.getsource(patch_fn)
    except (OSError, TypeError):
        return False
    return "int(self.handle.data)" in source


def _index(self) -> int:
    """A scalar interpreter tensor as an int: its 1-element array squeezed to 0-d first."""
    return int(self.handle.data.squeeze())


def install() -> bool:
    """Patch the interpreter's scalar-to-int conversion where it is the old one. Idempotent.

    Returns True when the patch is in place (now or from an earlier call)."""
    global _installed
    if _installed:
        return True
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or not _needs_patch(original):
        return False

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        # The scope restores attributes in reverse order, so this one is undone first.
        scope.set_attr(tensor, "__index__", _index)

    interpreter._patch_lang_tensor = _patch_lang_tensor
    _installed = True
    return True
