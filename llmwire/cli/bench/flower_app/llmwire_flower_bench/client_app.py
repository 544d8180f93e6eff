"""The ClientApp, one handler per mode:

- ``stock``: what a Flower app does today (ArrayRecord in, ArrayRecord out);
- ``mod``: the same stock handler, unchanged, under ``llmwire_mod``;
- ``inmessage``: decoded in place into the model, the update computed from
  the received encoding (``load_global`` / ``reply_update``);
- ``oob``: the global pulled and the update pushed over llmwire
  (``OutOfBandClient``); Flower carries only the reference.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from llmwire.integrations.flower import OutOfBandClient, llmwire_mod, load_global, reply_update

from .task import empty_model, note_idle, train

app = ClientApp()


def stock(msg: Message, context: Context) -> Message:
    state = msg.content["arrays"].to_torch_state_dict()
    examples = train(state, int(context.node_config["partition-id"]),
                     int(msg.content["config"]["server-round"]))
    return Message(RecordDict({"arrays": ArrayRecord(state),
                               "metrics": MetricRecord({"num-examples": examples})}),
                   reply_to=msg)


def inmessage(msg: Message, context: Context) -> Message:
    state = empty_model(int(context.run_config["params"]))
    base = load_global(msg, state)
    examples = train(state, int(context.node_config["partition-id"]),
                     int(msg.content["config"]["server-round"]))
    return reply_update(msg, state, {"num-examples": examples}, base=base)


def oob(msg: Message, context: Context) -> Message:
    state = empty_model(int(context.run_config["params"]))
    with OutOfBandClient(msg, context, state,
                         cache_dir=str(context.run_config["cache-dir"])) as link:
        link.pull()
        examples = train(state, int(context.node_config["partition-id"]),
                         int(msg.content["config"]["server-round"]))
        link.push(examples)
        return link.reply({"num-examples": examples})


@app.train()
def handle(msg: Message, context: Context) -> Message:
    mode = str(context.run_config["mode"])
    note_idle(str(context.run_config["out-dir"]), "clientapp")
    if mode == "mod":
        return llmwire_mod(msg, context, stock)
    return {"stock": stock, "inmessage": inmessage, "oob": oob}[mode](msg, context)
