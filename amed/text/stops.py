"""Stop strings on streamed text: cut exactly at the first stop, never emit any part of it.

Text arrives in pieces (one per token) and a stop string may span several; so the tail that
could still become a stop string is held back until the next piece decides it.
"""

from __future__ import annotations


class StopStrings:
    """`feed(piece) -> (text to emit, stopped)`; after the stream ends, `flush()` returns what
    was held back. Once stopped, everything after the stop string is dropped."""

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stops:
            return piece, False
        text = self.pending + piece
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.pending, self.stopped = "", True
            return text[:cut], True
        hold = self._held_tail(text)
        self.pending = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold], False

    def _held_tail(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out
