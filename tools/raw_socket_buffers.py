"""Raw loopback sockets: reused 4 MiB buffers against model-sized buffers.

    python3 tools/raw_socket_buffers.py

Moves 1 GiB between two processes with blocking sendall / recv_into, with the
sender's and the receiver's buffer either a reused 4 MiB chunk or a 1 GiB
array (already touched), three runs each. Shows what moving real memory,
rather than a cache-hot buffer, costs the plain socket baseline.
"""
import multiprocessing as mp
import socket
import time

import numpy as np
N = 1 << 30; C = 4 << 20
def recv(conn, big):
    srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1); conn.send(srv.getsockname()[1])
    s, _ = srv.accept(); buf = np.ones(N if big else C, np.uint8); mv = memoryview(buf); got = 0
    while got < N:
        off = got if big else got % C
        n = s.recv_into(mv[off:], min(N - got, C, len(mv) - off)); got += n
    s.sendall(b"k")
def send(conn, port, big):
    data = np.ones(N if big else C, np.uint8); mv = memoryview(data)
    s = socket.create_connection(("127.0.0.1", port)); t = time.perf_counter()
    for i in range(0, N, C): s.sendall(mv[i:i + C] if big else mv)
    s.recv(1); conn.send(time.perf_counter() - t)
if __name__ == "__main__":
    ctx = mp.get_context("spawn")
    for sb, rb in ((False, False), (True, False), (False, True), (True, True)):
        out = []
        for _ in range(3):
            a, b = ctx.Pipe(); c, d = ctx.Pipe()
            r = ctx.Process(target=recv, args=(b, rb)); r.start(); port = a.recv()
            s = ctx.Process(target=send, args=(d, port, sb)); s.start(); out.append(round(N / c.recv() / 1e9, 2)); s.join(); r.join()
        print("sender big", sb, "receiver big", rb, out)
