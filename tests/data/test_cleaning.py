import logging

from datasets import Dataset

from lmscale.config import DataConfig
from lmscale.data.cleaning import clean_documents, normalize_whitespace, strip_html


def test_strip_html_keeps_code_comparisons():
    page = "<html><body><p>Hello&nbsp;<b>world</b> &amp; all</p><script>var x = 1;</script><!-- c --></body></html>"
    assert strip_html(page) == "Hello\xa0world & all"
    code = "if a<b and c>d:\n    xs = List<T>()  # &amp; stays in code\n"
    assert strip_html(code) == code


def test_whitespace_keeps_indentation():
    text = "def f():\r\n    return 1   \r\n\n\n\n\n\nx = 2\t\n"
    assert normalize_whitespace(text) == "def f():\n    return 1\n\n\nx = 2\n"  # two blank lines at most


def test_cleaning_steps_remove_and_log(caplog):
    docs = Dataset.from_dict(
        {
            "text": [
                "<p>A first document that is long enough.</p>",
                "A first document that is long enough.",  # duplicate once the HTML is gone
                "ｆｕｌｌｗｉｄｔｈ text that NFKC folds to ASCII",
                "tiny",
                "the quick brown fox jumps over the lazy dog near the river bank today",
                "the quick brown fox jumps over the lazy dog near the river bank today!",
            ]
        }
    )
    with caplog.at_level(logging.INFO):
        cleaned = clean_documents(docs, DataConfig(near_dedup=True, near_dedup_threshold=0.7), "train")
    assert list(cleaned["text"]) == [
        "A first document that is long enough.\n",
        "fullwidth text that NFKC folds to ASCII\n",
        "the quick brown fox jumps over the lazy dog near the river bank today\n",
    ]
    messages = caplog.text
    assert "removed 1 documents (shorter than data.min_chars)" in messages
    assert "removed 1 documents (exact duplicates)" in messages
    assert "removed 1 documents (near duplicates)" in messages


def test_cleaning_can_be_switched_off():
    docs = Dataset.from_dict({"text": ["<p>x</p>", "<p>x</p>"]})
    assert list(clean_documents(docs, DataConfig(clean=False), "train")["text"]) == ["<p>x</p>", "<p>x</p>"]
