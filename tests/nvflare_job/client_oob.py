"""The out-of-band client of tests/test_nvflare_job.py: the global comes over
llmwire into the site's own model, the update goes back over llmwire, and
NVFlare carries only the link and the receipt."""

import os

from net import Net, update

import nvflare.client as flare
from llmwire.integrations.nvflare import OutOfBandClient


def main() -> None:
    flare.init()
    name = flare.get_site_name()
    site = int(name.rsplit("-", 1)[1])
    net = Net()
    state = net.state_dict()
    while flare.is_running():
        received = flare.receive()
        with OutOfBandClient(received, name, state,
                             cache_dir=os.environ["LLMWIRE_NVFLARE_CACHE"]) as link:
            link.pull()
            round_ = received.current_round
            for key, value in state.items():  # "training": in place
                value += update(site, round_, key, value)
            link.push(10 * site)
            flare.send(link.reply({"loss": 1.0 / (round_ + 1)}))


if __name__ == "__main__":
    main()
