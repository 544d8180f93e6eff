"""A site of ``llmwire bench nvflare`` out of band: the site's own model
receives the global over llmwire, trains in place, and its update goes back
over llmwire; NVFlare carries the link and the receipt."""

import argparse

import nvflare.client as flare

from llmwire.cli.bench._fl_task import empty_model, note_idle, train
from llmwire.integrations.nvflare import OutOfBandClient


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--params", type=int, required=True)
    parser.add_argument("--cache", required=True)
    args = parser.parse_args()
    note_idle(args.out, "client")
    flare.init()
    name = flare.get_site_name()
    site = int(name.rsplit("-", 1)[1]) - 1
    state = empty_model(args.params)
    while flare.is_running():
        received = flare.receive()
        with OutOfBandClient(received, name, state, cache_dir=args.cache) as link:
            link.pull()
            link.push(train(state, site, received.current_round))
            flare.send(link.reply())


if __name__ == "__main__":
    main()
