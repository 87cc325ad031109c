"""Incremental detokenization with stop strings, for streaming: the ids so far are decoded and the new suffix is
emitted, holding back an incomplete UTF-8 character (U+FFFD at the end) and any tail that could be the start of a
stop string, so that the streamed pieces concatenate to the final text and never contain a stop string."""
from __future__ import annotations

from typing import List, Optional, Sequence

__all__ = ["IncrementalText"]


class IncrementalText:
    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: List[int] = []
        self.emitted = ""  # the concatenation of every piece returned so far
        self.stopped = False

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def _find_stop(self, text: str) -> Optional[int]:
        # a stop string cannot lie wholly inside text already emitted (it would have been found then)
        start = max(0, len(self.emitted) - max(len(s) for s in self.stop) + 1)
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def push(self, token: int) -> str:
        """Add one generated token; returns the text that may be sent now ('' if none). After a stop string is
        found, ``stopped`` is True and the text ends before it."""
        self.ids.append(int(token))
        text = self._decode()
        if self.stop:
            cut = self._find_stop(text)
            if cut is not None:
                self.stopped = True
                return self._advance(text[:cut])
        safe = text.rstrip("\ufffd")
        if self.stop:
            hold = 0
            for s in self.stop:
                for k in range(min(len(s) - 1, len(safe)), hold, -1):
                    if safe.endswith(s[:k]):
                        hold = k
                        break
            safe = safe[:len(safe) - hold]
        return self._advance(safe)

    def finish(self) -> str:
        """The rest of the text, once generation is over (eos or length)."""
        if self.stopped:
            return ""
        return self._advance(self._decode(), final=True)

    def _advance(self, text: str, final: bool = False) -> str:
        if text.startswith(self.emitted):
            piece = text[len(self.emitted):]
            self.emitted = text
            return piece
        # the decoder rewrote text already sent (rare: clean-up rules across tokens); what was sent stands
        return ""
