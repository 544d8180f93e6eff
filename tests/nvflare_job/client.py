"""The client of tests/test_nvflare_job.py: NVFlare's Client API, unchanged by
llmwire (the filters do the work): receive the global, change it, send the
difference."""

import torch
from net import update

import nvflare.client as flare
from nvflare.client import FLModel, ParamsType


def main() -> None:
    flare.init()
    site = int(flare.get_site_name().rsplit("-", 1)[1])
    while flare.is_running():
        received = flare.receive()
        assert all(isinstance(v, torch.Tensor) for v in received.params.values()), \
            "the filters restore torch tensors"
        round_ = received.current_round
        diff = {name: update(site, round_, name, value)
                for name, value in received.params.items()}
        flare.send(FLModel(params=diff, params_type=ParamsType.DIFF,
                           meta={"NUM_STEPS_CURRENT_ROUND": 10 * site}))


if __name__ == "__main__":
    main()
