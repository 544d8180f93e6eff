"""Link emulation for the benchmarks: the userspace relay (delay, rate,
bounded buffer) on loopback, and the namespace + veth + htb link (root only).
Timing is asserted only as lower bounds the relay guarantees by construction,
with loose upper bounds; every socket, thread and process is stopped."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import xxhash

from llmwire.cli.bench import _netns
from llmwire.cli.bench._relay import Relay


class Sink:
    """A loopback server that counts what one client sends (or echoes it)."""

    def __init__(self, echo: bool = False) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.hasher = xxhash.xxh3_64()
        self.received = 0
        self.first: float | None = None
        self.last: float | None = None
        self.thread = threading.Thread(target=self._serve, args=(echo,), daemon=True)
        self.thread.start()

    def _serve(self, echo: bool) -> None:
        conn, _ = self.server.accept()
        with conn:
            while data := conn.recv(1 << 20):
                self.first = self.first or time.monotonic()
                self.last = time.monotonic()
                self.received += len(data)
                self.hasher.update(data)
                if echo:
                    conn.sendall(data)

    def join(self) -> None:
        self.thread.join(30)
        self.server.close()
        assert not self.thread.is_alive()


def test_relay_delays_each_direction():
    sink = Sink(echo=True)
    with Relay(("127.0.0.1", 0), ("127.0.0.1", sink.port), delay=0.02) as relay:
        with socket.create_connection(("127.0.0.1", relay.port)) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            rtts = []
            for i in range(3):
                t0 = time.monotonic()
                s.sendall(b"%d" % i)
                assert s.recv(16) == b"%d" % i
                rtts.append(time.monotonic() - t0)
            s.shutdown(socket.SHUT_WR)
            assert s.recv(16) == b""          # EOF crosses the relay too
    sink.join()
    assert all(0.04 <= r < 2.0 for r in rtts), rtts


def test_relay_limits_rate_and_buffer_and_keeps_bytes():
    rate, size, buffer = 20e6, 4_000_000, 1 << 20
    payload = os.urandom(size)
    sink = Sink()
    with Relay(("127.0.0.1", 0), ("127.0.0.1", sink.port), delay=0.01, rate=rate,
               buffer=buffer) as relay:
        with socket.create_connection(("127.0.0.1", relay.port)) as s:
            s.sendall(payload)
        sink.join()
        leg = relay.legs[0]
        assert 0 < leg.peak_held <= buffer
    assert sink.received == size and sink.hasher.intdigest() == xxhash.xxh3_64_intdigest(payload)
    # the last byte left the link no sooner than size/rate after the first
    # (less the first read, which went straight through)
    assert sink.last - sink.first >= (size - (256 << 10)) / rate
    assert sink.last - sink.first < 30


def test_relay_refuses_bad_settings():
    with pytest.raises(ValueError, match="delay"):
        Relay(("127.0.0.1", 0), ("127.0.0.1", 9), delay=-1)
    with pytest.raises(ValueError, match="buffer"):
        Relay(("127.0.0.1", 0), ("127.0.0.1", 9), delay=0.0, buffer=10)


needs_netns = pytest.mark.skipif(_netns.unavailable() is not None,
                                 reason=str(_netns.unavailable()))


@needs_netns
def test_namespace_link_carries_tcp_between_its_addresses_and_goes_away():
    script = ("import socket;s=socket.create_server(('%s',9000));print('ready',flush=True);"
              "c,_=s.accept();n=0\nwhile d:=c.recv(65536): n+=len(d)\nprint(n)"
              % _netns.ADDRESSES[1])
    with _netns.NamespaceLink(100_000_000) as link:
        assert link.exists()
        rx = subprocess.Popen(link.command(1, [sys.executable, "-c", script]),
                              stdout=subprocess.PIPE, text=True)
        try:
            assert rx.stdout.readline().strip() == "ready"
            send = ("import socket;s=socket.create_connection(('%s',9000));"
                    "s.sendall(b'x'*1000000);s.close()" % _netns.ADDRESSES[1])
            subprocess.run(link.command(0, [sys.executable, "-c", send]), check=True,
                           timeout=60)
            assert rx.stdout.readline().strip() == "1000000"
        finally:
            if rx.poll() is None:
                rx.kill()
            rx.wait(10)
        qdisc = subprocess.run(["tc", "-n", link.names[0], "qdisc", "show"],
                               capture_output=True, text=True).stdout
        assert "htb" in qdisc
    assert not link.exists()


@needs_netns
def test_namespace_link_is_removed_after_a_failure():
    with pytest.raises(RuntimeError, match="boom"):
        with _netns.NamespaceLink(10_000_000) as link:
            assert link.exists()
            raise RuntimeError("boom")
    assert not link.exists()


@needs_netns
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_namespace_link_is_removed_on_ctrl_c_and_sigterm(sig):
    code = ("import time,sys\nfrom llmwire.cli.bench._netns import NamespaceLink\n"
            "with NamespaceLink(10_000_000) as l:\n"
            "    print(' '.join(l.names),flush=True)\n    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        names = proc.stdout.readline().split()
        assert len(names) == 2 and all(n in _netns._namespaces() for n in names)
        os.kill(proc.pid, sig)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert not set(names) & set(_netns._namespaces())


@needs_netns
def test_stale_namespaces_of_dead_processes_are_swept():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    name = f"{_netns.PREFIX}{dead.pid}-a"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        assert name in _netns.sweep_stale()
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)
    assert name not in _netns._namespaces()
