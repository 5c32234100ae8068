"""Pure pieces of the training loop."""

import pytest

from lmscale.errors import LmscaleError
from lmscale.objectives.loss import perplexity
from lmscale.training.stopping import NonFiniteGuard


def test_non_finite_guard_counts_skips_in_a_row():
    guard = NonFiniteGuard(limit=3, skipped_before=5)
    assert [guard.check(total, step) for step, total in enumerate([5, 6, 7, 7, 8, 9], start=1)] == [
        False,
        True,
        True,
        False,
        True,
        True,
    ]
    with pytest.raises(LmscaleError, match="3 steps in a row up to step 7"):
        guard.check(10, 7)


def test_perplexity_is_capped_for_untrained_models():
    assert perplexity(0.0) == 1.0
    assert perplexity(1e6) == perplexity(50.0)
