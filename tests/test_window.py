"""Receive-window auto-tuning in the sans-I/O connection, over a simulated
path (a clock, a rate and a one-way delay each way; no sockets, no time)."""

from __future__ import annotations

import collections

import pytest

from llmwire import events as E
from llmwire._window import PING_TAG, WindowTuner
from llmwire.errors import LocalProtocolError
from llmwire.protocol import Connection, Role, Settings

KiB, MiB = 1 << 10, 1 << 20


def settings(**kw) -> Settings:
    base = dict(max_frame_payload=16 * KiB, stream_window=64 * KiB,
                connection_window=128 * KiB, max_window=4 * MiB,
                keepalive_interval=None, idle_timeout=None)
    return Settings(**{**base, **kw})


class Path:
    """A sender and a receiver joined by a store-and-forward link of ``rate``
    bytes/s and ``delay`` s each way; the receiver's consumer takes at most
    ``consume`` bytes/s (None: all it has)."""

    def __init__(self, receiver: Settings, rate: float, delay: float,
                 consume: float | None = None, dt: float = 0.0005) -> None:
        self.a = Connection(Role.CLIENT, b"s", settings=settings(), nonce=b"A" * 32)
        self.b = Connection(Role.SERVER, b"s", settings=receiver, nonce=b"B" * 32)
        self.rate, self.delay, self.consume, self.dt = rate, delay, consume, dt
        self.now = 0.0
        self._queues = {id(self.a): collections.deque(), id(self.b): collections.deque()}
        self._free = {id(self.a): 0.0, id(self.b): 0.0}
        self.held = 0            # received, not yet consumed
        self.peak_held = 0
        self.delivered: list[tuple[float, int]] = []  # (time, bytes consumed)
        self._budget = 0.0
        self.sid = None
        while self.sid is None and self.now < 1.0:
            self.tick()
            if self.a.state.value == "OPEN" and self.b.state.value == "OPEN":
                self.sid = self.a.open_stream({})
        assert self.sid is not None

    def _carry(self) -> None:
        for src, dst in ((self.a, self.b), (self.b, self.a)):
            q = self._queues[id(src)]
            for buf in src.data_to_send():
                start = max(self.now, self._free[id(src)])
                self._free[id(src)] = start + len(buf) / self.rate
                q.append((self._free[id(src)] + self.delay, bytes(buf)))
            while q and q[0][0] <= self.now:
                dst.receive_data(q.popleft()[1], self.now)

    def tick(self) -> None:
        self.now += self.dt
        self._carry()
        if self.sid is not None:
            chunk = b"\0" * self.a.max_send_frame
            while (n := min(self.a.send_credit(self.sid), len(chunk))) > 0:
                self.a.send_data(self.sid, chunk[:n])
        for ev in self.b.events_received():
            if isinstance(ev, E.DataReceived):
                self.held += len(ev.data)
        self.peak_held = max(self.peak_held, self.held)
        take = self.held
        if self.consume is not None:
            self._budget = min(self._budget + self.consume * self.dt, self.consume * 2 * self.dt)
            take = min(take, int(self._budget))
            self._budget -= take
        if take:
            self.held -= take
            self.b.consumed(self.sid, take)
            self.delivered.append((self.now, take))
        self._carry()

    def run(self, seconds: float) -> None:
        end = self.now + seconds
        while self.now < end:
            self.tick()

    def throughput(self, since: float) -> float:
        got = sum(n for t, n in self.delivered if t >= since)
        return got / (self.now - since)

    def windows(self) -> tuple[int, int]:
        w = self.b.receive_windows
        return w.get(self.sid, 0), w[0]


RATE, DELAY = 50e6, 0.010          # 50 MB/s, 20 ms RTT: BDP 1 MB


def test_window_grows_to_the_bandwidth_delay_product_and_fills_the_link():
    p = Path(settings(), RATE, DELAY)
    p.run(0.6)
    stream_w, conn_w = p.windows()
    bdp = RATE * 2 * DELAY
    assert bdp <= stream_w <= 4 * MiB and bdp <= conn_w <= 4 * MiB
    assert p.throughput(p.now - 0.2) >= 0.9 * RATE
    # memory: never more received-and-unconsumed than the connection window
    assert p.peak_held <= conn_w


def test_without_autotune_the_window_caps_throughput():
    p = Path(settings(window_autotune=False), RATE, DELAY)
    p.run(0.4)
    assert p.windows() == (64 * KiB, 128 * KiB)
    assert p.throughput(p.now - 0.2) <= 64 * KiB / (2 * DELAY) * 1.05


def test_window_stops_at_its_ceiling():
    ceiling = 256 * KiB
    p = Path(settings(max_window=ceiling), RATE, DELAY)
    p.run(0.4)
    assert p.windows() == (ceiling, ceiling)
    assert p.throughput(p.now - 0.2) <= ceiling / (2 * DELAY) * 1.05


def test_a_slow_consumer_gets_no_more_window_than_it_consumes():
    consume = RATE / 10
    p = Path(settings(), RATE, DELAY, consume=consume)
    p.run(0.6)
    stream_w, conn_w = p.windows()
    # below 3.2 x what it takes per round trip (plus a frame), or the start
    bound = max(128 * KiB, 3.2 * consume * 2 * DELAY + 16 * KiB)
    assert stream_w <= bound and conn_w <= bound
    assert p.peak_held <= conn_w
    assert p.throughput(0.1) <= consume * 1.05


def test_tuner_pings_are_not_events():
    p = Path(settings(), RATE, DELAY)
    seen = []
    for _ in range(200):
        p.tick()
        seen += [ev for ev in p.a.events_received() + p.b.events_received()
                 if isinstance(ev, E.PingAcknowledged)]
    assert p.b._tuner.rtt_min is not None and p.b._tuner.rtt_min >= 2 * DELAY
    assert not seen


def test_tuner_rule():
    t = WindowTuner(ceiling=1000)
    ping = t.start(1.0)
    assert ping.startswith(PING_TAG) and len(ping) == 8
    t.on_consumed(300)
    factor = t.finish(1.5)
    assert factor == 1.0 and t.rtt_min == 0.5
    assert t.grown(400, 300, factor) == 800       # window-limited (>= 5/8): doubled
    assert t.grown(500, 300, factor) == 600       # 300 < 5/8 of 500: 2 x sample
    assert t.grown(700, 300, factor) == 700       # 2 x sample < window: unchanged
    assert t.grown(400, 900, factor) == 1000      # the ceiling
    t.rest(True, 200)
    assert t.wants_sample()                       # growing: sample again at once
    t.start(2.0)
    assert t.finish(2.25) == 1.0 and t.rtt_min == 0.25
    t.start(3.0)
    assert t.finish(3.5) == 0.5 and t.rtt_min == 0.25   # queueing: half the rate
    t.rest(False, 200)
    assert not t.wants_sample()                   # settled: quiet for a window
    t.on_consumed(200)
    assert t.wants_sample()


def test_tuner_judges_a_sample_early_and_owns_its_late_ack():
    t = WindowTuner(ceiling=1000)
    t.seed_rtt(0.64)
    first = t.start(1.0)
    assert t.early(1.03) is None                  # before a 16th of rtt_min
    assert t.early(1.04) == pytest.approx(16.0)   # 0.64 / 0.04
    assert t.early(1.045) is None                 # then every 64th of it
    assert t.early(1.05) == pytest.approx(12.8)
    # mid-sample, a window is judged once its consumer took an eighth of it,
    # and only doubles (bdp >= 5/8 of it), never 2 x a short-interval bdp
    assert t.grown(400, 49, 16.0, early=True) == 400
    assert t.grown(400, 50, 16.0, early=True) == 800
    assert t.grown(400, 60, 2.0, early=True) == 400      # bdp 120 < 5/8 x 400
    assert t.grown(400, 50, 16.0) == 1000                # (at the ACK: 2 x bdp)
    assert t.grown(800, 100, 16.0, early=True) == 1000   # the ceiling
    t.on_consumed(100)
    assert t.may_grow_early(5.0, 800) and not t.may_grow_early(4.9, 800)
    t.end_early()
    assert t.early(2.0) is None and t.wants_sample()
    second = t.start(1.06)
    assert not t.claim_late(second, 1.1)          # the one in flight is finish()'s
    assert not t.claim_late(b"\0" * 8, 1.1)       # the caller's own PINGs
    assert t.claim_late(first, 1.2)               # the early-ended sample's ACK
    assert t.rtt_min == pytest.approx(0.2)        # ... is an RTT sample too
    assert not t.claim_late(first, 1.3)           # ... once
    assert t.finish(1.36) == pytest.approx(2 / 3)
    third = t.start(2.0)
    t.end_early()
    fourth = t.start(2.01)
    t.end_early()
    assert not t.claim_late(fourth, 2.2)          # ACKs come in order: third first
    assert t.claim_late(third, 2.2) and t.claim_late(fourth, 2.2)
    assert WindowTuner(1000).early(5.0) is None   # no sample out


def test_a_limiting_window_grows_before_the_first_sample_is_acknowledged():
    """1 MB BDP, 256 KiB windows: the first burst arrives at the link's
    rate, so the windows grow well before the sample's PING's ACK returns
    (a round trip after the first DATA), before the sender ran out."""
    p = Path(settings(stream_window=256 * KiB, connection_window=256 * KiB), RATE, DELAY,
             dt=0.0001)
    first_data = grown = None
    while grown is None and p.now < 0.5:
        p.tick()
        if first_data is None and p.delivered:
            first_data = p.now
        if p.windows()[0] > 256 * KiB:
            grown = p.now
    assert first_data is not None and grown is not None
    assert grown - first_data < 2 * DELAY * 0.6
    p.run(0.3)
    assert p.throughput(p.now - 0.1) >= 0.9 * RATE
    assert p.peak_held <= p.windows()[1]


def test_a_slow_consumer_that_reads_in_lumps_gets_no_more_window_either():
    """Mid-sample judgments see a few consumer ticks: lumpy reading (every
    2 ms on a 20 ms path) must not pass for a fast consumer."""
    consume = RATE / 10
    p = Path(settings(), RATE, DELAY, consume=consume, dt=0.002)
    p.run(1.0)
    bound = max(128 * KiB, 3.2 * consume * 2 * DELAY + 16 * KiB)
    assert max(p.windows()) <= bound


def test_an_inflated_handshake_rtt_costs_a_short_path_one_doubling_at_most():
    """The handshake's RTT may include a busy peer's delay; the ACKs of the
    samples that ended early still lower rtt_min, so growth stops."""
    p = Path(settings(), RATE, 0.0002, dt=0.0001)
    p.b._tuner.rtt_min = 0.005          # as if the handshake had taken 5 ms
    p.run(0.3)
    assert p.b._tuner.rtt_min < 0.002   # the path's 0.4 ms plus queueing
    stream_w, conn_w = p.windows()
    assert stream_w <= 2 * 64 * KiB and conn_w <= 2 * 128 * KiB


def test_max_window_is_checked():
    with pytest.raises(LocalProtocolError, match="max_window"):
        Settings(max_window=10)


def test_a_short_path_keeps_its_windows_despite_queueing():
    """BDP (20 KB) below the window: data queued ahead of the tuner's PINGs
    makes them slow, but the handshake's round trip says the path is short,
    so nothing grows (as on loopback)."""
    p = Path(settings(), RATE, 0.0002, dt=0.0001)
    p.run(0.1)
    assert p.b._tuner.rtt_min < 0.001
    assert p.windows() == (64 * KiB, 128 * KiB)
    assert p.throughput(0.05) >= 0.9 * RATE
