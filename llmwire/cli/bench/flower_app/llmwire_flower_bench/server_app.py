"""The ServerApp: stock FedAvg, or llmwire's QuantizedFedAvg / OutOfBandFedAvg.

It writes ``<out-dir>/<mode>.json`` (seconds, bytes, history) and the final
global as ``<out-dir>/<mode>.pt``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from llmwire.integrations.flower import OutOfBandFedAvg, QuantizedFedAvg, wire_bytes

from .task import initial_model, note_idle

app = ServerApp()


class CountingFedAvg(FedAvg):
    """Stock FedAvg that counts the array bytes its messages carry."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.history: list[dict[str, Any]] = []

    def configure_train(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.history.append({"round": server_round,
                             "down_bytes": wire_bytes(arrays) * len(messages)})
        return messages

    def aggregate_train(self, server_round, replies):  # type: ignore[no-untyped-def]
        replies = list(replies)
        self.history[-1]["up_bytes"] = sum(
            wire_bytes(r.content["arrays"]) for r in replies if not r.has_error())
        self.history[-1]["flower_failures"] = [
            (r.metadata.src_node_id, r.error.reason) for r in replies if r.has_error()]
        return super().aggregate_train(server_round, replies)


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    note_idle(str(rc["out-dir"]), "serverapp")
    mode, n, rounds = str(rc["mode"]), int(rc["clients"]), int(rc["rounds"])
    sampling = dict(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n,
                    min_available_nodes=n)
    state = initial_model(int(rc["params"]))
    if mode == "stock":
        strategy: Any = CountingFedAvg(**sampling)
        initial = ArrayRecord(state)
        del state
    elif mode in ("mod", "inmessage"):
        strategy = QuantizedFedAvg(state, down=str(rc["down"]), up=str(rc["up"]), **sampling)
        initial = strategy.global_arrays()
    elif mode == "oob":
        strategy = OutOfBandFedAvg(state, down=str(rc["down"]), up=str(rc["up"]), **sampling)
        initial = None
    else:
        raise ValueError(f"unknown mode {mode!r}")
    started = time.perf_counter()
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds,
                            timeout=float(rc["round-timeout"]))
    seconds = time.perf_counter() - started
    out = str(rc["out-dir"])
    os.makedirs(out, exist_ok=True)
    final = result.arrays.to_torch_state_dict() if mode == "stock" else strategy.global_state
    torch.save(final, os.path.join(out, f"{mode}.pt"))
    rows = strategy.history
    report = {"mode": mode, "seconds": seconds, "rounds": rounds,
              "wire_bytes": sum(r.get("down_bytes", 0) + r.get("up_bytes", 0) for r in rows),
              "history": rows}
    with open(os.path.join(out, f"{mode}.json"), "w") as f:
        json.dump(report, f, default=str)
