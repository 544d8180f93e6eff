"""FedAvg client over llmwire (docs/learning.md walks through it).

    LLMWIRE_SECRET=s3cret python3 docs/examples/fedavg_client.py --index 0 --clients 4

It trains on one genre of Shakespeare (client 0: the comedies) from the
global model it holds, sends ``local - global`` quantized, and applies the
server's mean update to its copy of the global, round after round.
"""

import argparse
import asyncio
import os

import llmwire
from llmwire import rounds
from llmwire.cli.learning import data, models


async def work(args: argparse.Namespace) -> None:
    task = models.tiny(data.split(data.load_excerpt(), args.clients))
    name = list(task.train)[args.index]  # this client's genre
    local = task.model.state_dict()  # the model's own parameters: training changes them
    base = {k: v.clone() for k, v in local.items()}  # the global, as received
    secret = os.environb.get(b"LLMWIRE_SECRET", b"example-secret")
    async with await llmwire.connect(args.host, args.port, secret=secret, timeout=60) as t:
        await rounds.announce(t, name, None)
        have = await rounds.receive_update(t, base, None)  # round 0: whole weights
        for r in range(1, args.rounds + 1):
            for key, tensor in local.items():
                tensor.copy_(base[key])  # start the round from the global
            # train off the event loop, so that the connection answers the server's pings
            await asyncio.to_thread(task.train_steps, name, r, args.local_steps, 0)
            sent = await rounds.send_update(t, local, base, have, args.format, client=name,
                                            weight=len(task.train[name]))
            have = await rounds.receive_update(t, base, have)  # the new global
            print(f"{name} round {r}: sent {sent.wire_bytes} bytes, now at {have}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7070)
    parser.add_argument("--index", type=int, required=True, help="which client: 0..clients-1")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--format", default="nf4", help="of the updates (raw: fp32)")
    llmwire.run(work(parser.parse_args()))
