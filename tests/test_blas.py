"""ddiscan.blas: the one-thread limit, entered from several threads at once, leaves BLAS as
it found it (an audit's in-process workers score in threads of one process)."""

from __future__ import annotations

import threading

import pytest
from threadpoolctl import threadpool_info

from ddiscan.blas import one_thread


def blas_threads() -> list[int]:
    return [lib["num_threads"] for lib in threadpool_info() if lib.get("user_api") == "blas"]


@pytest.fixture
def blas():
    import numpy  # noqa: F401  (loads numpy's BLAS)

    if not blas_threads():
        pytest.fail("no BLAS library is loaded (numpy's should be)")


def test_overlapping_contexts_from_threads_restore_the_original(blas):
    before = blas_threads()
    entered, release = threading.Barrier(2), threading.Event()
    seen = []

    def worker(first: bool):
        with one_thread():
            entered.wait(timeout=10)  # both threads are inside at once
            if first:
                release.set()  # the first leaves while the second is still inside
            else:
                release.wait(timeout=10)
            seen.append(first)

    threads = [threading.Thread(target=worker, args=(i == 0,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert all(not t.is_alive() for t in threads)
    assert sorted(seen) == [False, True]
    # the last to leave restored what the first found (two threadpoolctl limiters restored in
    # the wrong order leave the limit of one in place)
    assert blas_threads() == before


def test_nested_contexts_restore_the_original(blas):
    before = blas_threads()
    with one_thread():
        with one_thread():
            assert set(blas_threads()) == {1}
        assert set(blas_threads()) == {1}
    assert blas_threads() == before
