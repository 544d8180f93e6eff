"""A site of ``llmwire bench nvflare`` in the modes on NVFlare's message path
(stock, NVFlare's quantization filters, llmwire's filters): NVFlare's Client
API as its examples use it: receive the global, train it in place, send the
weights back with the number of steps."""

import argparse

import nvflare.client as flare
from nvflare.client import FLModel, ParamsType

from llmwire.cli.bench._fl_task import note_idle, train


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    note_idle(args.out, "client")
    flare.init()
    site = int(flare.get_site_name().rsplit("-", 1)[1]) - 1
    while flare.is_running():
        received = flare.receive()
        state = received.params
        steps = train(state, site, received.current_round)
        flare.send(FLModel(params=state, params_type=ParamsType.FULL,
                           meta={"NUM_STEPS_CURRENT_ROUND": steps}))
        del received, state


if __name__ == "__main__":
    main()
