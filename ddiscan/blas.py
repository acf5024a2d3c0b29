"""BLAS's thread count, which is one setting for the whole process: a limit that contexts
entered from several threads at once share (:func:`one_thread`)."""

from __future__ import annotations

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
    global _CONTROLLER, _DEPTH, _LIMIT
    with _LOCK:
        if _CONTROLLER is None:
            from threadpoolctl import ThreadpoolController

            _CONTROLLER = ThreadpoolController()
        if _DEPTH == 0:
            _LIMIT = _CONTROLLER.limit(limits=1, user_api="blas")
        _DEPTH += 1
    try:
        yield
    finally:
        with _LOCK:
            _DEPTH -= 1
            if _DEPTH == 0:
                _LIMIT.restore_original_limits()
                _LIMIT = None


_CONTROLLER = None
_LOCK = threading.Lock()
_DEPTH, _LIMIT = 0, None
