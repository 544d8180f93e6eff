"""Receive-window auto-tuning: how far the windows grow, from observed
delivery. No I/O and no clock: the connection passes ``now`` in.

A window smaller than the path's bandwidth-delay product (BDP) caps a
stream at window / RTT, whatever the link's rate; a window much larger
than it only buffers more. The receiver measures both factors itself:

- RTT: first the handshake's (our HELLO to the peer's AUTH, sent in reply
  to it), before any data queues up; then each PING it sends (payload
  ``ff 'bdp' u32 seq``) to the peer's ACK; the smallest seen is kept (data
  queued ahead of an ACK inflates the later samples).
- Delivery: the bytes the *consumer* took (credit returned) while that
  PING was out, per stream and for the connection.

With ``bdp = consumed × rtt_min / interval``, a window becomes
``max(window, min(max_window, 2 × bdp))``, and twice itself if ``bdp`` is
at least 5/8 of it (the window, not the link, limited the sender: the
consumer took most of it every round trip; doubling, as slow start does,
reaches a 100 ms path's BDP in a few round trips). Once the link limits,
``bdp`` is the path's BDP and the window settles between 2 and 3.2 × BDP
(twice at least, because credit goes back in batches). Windows never shrink
while a connection lives. A consumer slower than the link is what it
consumes, so its window stays below 3.2 × what it takes per round trip.
One sample at
a time: the next starts at once while windows grow, else only after a whole
connection window has been consumed (on loopback a few hundred pings a
second at most).
"""

from __future__ import annotations

__all__ = ["WindowTuner", "PING_TAG"]

#: First bytes of the PING payloads the tuner sends (their ACKs are its own).
PING_TAG = b"\xffbdp"


class WindowTuner:
    """The state of the connection's one outstanding RTT/delivery sample."""

    __slots__ = ("ceiling", "ping", "sent_at", "rtt_min", "consumed", "quiet", "_seq")

    def __init__(self, ceiling: int) -> None:
        self.ceiling = ceiling
        self.ping: bytes | None = None   # the payload of the PING in flight
        self.sent_at = 0.0
        self.rtt_min: float | None = None
        self.consumed = 0                # connection bytes consumed since the PING
        self.quiet = 0                   # bytes to consume before the next sample
        self._seq = 0

    def seed_rtt(self, rtt: float) -> None:
        """A round trip measured before any data flowed (the handshake)."""
        if rtt > 0:
            self.rtt_min = rtt if self.rtt_min is None else min(self.rtt_min, rtt)

    def wants_sample(self) -> bool:
        return self.ping is None and self.quiet <= 0

    def start(self, now: float) -> bytes:
        """Begin a sample at ``now``; returns the PING payload to send."""
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        self.ping = PING_TAG + self._seq.to_bytes(4, "big")
        self.sent_at = now
        self.consumed = 0
        return self.ping

    def on_consumed(self, nbytes: int) -> None:
        if self.ping is not None:
            self.consumed += nbytes
        else:
            self.quiet -= nbytes

    def finish(self, now: float) -> float | None:
        """The sample's PING was acknowledged at ``now``: returns the factor
        ``rtt_min / interval`` that turns bytes consumed during the sample
        into a BDP estimate (None: an interval too short to use). Call
        :meth:`rest` next."""
        interval = now - self.sent_at
        self.ping = None
        if interval <= 0:
            return None
        self.rtt_min = interval if self.rtt_min is None else min(self.rtt_min, interval)
        return self.rtt_min / interval

    def rest(self, grew: bool, connection_window: int) -> None:
        """After a sample: while windows grow, sample again at once (every
        round trip); once they do not, only after a whole connection window
        has been consumed (on loopback a few hundred pings a second)."""
        self.quiet = 0 if grew else connection_window

    def grown(self, window: int, consumed: int, factor: float) -> int:
        """The new size of a window of ``window`` bytes whose consumer took
        ``consumed`` bytes during the sample (never smaller than ``window``)."""
        bdp = consumed * factor
        want = 2 * bdp
        if 8 * bdp >= 5 * window:
            # The consumer took >= 5/8 of the window per round trip: the
            # window, not the link, limited the sender. Double, as TCP's
            # slow start does, rather than creep up by what got through.
            want = max(want, 2 * window)
        return max(window, min(self.ceiling, int(want)))
