"""ddiscan/select.py: the selection rules, against the public SafeLoRA code's lowest-k rule."""

from hypothesis import given, settings
from hypothesis import strategies as st

from ddiscan.select import select
from selection_helpers import public_lowest_k, scored


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=40, unique=True), st.data())
def test_safelora_top_equals_public_lowest_k_rule(cosines, data):
    k = data.draw(st.integers(1, len(cosines)))
    names = [f"m{i:02d}" for i in range(len(cosines))]
    modules = [scored(n, cosine=c) for n, c in zip(names, cosines)]
    ours = select(modules, top=k, method="safelora").names
    assert len(ours) == k
    assert sorted(ours) == sorted(names[i] for i in public_lowest_k(cosines, k))
    assert [dict(zip(names, cosines))[n] for n in ours] == sorted(cosines)[:k]  # lowest first
    # threshold rule: cos <= threshold, as the public code's threshold mode
    t = data.draw(st.floats(0, 1))
    assert sorted(select(modules, theta=t, method="safelora").names) == sorted(
        n for n, c in zip(names, cosines) if c <= t)
    # E-DIEM's direction is the mirror image
    mirrored = [scored(n, ediem=-c) for n, c in zip(names, cosines)]
    assert select(mirrored, top=k, method="splora").names == ours
