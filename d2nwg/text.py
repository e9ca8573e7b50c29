"""A fixed text featurizer that needs no download: hashed character n-grams, one token per word.

``hashed_ngrams(["zero", "one", "two"])`` is a ``[3, 256]`` float32 tensor, the ``[L, E]``
condition of a ``D2NWGConfig(condition="text")`` generator. It is a *stand-in* for a real
text encoder, deterministic across runs, processes and machines (blake2b, not Python's salted
``hash``): each word is wrapped as ``<word>``, each of its character n-grams (n in ``n``) adds
a +-1 to one of ``dim`` buckets chosen by its hash (the sign from the hash too, so that
collisions cancel on average), and every row is L2-normalized.

What it can and cannot do: words that share n-grams get similar vectors, unrelated words
nearly orthogonal ones, and the same word always the same vector. It knows nothing of meaning:
a word that no zoo condition contained gets a vector the generator has never learned to read,
so a hashed featurizer cannot generalize to new words (a real sentence encoder might, to words
near known ones). Any encoder will do instead, as long as the zoo and ``generate`` use the
same one, e.g. sentence-transformers::

    model = SentenceTransformer("all-MiniLM-L6-v2")
    condition = torch.from_numpy(model.encode(words))  # [L, 384], one row per word
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from d2nwg.errors import ConfigError

DEFAULT_DIM = 256
DEFAULT_NGRAMS = (2, 3, 4)


def _ngrams(word: str, sizes: Sequence[int]) -> list[str]:
    w = f"<{word}>"
    return [w[i : i + n] for n in sizes for i in range(len(w) - n + 1)]


def hashed_ngrams(
    words: str | Sequence[str],
    dim: int = DEFAULT_DIM,
    n: Sequence[int] = DEFAULT_NGRAMS,
    seed: int = 0,
) -> torch.Tensor:
    """``[L, dim]`` float32: one L2-normalized row per word (a string is split on whitespace).

    ``seed`` salts the hash (a different seed: a different, equally valid featurizer). Words
    are case-sensitive and taken as given; the zoo and ``generate`` must use the same ``dim``,
    ``n`` and ``seed``.
    """
    if isinstance(words, str):
        words = words.split()
    words = list(words)
    if not words or not all(isinstance(w, str) and w for w in words):
        raise ConfigError(f"hashed_ngrams needs one or more non-empty words, got {words!r}")
    sizes = tuple(int(k) for k in n)
    if dim < 1 or not sizes or min(sizes) < 1:
        raise ConfigError(f"hashed_ngrams needs dim >= 1 and n-gram sizes >= 1, got {dim}, {n}")
    out = torch.zeros(len(words), dim, dtype=torch.float64)
    prefix = f"{int(seed)}\x00"
    for row, word in enumerate(words):
        for gram in _ngrams(word, sizes):
            digest = hashlib.blake2b((prefix + gram).encode(), digest_size=8).digest()
            h = int.from_bytes(digest, "little")
            out[row, (h >> 1) % dim] += 1.0 if h & 1 else -1.0
    norm = out.norm(dim=1, keepdim=True)
    # a word whose n-grams cancel exactly (rare) keeps a zero row rather than NaN
    return (out / norm.clamp_min(1e-12)).float()
