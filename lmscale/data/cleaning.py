"""Document cleaning before tokenization: each step is a `datasets` map/filter, and each logs what it did."""

from __future__ import annotations

import hashlib
import html
import logging
import re
import unicodedata

from datasets import Dataset

from lmscale.config import DataConfig

log = logging.getLogger(__name__)

# Only real HTML element names count as tags, so source code such as `a<b>c` or `List<T>` survives.
HTML_ELEMENTS = (
    "a|abbr|article|aside|b|blockquote|body|br|button|caption|center|code|dd|div|dl|dt|em|figcaption|figure|font|"
    "footer|form|h[1-6]|head|header|hr|html|i|iframe|img|input|label|li|link|main|meta|nav|noscript|ol|option|p|"
    "pre|section|select|small|span|strong|sub|sup|table|tbody|td|textarea|tfoot|th|thead|title|tr|u|ul"
)
HTML_TAG = re.compile(rf"</?(?:{HTML_ELEMENTS})(?:\s[^<>]*)?/?>", re.IGNORECASE)
HTML_CLOSING_TAG = re.compile(rf"</(?:{HTML_ELEMENTS})\s*>|<!doctype html", re.IGNORECASE)
HTML_DROPPED_BLOCKS = re.compile(r"<(script|style)\b[^>]*>.*?</\1\s*>|<!--.*?-->", re.IGNORECASE | re.DOTALL)
HTML_ENTITY = re.compile(r"&(?:[a-zA-Z]{2,8}|#\d{2,6}|#x[0-9a-fA-F]{2,5});")
TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)
EXTRA_BLANK_LINES = re.compile(r"\n{4,}")
SHINGLE_WORDS = 5
CLEANING_VERSION = "1"  # bump when a cleaning step changes what it writes, to invalidate caches
MINHASH_PERMUTATIONS = 128


def strip_html(text: str) -> str:
    """Remove scripts, styles, comments and HTML element tags, and unescape entities, in documents that
    look like HTML (a closing tag of a real element); others, such as code with `a<b and c>d`, stay as they are.
    """
    if not HTML_CLOSING_TAG.search(text):
        return text
    stripped = HTML_TAG.sub("", HTML_DROPPED_BLOCKS.sub("", text))
    if stripped == text:
        return text
    return HTML_ENTITY.sub(lambda m: html.unescape(m.group(0)), stripped)


def normalize_whitespace(text: str) -> str:
    """CRLF/CR to LF, no trailing spaces, at most two blank lines in a row; indentation is untouched."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return EXTRA_BLANK_LINES.sub("\n\n\n", TRAILING_SPACE.sub("", text)).strip("\n") + "\n"


def clean_text(text: str, config: DataConfig, html: bool) -> str:
    if html:
        text = strip_html(text)
    if config.nfkc:
        text = unicodedata.normalize("NFKC", text)
    if config.normalize_whitespace:
        text = normalize_whitespace(text)
    return text


def content_hash(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def _first_occurrences(keys: list[str]) -> list[int]:
    seen: set[str] = set()
    keep = []
    for index, key in enumerate(keys):
        if key not in seen:
            seen.add(key)
            keep.append(index)
    return keep


def fingerprint(*parts: object) -> str:
    """An explicit `datasets` cache key, so caching never depends on how a closure pickles."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def exact_dedup(documents: Dataset, num_proc: int) -> Dataset:
    """Keep the first of each set of identical documents."""
    if len(documents) == 0:
        return documents
    hashes = documents.map(
        lambda batch: {"hash": [content_hash(t) for t in batch["text"]]},
        batched=True,
        num_proc=num_proc,
        remove_columns=documents.column_names,
        new_fingerprint=fingerprint(documents._fingerprint, "hash", CLEANING_VERSION),
        desc="hashing",
    )["hash"]
    keep = _first_occurrences(hashes)
    return documents if len(keep) == len(documents) else documents.select(keep)


def near_dedup(documents: Dataset, threshold: float) -> Dataset:
    """Keep the first of each group of documents whose estimated Jaccard similarity (word 5-grams) >= threshold."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=MINHASH_PERMUTATIONS)
    keep = []
    for index, text in enumerate(documents["text"]):
        words = text.split()
        shingles = {
            " ".join(words[i : i + SHINGLE_WORDS]) for i in range(max(1, len(words) - SHINGLE_WORDS + 1))
        }
        signature = MinHash(num_perm=MINHASH_PERMUTATIONS, seed=1)
        signature.update_batch([s.encode("utf-8") for s in shingles])
        if not lsh.query(signature):
            lsh.insert(str(index), signature)
            keep.append(index)
    return documents if len(keep) == len(documents) else documents.select(keep)


def clean_documents(documents: Dataset, config: DataConfig, split: str, is_code: bool = False) -> Dataset:
    """Apply the configured cleaning steps, logging how many documents each changed or removed.

    `is_code` (the embedded stdlib corpus) turns HTML stripping off: source code holds HTML in strings.
    """
    if not config.clean:
        return documents
    html = config.strip_html and not is_code
    options = (html, config.nfkc, config.normalize_whitespace)
    cleaned = documents.map(
        lambda batch: {"text": [clean_text(t, config, html) for t in batch["text"]]},
        batched=True,
        num_proc=config.num_proc,
        new_fingerprint=fingerprint(documents._fingerprint, "clean", options, CLEANING_VERSION),
        desc="cleaning",
    )
    log.info(
        "data/%s: %d documents normalised (html=%s, nfkc=%s, whitespace=%s)", split, len(documents), *options
    )

    def drop_short(d: Dataset) -> Dataset:
        return d.filter(
            lambda batch: [len(t.strip()) >= config.min_chars for t in batch["text"]],
            batched=True,
            num_proc=config.num_proc,
            new_fingerprint=fingerprint(d._fingerprint, "min_chars", config.min_chars),
        )

    steps = [("shorter than data.min_chars", drop_short)]
    if config.dedup:
        steps.append(("exact duplicates", lambda d: exact_dedup(d, config.num_proc)))
    if config.near_dedup:
        steps.append(("near duplicates", lambda d: near_dedup(d, config.near_dedup_threshold)))
    for reason, step in steps:
        count = len(cleaned)
        cleaned = step(cleaned)
        if count - len(cleaned):
            log.info("data/%s: removed %d documents (%s)", split, count - len(cleaned), reason)
    return cleaned
