"""The input's own faults, and how an error is said in one line.

A `MediaError` is the input's fault: decoding it again gives the same answer, so the job records it
as a permanent error row. Anything else raised while an input is decoded is not known to be the
input's fault (`pipeline.failures` decides what it means).
"""

from __future__ import annotations


class MediaError(Exception):
    """An input that cannot be decoded; ``path`` and ``reason`` say which and why. Permanent: running
    again gives the same answer, so the job records it as an error row."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self):  # picklable across processes with its two arguments
        return type(self), (self.path, self.reason)


class VideoDecodeError(MediaError):
    """A file that is not a decodable video (no video stream, no decoder for its codec, unreadable
    container, absurd size)."""


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first line of ``error``'s message (at most ``limit`` characters), or its type's name when empty."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__
