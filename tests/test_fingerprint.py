"""Weight digests (cache keys) and their per-tensor memo: never stale, never re-hashed needlessly."""

from __future__ import annotations

import gc

import torch

from lorax import fingerprint
from lorax.fingerprint import weight_digest


def test_digest_depends_on_content_dtype_and_shape():
    w = torch.randn(32, 16)
    assert weight_digest(w) == weight_digest(w.clone())
    assert weight_digest(w) != weight_digest(w.half())
    assert weight_digest(w) != weight_digest(w.reshape(16, 32))
    v = w.clone()
    v[3, 4] += 1e-3
    assert weight_digest(v) != weight_digest(w)


def test_memo_skips_rehash_but_sees_in_place_changes(monkeypatch):
    w = torch.randn(64, 64)
    first = weight_digest(w)
    calls = []
    real = fingerprint.hashlib.blake2b
    monkeypatch.setattr(fingerprint.hashlib, "blake2b", lambda **kw: calls.append(1) or real(**kw))
    assert weight_digest(w) == first and calls == []          # same live, unmodified tensor: memo
    w.mul_(2)                                                 # in place: version counter moves
    assert weight_digest(w) != first and calls == [1]
    key = id(w)
    del w
    gc.collect()
    assert key not in fingerprint._DIGEST_MEMO                # dead tensors leave the memo
    with torch.inference_mode():
        x = torch.ones(4, 4)                                  # no version counter: never memoised
    weight_digest(x)
    x2 = x.clone()
    assert id(x) not in fingerprint._DIGEST_MEMO and weight_digest(x2) == weight_digest(x)
