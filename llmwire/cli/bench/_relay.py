"""A userspace TCP relay that behaves like a long, rate-limited link.

Every byte read from one side is written to the other ``delay`` seconds
after it left a link of ``rate`` bytes per second (one-way delay: RTT/2
each way), in both directions, as a store-and-forward queue::

    enters the link at   t_in  = max(arrival, link free)
    link free again at   t_in + n / rate
    written out at       t_in + n / rate + delay

What it models: propagation delay (so an application's end-to-end window
must cover the bandwidth-delay product, as on a WAN), a bottleneck rate,
and a bottleneck buffer: each direction holds at most ``buffer`` bytes
(queued plus in flight); when it is full the relay stops reading, so the
sender's TCP sees a full receive window (back-pressure, as from a full
router queue that never drops).

What it does not model: loss, reordering, jitter, or the kernel's view of
a long path: each leg is a loopback (or veth) TCP connection whose
congestion control sees a short, clean link; only the end-to-end
application window (llmwire's credit, a raw stream's none) sees the delay.

Run as a process (``python3 -m llmwire.cli.bench._relay --listen H:P
--to H:P --delay S [--rate BPS] [--buffer N]``; it prints ``ready PORT``)
or in-process with :class:`Relay`.
"""

from __future__ import annotations

import argparse
import collections
import socket
import sys
import threading
import time

__all__ = ["Relay", "default_buffer", "main"]

_CHUNK = 256 * 1024
_MIN_BUFFER = 1 << 20


def default_buffer(rate: float | None, delay: float) -> int:
    """Bytes one direction may hold: what the link has in flight
    (``rate`` × ``delay``) plus 4 MiB of queue; 64 MiB without a rate."""
    if not rate:
        return 64 << 20
    return int(rate * delay) + (4 << 20)


class _Leg:
    """One direction: read from ``src``, write to ``dst`` when due."""

    def __init__(self, src: socket.socket, dst: socket.socket, delay: float,
                 rate: float | None, buffer: int) -> None:
        self.src, self.dst = src, dst
        self.delay, self.rate, self.buffer = delay, rate, buffer
        self._queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self._held = 0
        self._link_free = 0.0
        self._cond = threading.Condition()
        self._eof = False
        self.error: BaseException | None = None
        self.peak_held = 0
        self.threads = [threading.Thread(target=self._read, daemon=True),
                        threading.Thread(target=self._write, daemon=True)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _read(self) -> None:
        try:
            while True:
                with self._cond:
                    while self._held >= self.buffer and not self._eof:
                        self._cond.wait()
                    room = self.buffer - self._held
                data = self.src.recv(max(1, min(_CHUNK, room)))
                now = time.monotonic()
                with self._cond:
                    if not data:
                        self._eof = True
                        self._queue.append((now + self.delay, b""))
                        self._cond.notify_all()
                        return
                    t_in = max(now, self._link_free)
                    if self.rate:
                        self._link_free = t_in + len(data) / self.rate
                        due = self._link_free + self.delay
                    else:
                        due = t_in + self.delay
                    self._queue.append((due, data))
                    self._held += len(data)
                    self.peak_held = max(self.peak_held, self._held)
                    self._cond.notify_all()
        except OSError as exc:
            self._stop(exc)

    def _write(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._queue:
                        self._cond.wait()
                    due, data = self._queue[0]
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if not data:
                    self.dst.shutdown(socket.SHUT_WR)
                    return
                self.dst.sendall(data)
                with self._cond:
                    self._queue.popleft()
                    self._held -= len(data)
                    self._cond.notify_all()
        except OSError as exc:
            self._stop(exc)

    def _stop(self, exc: BaseException) -> None:
        self.error = exc
        with self._cond:
            self._eof = True
            self._queue.clear()
            self._queue.append((0.0, b""))
            self._cond.notify_all()
        for s in (self.src, self.dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class Relay:
    """Accept on ``listen`` and relay each connection to ``target`` through
    a :class:`_Leg` per direction. ``port`` is the bound port; :meth:`close`
    stops accepting and closes every relayed connection."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int], delay: float,
                 rate: float | None = None, buffer: int | None = None) -> None:
        if delay < 0 or (rate is not None and rate <= 0):
            raise ValueError("the relay's delay must be >= 0 and its rate > 0")
        self.buffer = default_buffer(rate, delay) if buffer is None else buffer
        if self.buffer < _MIN_BUFFER:
            raise ValueError(f"the relay's buffer must be at least {_MIN_BUFFER} bytes")
        self.target, self.delay, self.rate = target, delay, rate
        self._listener = socket.create_server(listen)
        self.port: int = self._listener.getsockname()[1]
        self.legs: list[_Leg] = []
        self._sockets: list[socket.socket] = []
        self._closed = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                a, _ = self._listener.accept()
            except OSError:
                return
            try:
                b = socket.create_connection(self.target, timeout=10)
            except OSError:
                a.close()
                continue
            b.settimeout(None)
            for s in (a, b):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sockets += [a, b]
            for src, dst in ((a, b), (b, a)):
                leg = _Leg(src, dst, self.delay, self.rate, self.buffer)
                self.legs.append(leg)
                leg.start()

    def close(self) -> None:
        self._closed = True
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        for s in self._sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self._thread.join(5)

    def __enter__(self) -> "Relay":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    """Run a relay until stdin closes or the process is terminated."""
    p = argparse.ArgumentParser(prog="python3 -m llmwire.cli.bench._relay",
                                description=__doc__.splitlines()[0])
    p.add_argument("--listen", type=_address, required=True)
    p.add_argument("--to", type=_address, required=True)
    p.add_argument("--delay", type=float, required=True, help="one-way delay, seconds")
    p.add_argument("--rate", type=float, default=None, help="bytes per second (default: none)")
    p.add_argument("--buffer", type=int, default=None, help="bytes held per direction")
    args = p.parse_args(argv)
    try:
        relay = Relay(args.listen, args.to, args.delay, args.rate, args.buffer)
    except (OSError, ValueError) as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 1
    print(f"ready {relay.port}", flush=True)
    try:
        sys.stdin.read()  # the parent closes our stdin (or terminates us) to stop
    except KeyboardInterrupt:
        pass
    relay.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
