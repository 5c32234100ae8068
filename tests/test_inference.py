"""`lmscale generate` stays inside the model's positions."""

import pytest

from lmscale.errors import LmscaleError
from lmscale.inference import check_context


def test_generation_past_the_positions_is_refused_with_the_room_left():
    check_context(6, 250, 256)
    check_context(6, 10**6, None)  # a family that does not say: nothing to check
    with pytest.raises(
        LmscaleError, match="exceeds the model's 256 positions: use --max-new-tokens 250 or less"
    ):
        check_context(6, 300, 256)
    with pytest.raises(LmscaleError, match="shorten the prompt"):
        check_context(300, 1, 256)
