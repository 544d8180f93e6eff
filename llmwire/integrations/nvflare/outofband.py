"""The out-of-band way in: model bytes beside NVFlare, over llmwire.

:class:`OutOfBandFedAvg` is a ``ModelController`` (FedAvg) that runs an
llmwire server (llmwire.integrations._link) in the server's process. Each
site's task carries only a link (address, port, a per-run secret, the
round, the site's own token: one task per site), in the task meta under
:data:`META`; the site's script, with :class:`OutOfBandClient`, connects,
pulls the global into its model, trains, and pushes its update (``local -
global``, nf4 by default) into the round's streaming aggregator. The mean
of the updates that verified is applied to the global, which the persistor
saves every round. NVFlare's CellNet, its filters and its aggregator never
see a model byte; a site holds the last global it received in a file
(llmwire.integrations.cache), so the next downlink is the mean update in
``down`` (nf4) instead of whole weights.
"""

from __future__ import annotations

import os
import time
from typing import Any, Mapping

import numpy as np
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.workflows.base_fedavg import BaseFedAvg

from .._encoding import encode_array
from .._link import LinkClient, LinkError, LinkServer
from .filters import default_cache_dir
from ...errors import LlmwireError

__all__ = ["OutOfBandFedAvg", "OutOfBandClient", "LinkError", "LINK"]

#: the meta key of a task's link and of a result's receipt
LINK = "llmwire_link"
_STEPS = "NUM_STEPS_CURRENT_ROUND"


class OutOfBandFedAvg(BaseFedAvg):
    """FedAvg whose model bytes travel over llmwire, beside NVFlare.

    The initial global comes from the persistor (``persistor_id``, e.g. a
    ``PTFileModelPersistor`` with ``allow_numpy_conversion=False``: torch
    tensors), and the global after every round goes back to it. ``down``:
    the format of the mean update sent to sites that hold the previous
    global (whole weights go raw); ``up``: the sites' updates. ``host`` /
    ``port``: where the llmwire server listens (port 0: any free one);
    ``advertise``: the address the sites are told (default ``host``; on a
    real deployment, the server's address as the sites reach it). The
    secret is made per run and travels in the task meta, so protect
    NVFlare's own channel as you would the model. ``gather_timeout``: how
    long a round's downlink waits for all sampled sites to connect;
    ``upload_timeout``: how long the round waits for the uploads of sites
    that replied; ``task_timeout``: NVFlare's task timeout (0: none).
    ``certfile``/``keyfile``: TLS for the llmwire link (PEM files on the
    server; sites then pass ``ssl=`` a client context to
    :class:`OutOfBandClient`). The
    FedAvg weight of a site is the ``NUM_STEPS_CURRENT_ROUND`` it reports
    (:meth:`OutOfBandClient.reply`). Arguments are plain values, as a
    ``FedJob`` writes them into the job's config.
    """

    def __init__(self, *, num_clients: int = 2, num_rounds: int = 5, start_round: int = 0,
                 persistor_id: str = "persistor", task_name: str = "train",
                 down: str = "nf4", up: str = "nf4", host: str = "127.0.0.1", port: int = 0,
                 advertise: str | None = None, gather_timeout: float = 30.0,
                 upload_timeout: float = 600.0, task_timeout: int = 0,
                 sums: str = "float32", certfile: str | None = None,
                 keyfile: str | None = None) -> None:
        super().__init__(num_clients=num_clients, num_rounds=num_rounds,
                         start_round=start_round, persistor_id=persistor_id)
        for fmt in (down, up):  # a bad name fails here, not after a round of training
            if not isinstance(fmt, str):
                raise ValueError(f"a format is a name (e.g. 'nf4'), got {fmt!r}")
            encode_array(np.zeros(1, np.float32), fmt)
        self.task_name, self.down, self.up = task_name, down, up
        self.host, self.port, self.advertise = host, port, advertise
        self.gather_timeout, self.upload_timeout = gather_timeout, upload_timeout
        self.task_timeout, self.sums = task_timeout, sums
        self.certfile, self.keyfile = certfile, keyfile
        self.link: LinkServer | None = None
        #: per round: sites counted, downlink modes, failures, bytes (the link's)
        self.history: list[dict[str, Any]] = []

    def run(self) -> None:
        model = self.load_model()
        state = model.params
        if not state:
            raise LlmwireError("the persistor gave no model: OutOfBandFedAvg needs the "
                               "initial global from persistor_id")
        context = None
        if self.certfile:
            import ssl

            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self.certfile, self.keyfile)
        self.link = LinkServer(state, down=self.down, up=self.up, host=self.host,
                               port=self.port, advertise=self.advertise, ssl=context,
                               gather_timeout=self.gather_timeout,
                               upload_timeout=self.upload_timeout, sums=self.sums,
                               name="llmwire-nvflare-server")
        self.history = self.link.history
        self.link.open()
        self.info(f"llmwire link server on {self.host}:{self.link.port}")
        try:
            for self.current_round in range(self.start_round,
                                            self.start_round + self.num_rounds):
                if not self._round(self.current_round):
                    return
                model.params, model.current_round = state, self.current_round
                self.save_model(model)
        finally:
            self.link.close()

    def _round(self, round_: int) -> bool:
        """One round; False if the job was aborted."""
        assert self.link is not None
        sites = self.sample_clients(self.num_clients)
        self.link.expect(round_, "train", sites)
        replied: set[str] = set()

        def collect(result: FLModel) -> None:
            receipt = (result.meta or {}).get(LINK)
            name = (result.meta or {}).get("client_name")
            if isinstance(receipt, dict) and receipt.get("round") == round_ and name in sites:
                replied.add(name)
            else:
                self.warning(f"round {round_}: a result from {name!r} without this round's "
                             f"llmwire receipt is left out")

        for site in sites:  # one task per site: its token names it alone
            task = FLModel(params={}, current_round=round_,
                           total_rounds=self.start_round + self.num_rounds,
                           meta={LINK: self.link.link(round_, "train", site)})
            self.send_model(task_name=self.task_name, data=task, targets=[site],
                            timeout=self.task_timeout, callback=collect)
        while self.get_num_standing_tasks():
            if self.abort_signal.triggered:
                self.info("abort signal: the round is left unfinished")
                self.link.finish(round_, set())
                return False
            time.sleep(self._task_check_period)
        record = self.link.finish(round_, replied)
        for site, reason in record["failed"]:
            self.warning(f"round {round_}: {site}'s update is left out: {reason}")
        modes = ", ".join(f"{k}: {v}" for k, v in sorted(record["downlink"].items()))
        self.info(f"round {round_}: {len(record['clients'])} of {len(sites)} updates, "
                  f"{record['up_bytes']} bytes up, {record['down_bytes']} down ({modes})")
        return True


class OutOfBandClient(LinkClient):
    """A site's llmwire link for one task of an :class:`OutOfBandFedAvg`.

    ``received``: the ``FLModel`` that ``flare.receive()`` returned;
    ``site``: this site's name (``flare.get_site_name()``); ``state``: the
    model's own state dict (training changes it in place). :meth:`pull`
    fills ``state`` with the round's global, :meth:`push` sends ``state -
    global`` with its FedAvg weight, :meth:`reply` is the ``FLModel`` to
    ``flare.send``. ``cache_dir``: where the site keeps the last global it
    received (default :func:`default_cache_dir`).
    """

    def __init__(self, received: FLModel, site: str, state: Mapping[str, Any], *,
                 cache_dir: str | os.PathLike[str] | None = None, timeout: float = 60.0,
                 ssl: Any = None) -> None:
        link = (received.meta or {}).get(LINK) if isinstance(received, FLModel) else None
        super().__init__(link if isinstance(link, Mapping) else {}, site, state,
                         cache_dir=cache_dir if cache_dir is not None else default_cache_dir(),
                         timeout=timeout, ssl=ssl)
        self.steps: float | None = None

    def push(self, weight: float) -> Any:
        self.steps = weight
        return super().push(weight)

    def reply(self, metrics: Mapping[str, Any] | None = None) -> FLModel:
        """The result to ``flare.send``: no parameters, the receipt of what
        moved, the FedAvg weight, and ``metrics``."""
        meta: dict[str, Any] = {LINK: self.receipt()}
        if self.steps is not None:
            meta[_STEPS] = self.steps
        return FLModel(params=None, metrics=dict(metrics or {"llmwire_pushed": 1.0}),
                       current_round=self.link.get("round"), meta=meta)
