"""From token ids to text while generating: incremental detokenisation, stop strings, safe streaming deltas."""
from __future__ import annotations


class TextTracker:
    """Turn one row's generated tokens into text as they arrive.

    Byte-level tokenizers split a character across tokens, so text is only taken once it decodes without a
    trailing replacement character (incomplete UTF-8 is held back). Stop strings may span tokens: the text is
    searched after every token, and a streaming delta holds back any tail that could still grow into a stop string.
    """

    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self.text = ""
        self.stopped = False
        self._prefix = self._read = 0  # decode ids[_prefix:] and keep what goes beyond ids[_prefix:_read]
        self._emitted = 0
        self._searched = 0

    def add(self, token: int) -> None:
        if self.stopped:
            return
        self.ids.append(token)
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix:self._read])
        after = decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
            self._check_stop()

    def flush(self) -> None:
        """At the end, take whatever is left, even if it is not valid UTF-8."""
        if self.stopped or self._read == len(self.ids):
            return
        before = self.tokenizer.decode(self.ids[self._prefix:self._read])
        self.text += self.tokenizer.decode(self.ids[self._prefix:])[len(before):]
        self._read = len(self.ids)
        self._check_stop()

    def _check_stop(self) -> None:
        if not self.stop:
            return
        start = max(0, self._searched - max(len(s) for s in self.stop) + 1)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True
        self._searched = len(self.text)

    def delta(self, final: bool = False) -> str:
        """Text not yet handed out that can no longer change (all of it when final)."""
        end = len(self.text)
        if not final and not self.stopped:
            end -= self._held_back()
        out = self.text[self._emitted:end]
        self._emitted = max(self._emitted, end)
        return out

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:n]):
                    longest = n
                    break
        return longest
