"""FedAvg server over llmwire (docs/learning.md walks through it).

    LLMWIRE_SECRET=s3cret python3 docs/examples/fedavg_server.py --clients 4 --rounds 20

It sends the initial model to every client once, whole and lossless; then
each round it folds the clients' quantized updates into one running sum as
they arrive, sends the mean update back to all of them (encoded once), and
evaluates its global model on held-out text.
"""

import argparse
import asyncio
import os

import llmwire
from llmwire import rounds
from llmwire.cli.learning import data, models


async def serve(args: argparse.Namespace) -> None:
    task = models.tiny(data.split(data.load_excerpt(), args.clients))
    global_ = task.model.state_dict()  # the server's model: updated in place each round
    secret = os.environb.get(b"LLMWIRE_SECRET", b"example-secret")
    clients: dict[str, llmwire.Transport] = {}
    everyone, finished = asyncio.Event(), asyncio.Event()

    async def handler(transport: llmwire.Transport) -> None:
        name, _ = await rounds.read_announce(transport)  # "I am comedies, I hold nothing"
        clients[name] = transport
        if len(clients) == args.clients:
            everyone.set()
        await finished.wait()  # the connection lives until the last round is sent

    async with await llmwire.serve(handler, args.host, args.port, secret=secret) as server:
        print(f"listening on port {server.port}", flush=True)
        await everyone.wait()
        peers = list(clients.values())
        print(f"round 0: held-out loss {await asyncio.to_thread(task.evaluate):.4f}", flush=True)
        down = await rounds.broadcast_state(peers, global_, 0)  # whole, raw: lossless
        aggregator = rounds.Aggregator(global_, down.reference)
        for r in range(1, args.rounds + 1):
            aggregator.next_round(down.reference)
            uploads = await asyncio.gather(*(aggregator.receive(t) for t in peers))
            mean = aggregator.close()  # the weighted mean of the updates that verified
            down = await rounds.broadcast_update(peers, mean.update, global_, down.reference,
                                                 args.format)  # applied to global_ too
            loss = await asyncio.to_thread(task.evaluate)  # off the loop: pings go on
            up = sum(u.wire_bytes for u in uploads)
            print(f"round {r}: held-out loss {loss:.4f}; {up} bytes up, "
                  f"{down.wire_bytes * len(peers)} down", flush=True)
        finished.set()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7070, help="0: any free port")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--format", default="nf4", help="of the updates (raw: fp32)")
    llmwire.run(serve(parser.parse_args()))
