"""What a failure while one input is processed means, and how often it is tried again.

Everything that happens to one input inside its decoder (the actor's child process, `pipeline.child`) is an
outcome of that input, recorded as error rows (`pipeline.schema.ERROR_SCHEMA`) in each method's output
that needed its frames; nothing one input does fails the run. Three classes:

* **Media faults** (permanent): the input's own. A `operators.errors.MediaError` (a file that is not a
  decodable video or image, a frame that cannot be decoded), a name no decoder can open, a file gone
  since it was listed, an input whose sampling no longer matches what an earlier run recorded. Trying
  again gives the same answer: ``retryable`` false.
* **Decoder failures** (retryable, counted): the decoder made no progress for the stall limit
  (``DecoderStalled``: it reports every packet it reads or decodes, so the limit means "nothing moved"),
  worked on the input past its deadline however much progress it reported (``DecoderTimeout``: an endless
  stream), its process died (``DecoderDied``: killed by the kernel's out-of-memory killer, a native crash),
  or it raised something that is not a media fault (``DecoderError``). These may be the input's fault or the
  machine's: the next run tries the frames again, with both limits doubled for every decoder failure the
  input had; the `MAX_DECODER_FAILURES`-th is recorded as permanent.
* **Read failures** (retryable, never permanent): a remote input that cannot be read after
  `pipeline.inputs.FETCH_ATTEMPTS` tries (``InputReadError``): the network's fault, retried by every later
  run and never counted against the input.

Failures of the run itself (out of memory in an encoder, the output's own filesystem, a lost lease, a decoder
process that cannot start, a fault of this code outside the decoder) fail the run: nothing about them is
recorded against an input.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_DECODER_FAILURES = 3  # decoder failures of one input before the last is recorded as permanent
LIMIT_GROWTH = 2.0  # an input's next try's limits, per decoder failure it had
DECODER_FAILURES = ("DecoderStalled", "DecoderTimeout", "DecoderDied", "DecoderError")
READ_FAILURE = "InputReadError"


def grown_limit(base_s: float, decoder_failures: int) -> float:
    """An input's limit on this try: ``base_s`` (``--decode-timeout-s``, ``--input-timeout-s``) doubled for
    each decoder failure the input had in earlier runs (the stall limit: 300, 600, 1200 s by default)."""
    return base_s * LIMIT_GROWTH ** decoder_failures


@dataclass(frozen=True)
class Failure:
    """What failed for one input: ``error_type`` and ``message`` as the error row says them, and whether a
    later run tries again."""

    error_type: str
    message: str
    retryable: bool

    @classmethod
    def media(cls, error_type: str, message: str) -> Failure:
        return cls(error_type, message, False)

    @classmethod
    def read(cls, message: str) -> Failure:
        return cls(READ_FAILURE, f"{message} (a read failure: every later run tries again)", True)

    @classmethod
    def decoder(cls, error_type: str, message: str, earlier_failures: int) -> Failure:
        """A decoder failure of an input that had ``earlier_failures`` of them in earlier runs."""
        count = earlier_failures + 1
        if count >= MAX_DECODER_FAILURES:
            return cls(error_type, f"{message} (decoder failure {count} of {MAX_DECODER_FAILURES}: not tried "
                                   "again)", False)
        return cls(error_type, f"{message} (decoder failure {count} of {MAX_DECODER_FAILURES}: the next run "
                               "tries again)", True)
