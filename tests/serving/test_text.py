"""`TextStream` (serving/text.py) turns generated token ids, fed one at a time (`add`) or several at a time as a
server step commits them (`extend`), into text deltas, with the real SmolLM2 tokenizer (the one built from the GGUF,
as the server does).

Every expectation comes from an independent reference: the tokenizer's own decode of the ids all at once
(`decode(ids, skip_special_tokens=True)`, "the full decode") and plain string operations on it. Checked:

- the deltas (every `add()` return, then `finish()`) concatenate to the full decode, for English, accented and
  multi-byte text (characters split over several tokens), code, spaces at both ends and special tokens; no delta
  has a "\\ufffd" the full decode lacks; after each token (or four) the text sent is exactly the decode of the ids
  so far less the last (longest stop - 1) characters, as soon as that decode ends in a whole character;
- an answer that ends inside a character (max_tokens, or <|im_end|> next) still adds up to its full decode;
- with stop strings: `token_ids` are the first k ids, k the fewest whose decode contains a stop string (so the
  decode of `token_ids` has the stop at the cut, and the decode of `token_ids[:-1]` has no stop string anywhere);
  the text is that decode cut before its earliest stop string, which is `stop_reason`; that is the full decode cut
  before its earliest stop string (checked too), unless a stop string that starts earlier only ends later (one
  case shows the stream ending at the first completed); `stopped` says whether one was found; no delta, nor the
  text sent, holds a stop string; `finish()` after a stop adds nothing (`Choice.take` does not call it) and
  `add()` and `extend()` raise RuntimeError; fed four at a time, the stream stops at the same token;
- the same properties over 200 seeded random sequences (ids drawn from a text's ids, or uniform below 49152, so
  with special tokens, unfinished and invalid UTF-8), with a stop string cut out of their full decode;
- piece by piece (1 to 5 tokens), `extend` returns what `add` returns over the same tokens (a piece ending inside
  a character, or completing a stop string, included), and leaves the same ids and stop; a piece of 4 English
  tokens costs it 2 decodes, where `add` makes 2 a token;
- without a tokenizer, deltas are "" and the ids are kept.
"""

import json
import os

import numpy as np
import pytest

from dspark_jax.serving.text import TextStream
from tests.helpers import FIXTURES

VOCAB = 49152
TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. It was, by all accounts, a remarkable leap!",
    "multibyte": "naïve café 東京 🙂🎉 — Ünïcödé, Ωμέγα, Привет, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ✓",
    "code": "def f(x):\n    if x > 0:\n        return x ** 2  # square\n\treturn -x\n\n\nprint(f(3))\n",
    "spaces": "   leading and trailing spaces, two  and three   inside   ",
    "special": "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|><|endoftext|>",
}


@pytest.fixture(scope="module")
def tok():
    """SmolLM2's tokenizer as the server builds it from the GGUF; it must encode the golden texts of
    tests/fixtures/smollm2_tokenizer.json to their ids."""
    from dspark_jax.checkpoints.gguf_file import GGUFCheckpoint
    from dspark_jax.checkpoints.smollm2 import smollm2_gguf

    tokenizer = GGUFCheckpoint(smollm2_gguf()).tokenizer()
    with open(os.path.join(FIXTURES, "smollm2_tokenizer.json")) as f:
        golden = json.load(f)
    for text, ids in zip(golden["texts"], golden["ids"]):
        assert tokenizer.encode(text, add_special_tokens=False) == ids, text
    return tokenizer


def decode(tok, ids) -> str:
    return tok.decode(list(ids), skip_special_tokens=True)


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def feed(tok, ids, stop=(), check_sent=False, step=1):
    """Feeds `ids` one at a time (`add`), or `step` at a time (`extend`; the last piece may be shorter), until the
    stream stops, then calls finish(); returns the stream and its deltas (the last one finish()'s). With
    `check_sent`, after each piece whose decode so far ends in a whole character, the text sent must be that decode
    (cut at a stop string) less the characters a stop string could still need."""
    s = TextStream(tok, stop)
    hold = max(map(len, stop), default=1) - 1
    deltas = []
    for start in range(0, len(ids), step):
        k = min(start + step, len(ids))
        deltas.append(s.add(ids[start]) if step == 1 else s.extend(ids[start:k]))
        if check_sent and not s.stopped:
            so_far = decode(tok, ids[:k])
            if not so_far.endswith("\ufffd"):
                assert "".join(deltas) == so_far[: max(0, len(so_far) - hold)], (k, so_far)
        if s.stopped:
            break
    deltas.append(s.finish())
    return s, deltas


def reference(tok, ids, stop):
    """(text, stop_reason, token_ids) from whole decodes: with k the fewest first ids whose decode contains a stop
    string (all ids if none does), the ids up to k, the decode of those cut before the earliest stop string in it,
    and that string. The text is the full decode cut before its earliest stop string, except where a stop string
    that starts earlier ends later than the first one completed (the stream ends at the first)."""
    k = next((k for k in range(1, len(ids) + 1) if any(s in decode(tok, ids[:k]) for s in stop)), None)
    if k is None:
        return decode(tok, ids), None, list(ids)
    text = decode(tok, ids[:k])
    found = {s: text.find(s) for s in stop if s in text}
    reason = min(found, key=found.get)
    return text[: found[reason]], reason, list(ids[:k])


def earliest_cut(full: str, stop) -> str:
    """The full decode cut before the earliest stop string in it."""
    return full[: min((full.find(s) for s in stop if s in full), default=len(full))]


def check_stops(tok, ids, stop, step=1):
    s, deltas = feed(tok, ids, stop, check_sent=True, step=step)
    text, reason, token_ids = reference(tok, ids, stop)
    sent = "".join(deltas)
    assert sent == text == s.text
    assert s.stop_reason == reason and s.stopped == (reason is not None)
    assert not any(x in d for x in stop for d in deltas) and not any(x in sent for x in stop)
    assert s.token_ids == token_ids
    if reason is not None:
        assert decode(tok, s.token_ids)[len(text) :].startswith(reason)
        assert not any(x in decode(tok, s.token_ids[:-1]) for x in stop)
        assert deltas[-1] == ""  # everything up to the cut went out with add(); Choice.take does not call finish()
        with pytest.raises(RuntimeError):
            s.add(ids[0])
        with pytest.raises(RuntimeError):
            s.extend(ids[:2])
        assert s.token_ids == token_ids
    return s


@pytest.mark.parametrize("step", [1, 4])
@pytest.mark.parametrize("name", list(TEXTS))
def test_deltas_concatenate_to_full_decode(tok, name, step):
    ids = encode(tok, TEXTS[name])
    full = decode(tok, ids)
    s, deltas = feed(tok, ids, check_sent=True, step=step)
    assert "".join(deltas) == full
    assert s.token_ids == ids and not s.stopped and s.stop_reason is None
    if "\ufffd" not in full:
        assert not any("\ufffd" in d for d in deltas)
    if name == "special":
        assert full == "user\nHi there\nassistant\nHello!"
    else:
        assert full == TEXTS[name]  # these texts round-trip: the reference is the text itself


def test_multibyte_characters_span_tokens(tok):
    """The premise of the multi-byte case: some characters are split over tokens (a lone token decodes to
    "\\ufffd"), so the stream must wait for their last byte."""
    ids = encode(tok, TEXTS["multibyte"])
    assert sum("\ufffd" in decode(tok, [i]) for i in ids) >= 5
    s, deltas = feed(tok, ids)
    assert "".join(deltas) == TEXTS["multibyte"] and "" in deltas[:-1]


def boundaries(tok, ids) -> list[int]:
    """Character offsets in the full decode where each token's text ends (token-by-token prefix decodes)."""
    return [len(decode(tok, ids[:k])) for k in range(1, len(ids) + 1)]


# (text, stop strings, what the case is): the stop found is the earliest in the text, whatever the list order.
STOP_CASES = [
    ("english", ("lazy",), "middle"),
    ("english", ("x jum",), "spans a token boundary"),
    ("english", ("zebra",), "never occurs"),
    ("english", ("remarkable", "fox"), "the later-listed one occurs first"),
    ("english", ("azy", " lazy"), "two completed by one token"),
    ("english", ("The",), "at the start"),
    ("english", ("leap!",), "at the very end"),
    ("english", ("e",), "one character"),
    ("multibyte", ("京 🙂",), "multi-byte, spanning tokens"),
    ("multibyte", ("🎉", "Ω"), "a character split over three tokens"),
    ("code", ("\n\n",), "blank line"),
    ("code", ("return", "  #"), "code, two stops"),
    ("spaces", ("   ",), "spaces, at the start"),
    ("special", ("assistant",), "after special tokens"),
]


@pytest.mark.parametrize("step", [1, 4])
@pytest.mark.parametrize("name,stop,case", STOP_CASES, ids=[c[2] for c in STOP_CASES])
def test_stop_strings(tok, name, stop, case, step):
    ids = encode(tok, TEXTS[name])
    full = decode(tok, ids)
    s = check_stops(tok, ids, stop, step)
    assert s.text == earliest_cut(full, stop)
    if s.stopped:
        assert s.stop_reason == min((x for x in stop if x in full), key=full.find)
    if case == "never occurs":
        assert not s.stopped and s.text == full
    elif case == "spans a token boundary" or case.startswith("multi-byte"):
        start = full.find(s.stop_reason)
        assert any(start < b < start + len(s.stop_reason) for b in boundaries(tok, ids))  # the premise
    elif case == "the later-listed one occurs first":
        assert s.stop_reason == "fox" and s.text == "The quick brown "
    elif case == "two completed by one token":
        bounds = boundaries(tok, ids)
        ends = {next(k for k, b in enumerate(bounds) if b >= full.find(x) + len(x)) for x in stop}
        assert len(ends) == 1  # the premise: one token completes both
        assert s.stop_reason == " lazy" and s.text == "The quick brown fox jumps over the"
    elif case == "at the very end":
        assert s.token_ids == ids and s.text == full[: -len("leap!")]


def test_stop_completed_first_wins_over_one_starting_earlier(tok):
    """A stop string that starts earlier but would end later never completes: the stream ends at "dog. It"."""
    ids = encode(tok, TEXTS["english"])
    long = "The quick brown fox jumps over the lazy dog. It was, by"
    s = check_stops(tok, ids, ("zebra", "dog. It", long))
    assert s.stop_reason == "dog. It" and s.text == "The quick brown fox jumps over the lazy "
    assert long not in decode(tok, s.token_ids)


def test_stop_string_sharing_a_token_with_a_split_character(tok):
    """"café " ends inside token " \\xe6" (a space and the first byte of 東): the stop string is whole as soon as
    that token is decoded, though the character after it is not yet."""
    ids = encode(tok, TEXTS["multibyte"])
    check_stops(tok, ids, ("café ",))


def test_add_after_stop_raises(tok):
    ids = encode(tok, TEXTS["english"])
    s = TextStream(tok, ("fox",))
    for t in ids:
        s.add(t)
        if s.stopped:
            break
    assert s.stopped and s.stop_reason == "fox" and s.text == "The quick brown "
    taken = list(s.token_ids)
    with pytest.raises(RuntimeError):
        s.add(ids[-1])
    assert s.token_ids == taken and s.finish() == ""


def test_answer_ending_inside_a_character(tok):
    """An answer cut off inside a character (max_tokens after " \xe6", the first of 東's three tokens; or that
    token then <|im_end|>): the full decode ends in "\ufffd", and the deltas must still add up to it."""
    ids = encode(tok, "naïve café 東京")
    assert decode(tok, ids[:4]) == "naïve café \ufffd"  # the premise
    for cut in (ids[:4], ids[:5], ids[:4] + [2]):
        s, deltas = feed(tok, cut)
        assert "".join(deltas) == decode(tok, cut), cut


def random_sequences(tok, count=200):
    """`count` seeded id sequences: even ones drawn from the ids of TEXTS, odd ones uniform below the vocabulary
    size (special tokens, unfinished and invalid UTF-8 included); each with a stop string cut out of its full decode
    (None where that would be empty or hold a "\ufffd", which a decode of an unfinished character also shows)."""
    rng = np.random.default_rng(0)
    pool = encode(tok, " ".join(TEXTS.values()))
    for n in range(count):
        length = int(rng.integers(1, 48))
        ids = (rng.choice(pool, length) if n % 2 == 0 else rng.integers(0, VOCAB, length)).tolist()
        full = decode(tok, ids)
        start = int(rng.integers(0, max(len(full), 1)))
        stop = full[start : start + int(rng.integers(1, 9))]
        yield n, ids, full, (stop if stop and "\ufffd" not in stop else None)


@pytest.mark.parametrize("step", [1, 4])
def test_random_sequences_concatenate_to_full_decode(tok, step):
    for n, ids, full, _ in random_sequences(tok):
        s, deltas = feed(tok, ids, check_sent=True, step=step)
        assert "".join(deltas) == full, (n, ids)
        assert s.token_ids == ids and not s.stopped
        if "\ufffd" not in full:
            assert not any("\ufffd" in d for d in deltas), (n, ids)


@pytest.mark.parametrize("step", [1, 4])
def test_random_sequences_stop_strings(tok, step):
    stops_found = 0
    for n, ids, full, stop in random_sequences(tok):
        if stop is None:
            continue
        s = check_stops(tok, ids, (stop, "\x00never\x00"), step)
        assert s.stopped and s.stop_reason == stop and s.text == full[: full.find(stop)], (n, ids, stop)
        stops_found += 1
    assert stops_found >= 100


def test_extend_returns_what_add_returns_over_the_same_tokens(tok):
    """Piece by piece (1 to 5 tokens), `extend` returns what `add` returns over the same tokens altogether, in the
    same call (a piece ending inside a character included), and both streams stop at the same token."""
    rng = np.random.default_rng(1)
    split_pieces = 0
    for n, ids, full, stop in random_sequences(tok):
        stops = () if stop is None else (stop,)
        one, many = TextStream(tok, stops), TextStream(tok, stops)
        start = 0
        while start < len(ids) and not one.stopped:
            piece = ids[start : start + int(rng.integers(1, 6))]
            split_pieces += len(piece) > 1 and decode(tok, ids[: start + len(piece)]).endswith("\ufffd")
            expected = ""
            for t in piece:
                expected += one.add(t)
                if one.stopped:
                    break
            assert many.extend(piece) == expected, (n, ids, start)
            assert many.token_ids == one.token_ids and many.stop_reason == one.stop_reason, (n, ids, start)
            start += len(piece)
        assert many.finish() == one.finish()
    assert split_pieces >= 20  # the premise: many pieces of several tokens end inside a character


def test_extend_decodes_a_clean_piece_once(tok):
    """The point of `extend`: a piece of 4 English tokens with no stop string in it is read with one window (2
    decodes: the window, and its part already read), where `add` decodes twice a token."""
    calls = []

    class Counting:
        def decode(self, ids, **kwargs):
            calls.append(len(ids))
            return tok.decode(ids, **kwargs)

    ids = encode(tok, TEXTS["english"])[:12]
    one, many = TextStream(Counting(), ("zebra",)), TextStream(Counting(), ("zebra",))
    sent_one = "".join(one.add(t) for t in ids[:4])
    sent_many = many.extend(ids[:4])
    calls.clear()
    sent_one += "".join(one.add(t) for t in ids[4:8])
    assert len(calls) == 8
    calls.clear()
    sent_many += many.extend(ids[4:8])
    assert len(calls) == 2
    sent_one += "".join(one.add(t) for t in ids[8:]) + one.finish()
    sent_many += many.extend(ids[8:]) + many.finish()
    assert sent_many == sent_one == decode(tok, ids)


@pytest.mark.parametrize("stop", [(), ("a",)])
def test_without_tokenizer(stop):
    s = TextStream(None, stop)
    ids = [5, 17, 49151, 0, 504]
    assert [s.add(t) for t in ids[:2]] == ["", ""] and s.extend(ids[2:]) == ""
    assert s.finish() == "" and s.token_ids == ids and s.text == "" and not s.stopped and s.stop_reason is None
