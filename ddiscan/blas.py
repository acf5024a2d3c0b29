"""BLAS's thread count, which is one setting for the whole process: a limit that contexts
entered from several threads at once share (:func:`one_thread`)."""

from __future__ import annotations

import sys
import threading
from contextlib import contextmanager

__all__ = ["one_thread"]


@contextmanager
def one_thread():
    """A context in which BLAS and LAPACK run on one thread, for the small dense problems
    (Cholesky, inverse, eigenproblem of a few dozen rows): waking threads costs far more
    than such a problem does (an 80 × 80 eigh: 0.2 s against 2 ms on a busy 2-core machine).
    BLAS's thread count is one setting for the whole process, so contexts entered from
    several threads at once (an audit's in-process workers) share one limit, set by the
    first to enter and restored by the last to leave."""
    global _LIBRARIES, _MODULES, _DEPTH, _SAVED
    with _LOCK:
        if _LIBRARIES is None or _MODULES != len(sys.modules):  # an import may have loaded another BLAS
            from threadpoolctl import ThreadpoolController

            _LIBRARIES = ThreadpoolController().select(user_api="blas").lib_controllers
            _MODULES = len(sys.modules)
        if _DEPTH == 0:  # a direct call per library: a context costs microseconds, not a threadpool query
            _SAVED = [(lib, lib.num_threads) for lib in _LIBRARIES]
            for lib, threads in _SAVED:
                if threads != 1:
                    lib.set_num_threads(1)
        _DEPTH += 1
    try:
        yield
    finally:
        with _LOCK:
            _DEPTH -= 1
            if _DEPTH == 0:
                for lib, threads in _SAVED:
                    if threads != 1:
                        lib.set_num_threads(threads)
                _SAVED = []


_LIBRARIES, _MODULES = None, 0
_LOCK = threading.Lock()
_DEPTH, _SAVED = 0, []
