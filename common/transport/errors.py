"""The two failures of the data plane, kept apart because callers handle them differently.

`RecordError`: a message is bad (malformed, oversize, wrong schema). The consumer dead-letters it
and keeps running; retrying cannot help. `TransportError`: Redis is unreachable after the bounded
retries. The component cannot make progress; it raises to its supervisor.
"""
from __future__ import annotations


class RecordError(ValueError):
    """A message or blob failed decoding or validation; `reason` names the field or key."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class TransportError(ConnectionError):
    """Redis could not be reached after the configured retries; the message names the redacted
    URL, never the password."""
