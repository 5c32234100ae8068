"""A URL's listing is asked of the store once per start, so every part of a start sees one version of it."""

import os

from lmscale.data import remote


def test_one_listing_per_start_and_a_new_one_at_the_next(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("first version\n")
    url = f"file://{corpus}"
    asked = []
    list_url = remote.list_url
    monkeypatch.setattr(remote, "list_url", lambda *args: asked.append(args[0]) or list_url(*args))

    remote.begin_start()
    first = remote.remote_listing(url, {}, "data.path")
    (corpus / "a.txt").write_text("a second, longer version\n")  # rewritten while the start goes on
    os.utime(corpus / "a.txt", (1, 1))
    # the fingerprint and the local copy later in the same start see what the check saw
    assert remote.remote_listing(url, {}, "data.path") == first
    assert remote.remote_fingerprint(url, {}, "data.path")[f"{url}/a.txt"]["bytes"] == first["a.txt"]["bytes"]
    assert asked == [url]

    remote.begin_start()  # the next start looks again
    assert remote.remote_listing(url, {}, "data.path")["a.txt"]["bytes"] == len("a second, longer version\n")
    assert asked == [url, url]
