"""What the objectives' tests share: a word-level tokenizer with lmscale's plain chat template."""

import pytest
from helpers import word_level_tokenizer

from lmscale.data.tasks import PLAIN_CHAT_TEMPLATE


@pytest.fixture(scope="module")
def tokenizer():
    words = ["user", "assistant", ":", "\n"] + [f"w{i}" for i in range(40)]
    return word_level_tokenizer(words, PLAIN_CHAT_TEMPLATE)
