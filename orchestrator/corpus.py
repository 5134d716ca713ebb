"""Built-in English text corpus, shipped with Python itself (no download needed).

The text is the interactive help of the standard library, ``pydoc_data.topics``:
79 topics, about 465 KB of English prose and code examples.
"""

from __future__ import annotations

import hashlib

from pydoc_data.topics import topics

#: A topic is held out when its index among the sorted topic names is a multiple of this.
HELDOUT_EVERY = 10


def reference_texts() -> tuple[str, str]:
    """Return ``(train, heldout)``: the corpus split by topic, each split joined by blank lines."""
    train: list[str] = []
    heldout: list[str] = []
    for index, name in enumerate(sorted(topics)):
        (heldout if index % HELDOUT_EVERY == 0 else train).append(topics[name])
    return "\n\n".join(train), "\n\n".join(heldout)


def corpus_sha256() -> str:
    """Hex SHA-256 of both splits, to key caches and identify the corpus in reports."""
    digest = hashlib.sha256()
    for split in reference_texts():
        data = split.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()
