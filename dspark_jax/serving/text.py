"""Token ids to streamed text: incremental detokenization and stop strings.

`TextStream` takes a request's generated tokens, one at a time (`add`) or a step's at once
(`extend`), and returns the text they add, so that the deltas of a stream concatenate to the
whole answer:

- a token's text depends on its neighbours (a leading space, a multi-byte character split
  over tokens), so each step decodes a short window that starts a few tokens back and keeps
  only what the window's new tokens add; a window ending in an incomplete character
  ("\\ufffd") waits for the next token;
- with stop strings, the last (longest stop - 1) characters are held back until the answer
  either goes on past them or ends, so that a stop string is never half-sent; when one
  appears the text is cut before it and the stream ends;
- `extend` decodes a step's tokens in one window (the decodes are a large part of a streamed
  token's cost in the server), and takes them again one at a time where that could differ:
  when they complete a stop string (to stop at the token that completed it) or end inside a
  character.
"""

from __future__ import annotations

from typing import Sequence

INCOMPLETE = "\ufffd"  # what a decoder shows for a partial UTF-8 character
WINDOW = 6  # tokens decoded before the new ones, for their context


class TextStream:
    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.hold = max(map(len, self.stop), default=1) - 1
        self.token_ids: list[int] = []  # every token taken, up to the one that completed a stop string
        self.text = ""  # the decoded answer so far (cut before a stop string once one is found)
        self.sent = 0  # characters of `text` already returned
        self.stop_reason: str | None = None  # the stop string found
        self._prefix = 0  # token index where the decode window starts
        self._read = 0  # tokens whose text is in `text`

    @property
    def stopped(self) -> bool:
        return self.stop_reason is not None

    def add(self, token_id: int) -> str:
        """Takes one generated token; returns the text that can be sent now."""
        if self.stopped:
            raise RuntimeError("the stream ended at a stop string")
        self.token_ids.append(int(token_id))
        if self.tokenizer is not None:
            self._read_new(final=False)
        return self._release(final=self.stopped)

    def extend(self, token_ids: Sequence[int]) -> str:
        """Takes several generated tokens; returns what `add` over them one at a time would have
        returned altogether, and leaves the same token ids, text and stop."""
        if self.stopped:
            raise RuntimeError("the stream ended at a stop string")
        if self.tokenizer is None or len(token_ids) < 2:
            return "".join(self.add(t) for t in token_ids)
        state = len(self.token_ids), self.text, self._prefix, self._read
        self.token_ids.extend(int(t) for t in token_ids)
        self._read_new(final=False)
        if not self.stopped and self._read == len(self.token_ids):  # every token's text is in, no stop string
            return self._release(final=False)
        taken, self.text, self._prefix, self._read = state
        del self.token_ids[taken:]
        self.stop_reason, delta = None, ""
        for t in token_ids:
            delta += self.add(t)
            if self.stopped:
                break
        return delta

    def finish(self) -> str:
        """The text still held back, at the end of the answer."""
        if self.tokenizer is not None and not self.stopped:
            self._read_new(final=True)
        return self._release(final=True)

    def _read_new(self, final: bool) -> None:
        """Appends the text of the tokens not read yet to `text` and looks for a stop string in
        it. Text ending inside a character waits for the next token (its whole characters may
        already complete a stop string, though); at the end it is taken as a full decode shows it."""
        window = self._decode(self.token_ids[self._prefix :])
        before = self._decode(self.token_ids[self._prefix : self._read])
        if len(window) <= len(before):
            return
        new, searched = window[len(before) :], max(0, len(self.text) - self.hold)
        if final or not new.endswith(INCOMPLETE):
            self.text += new
            self._prefix, self._read = max(self._prefix, self._read - WINDOW), len(self.token_ids)
            self._find_stop(searched)
        elif self.stop:
            whole = self.text + new.rstrip(INCOMPLETE)
            if any(whole.find(stop, searched) >= 0 for stop in self.stop):
                self.text = whole
                self._find_stop(searched)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def _find_stop(self, start: int) -> None:
        found = [(i, s) for s in self.stop if (i := self.text.find(s, start)) >= 0]
        if found:
            cut, self.stop_reason = min(found)
            self.text = self.text[:cut]

    def _release(self, final: bool) -> str:
        end = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        delta, self.sent = self.text[self.sent : end], end
        return delta
