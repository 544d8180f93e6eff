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

A window that limits shows before the PING's ACK: what it lets through
arrives as a burst at the link's rate. So on DATA arrivals from a 16th of
``rtt_min`` into a sample (then at most every 64th of it), a window whose
consumer has taken at least an eighth of it in the sample is judged on
what has been consumed so far, with ``interval`` the time since the PING
went out, by the doubling clause alone: twice itself if ``bdp`` is at
least 5/8 of it, else unchanged (a ``2 × bdp`` extrapolated from a short
interval would mostly measure how the consumer happened to read). If a
window grows, the sample ends there; its ACK, when it comes, is still the
tuner's (not an event) and still an RTT sample. The next sample starts
with the next DATA, so while windows grow early several PINGs may be
unanswered at once (one per doubling). On a 100 ms path this grants a
window that covers the BDP before the sender has used its first one,
instead of a round trip later. The time is that of the DATA that prompts
the check (the connection's clock is fresh then), so a consumer is
measured at its own pace. A handshake RTT inflated by a busy peer can cost
a short path one early doubling before the first ACK lowers ``rtt_min``.

One sample judged at a time: the next starts at once while windows grow,
else only after a whole connection window has been consumed (on loopback a
few hundred pings a second at most).
"""

from __future__ import annotations

import collections

__all__ = ["WindowTuner", "PING_TAG"]

#: First bytes of the PING payloads the tuner sends (their ACKs are its own).
PING_TAG = b"\xffbdp"


class WindowTuner:
    """The state of the connection's one outstanding RTT/delivery sample."""

    __slots__ = ("ceiling", "ping", "sent_at", "check_at", "rtt_min", "consumed", "quiet",
                 "_seq", "_late")

    def __init__(self, ceiling: int) -> None:
        self.ceiling = ceiling
        self.ping: bytes | None = None   # the payload of the PING in flight
        self.sent_at = 0.0
        self.check_at = float("inf")     # when the sample may first be judged early
        self.rtt_min: float | None = None
        self.consumed = 0                # connection bytes consumed since the PING
        self.quiet = 0                   # bytes to consume before the next sample
        self._seq = 0
        # PINGs whose samples ended early, oldest first: (payload, sent at)
        self._late: collections.deque[tuple[bytes, float]] = collections.deque()

    def seed_rtt(self, rtt: float) -> None:
        """A round trip measured before any data flowed (the handshake)."""
        self._note_rtt(rtt)

    def _note_rtt(self, rtt: float) -> None:
        if rtt > 0:
            self.rtt_min = rtt if self.rtt_min is None else min(self.rtt_min, rtt)

    def wants_sample(self) -> bool:
        return self.ping is None and self.quiet <= 0

    def start(self, now: float) -> bytes:
        """Begin a sample at ``now``; returns the PING payload to send."""
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        self.ping = PING_TAG + self._seq.to_bytes(4, "big")
        self.sent_at = now
        self.check_at = now + self.rtt_min / 16 if self.rtt_min else float("inf")
        self.consumed = 0
        return self.ping

    def claim_late(self, payload: bytes, now: float) -> bool:
        """Whether an ACK's payload answers a PING whose sample ended early;
        it is then the tuner's (not an event) and its round trip counts
        towards ``rtt_min``. ACKs come in order, so only the oldest such
        PING can be answered next."""
        if not self._late or payload != self._late[0][0]:
            return False
        _, sent_at = self._late.popleft()
        self._note_rtt(now - sent_at)
        return True

    def early(self, now: float) -> float | None:
        """Mid-sample at ``now`` (a DATA arrival): the factor for the bytes
        consumed so far, as :meth:`finish` gives it, from a 16th of
        ``rtt_min`` into the sample and at most every 64th of it; else None.
        Judge windows with ``grown(..., early=True)`` (:meth:`may_grow_early`
        first: no window below ``smallest`` can grow); if one grew, call
        :meth:`end_early` and :meth:`rest`."""
        if self.ping is None or now < self.check_at or not self.rtt_min:
            return None
        self.check_at = now + self.rtt_min / 64
        return self.rtt_min / (now - self.sent_at)

    def may_grow_early(self, factor: float, smallest: int) -> bool:
        """Whether, mid-sample, any window of at least ``smallest`` bytes
        could double (one O(1) test per DATA frame; on loopback never)."""
        return 8 * self.consumed * factor >= 5 * smallest

    def end_early(self) -> None:
        """A window grew on :meth:`early`: the sample ends; its ACK comes late."""
        assert self.ping is not None
        self._late.append((self.ping, self.sent_at))
        self.ping = None
        self.check_at = float("inf")

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
        self.check_at = float("inf")
        if interval <= 0:
            return None
        self._note_rtt(interval)
        assert self.rtt_min is not None
        return self.rtt_min / interval

    def rest(self, grew: bool, connection_window: int) -> None:
        """After a sample: while windows grow, sample again at once (every
        round trip); once they do not, only after a whole connection window
        has been consumed (on loopback a few hundred pings a second)."""
        self.quiet = 0 if grew else connection_window

    def grown(self, window: int, consumed: int, factor: float, early: bool = False) -> int:
        """The new size of a window of ``window`` bytes whose consumer took
        ``consumed`` bytes during the sample (never smaller than ``window``).
        Mid-sample (``early``), only once that is an eighth of the window
        (a rate from fewer bytes is noise: frames read in one go), and only
        by doubling."""
        bdp = consumed * factor
        if early:
            if 8 * consumed < window or 8 * bdp < 5 * window:
                return window
            return max(window, min(self.ceiling, 2 * window))
        want = 2 * bdp
        if 8 * bdp >= 5 * window:
            # The consumer took >= 5/8 of the window per round trip: the
            # window, not the link, limited the sender. Double, as TCP's
            # slow start does, rather than creep up by what got through.
            want = max(want, 2 * window)
        return max(window, min(self.ceiling, int(want)))
