"""`data.max_tokens_per_batch: auto`: the search and its back-off, with a fake out-of-memory hook."""

import pytest

from lmscale.config import build_config
from lmscale.errors import ConfigError
from lmscale.planning.budget import search_token_budget, with_margin


def fake_gpu(limit: int):
    """fits(tokens) as a GPU with room for `limit` tokens would answer, recording every trial."""
    trials = []

    def fits(tokens: int) -> bool:
        trials.append(tokens)
        return tokens <= limit

    return fits, trials


@pytest.mark.parametrize("limit", [64, 100, 1000, 4096, 10_000, 65_536, 99_999])
def test_search_finds_the_largest_multiple_that_fits(limit):
    fits, trials = fake_gpu(limit)
    found = search_token_budget(fits, step=64, ceiling=1 << 20)
    assert found == limit // 64 * 64
    assert len(trials) < 40  # doubling then bisection, not a scan


def test_search_backs_off_after_out_of_memory_and_respects_the_ceiling():
    fits, trials = fake_gpu(5000)
    assert search_token_budget(fits, step=512, ceiling=3000) == 2560  # ceiling rounded down to the step
    fits, trials = fake_gpu(1 << 30)
    assert search_token_budget(fits, step=512, ceiling=8192) == 8192
    fits, trials = fake_gpu(10)
    assert search_token_budget(fits, step=64, ceiling=4096) == 0  # not even one row: the caller plans instead
    assert trials == [64]


def test_margin_keeps_ten_percent_and_whole_rows():
    assert with_margin(10_240, 512) == 9216
    assert with_margin(600, 512) == 512


def test_auto_is_accepted_and_other_words_are_not():
    assert build_config({"data": {"max_tokens_per_batch": "auto"}}).data.max_tokens_per_batch == "auto"
    with pytest.raises(ConfigError, match="data.max_tokens_per_batch"):
        build_config({"data": {"max_tokens_per_batch": "lots"}})
    with pytest.raises(ConfigError, match="data.max_tokens_per_batch=0 must be positive"):
        build_config({"data": {"max_tokens_per_batch": 0}})
