"""Incremental detokenizing: the deltas add up to the full decode, multi-byte characters are never
split, and output stops right before the first stop string, whichever tokens carry it."""
from __future__ import annotations

import random

import pytest

from planc.runtime.text import Detokenizer, TextCodec


@pytest.fixture(scope="module")
def codec(tokenizer_dir):
    return TextCodec(tokenizer_dir)


def _stream(codec, ids, stop):
    d = Detokenizer(codec, stop)
    deltas = []
    for i in ids:
        deltas.append(d.add(i))
        if d.stopped:
            break
    else:
        deltas.append(d.flush())
    return deltas


def _id_pool(codec):
    """Ids of whole words, single bytes of multi-byte characters, and specials."""
    text = "The quick fox é ü ✓ 漢字 blocks"
    return codec.encode(text, add_special_tokens=False) + list(range(codec.tokenizer.get_vocab_size()))


@pytest.mark.parametrize("seed", range(8))
def test_deltas_add_up_to_the_full_decode_and_hold_no_broken_characters(codec, seed):
    rng = random.Random(seed)
    pool = _id_pool(codec)
    ids = [rng.choice(pool) for _ in range(rng.randint(1, 60))]
    deltas = _stream(codec, ids, [])
    assert "".join(deltas) == codec.decode(ids)
    assert all("\ufffd" not in d for d in deltas[:-1]) or "\ufffd" in codec.decode(ids)


@pytest.mark.parametrize("seed", range(8))
def test_output_stops_before_the_first_stop_string(codec, seed):
    rng = random.Random(100 + seed)
    words = ["quick", "fox", "é", "✓", "lazy", "dog"]
    text = " ".join(rng.choice(words) for _ in range(12))
    ids = codec.encode(text, add_special_tokens=False)
    full = codec.decode(ids)
    stop = [rng.choice(words) + " " + rng.choice(words), "ox é"]
    cut = min((full.find(s) for s in stop if s in full), default=len(full))
    assert "".join(_stream(codec, ids, stop)) == full[:cut]


def test_multi_byte_character_arrives_whole(codec):
    ids = codec.encode("a✓b", add_special_tokens=False)
    deltas = _stream(codec, ids, [])
    assert "".join(deltas) == "a✓b" and all(d in ("", "a", "✓", "b", "a✓", "✓b", "a✓b") for d in deltas)
