"""Property: on random CNN graphs, pruning keeps the IR valid and equals the masked original."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.prune.graphgen import KINDS, random_cnn
from tests.prune.test_prune_masking import masked, prune, run


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), kinds=st.lists(st.sampled_from(KINDS), min_size=1, max_size=6),
       head=st.sampled_from(["gap", "flatten"]), ratio=st.sampled_from([0.25, 0.5, 0.75]))
def test_masking_equivalence_on_random_graphs(seed, kinds, head, ratio):
    original = random_cnn(seed, kinds, head)
    model, removed, records = prune(original, f"prune{{ratio={ratio}}}")  # verify_each=True inside
    x = np.random.default_rng(seed).standard_normal((2, 3, 4, 4)).astype(np.float32)
    out = run(model.to_proto(), x)
    assert out.shape == (2, 5)
    np.testing.assert_allclose(out, run(masked(original, removed), x), rtol=2e-4, atol=2e-4)
    assert records[0].stats["channels_removed"] == sum(
        g["before"] - g["after"] for g in records[0].stats.get("groups", []))
