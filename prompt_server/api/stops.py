"""Stop sequences as OpenAI reports them: the stop text and anything after it never reach the client."""

from __future__ import annotations


def trim_at_stop(text: str, stops: list[str]) -> str:
    """Cut `text` at the earliest occurrence of any stop sequence."""
    cut = len(text)
    for stop in stops:
        at = text.find(stop)
        if at != -1:
            cut = min(cut, at)
    return text[:cut]


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that could still grow into a stop sequence."""
    held = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:size]):
                held = size
                break
    return held


class StopTrimmer:
    """Turns the growing generated text into deltas that never contain (a part of) a stop sequence."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.sent = 0  # characters of the text already released

    def push(self, text: str) -> str:
        """The new part of `text` that is safe to release now."""
        trimmed = trim_at_stop(text, self.stops)
        if len(trimmed) < len(text):
            safe = len(trimmed)
        else:
            safe = len(text) - _held_back(text, self.stops)
        return self._release(text, safe)

    def finish(self, text: str) -> str:
        """Whatever is left once generation ended: everything before the first stop sequence."""
        return self._release(text, len(trim_at_stop(text, self.stops)))

    def _release(self, text: str, upto: int) -> str:
        if upto <= self.sent:
            return ""
        delta = text[self.sent : upto]
        self.sent = upto
        return delta
