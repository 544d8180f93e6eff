"""The NVFlare job of ``llmwire bench nvflare``: :mod:`.job` builds and runs
one mode in ``FedJob.simulator_run``; :mod:`.client` and :mod:`.client_oob`
are the sites' scripts; :mod:`.counter` counts the bytes of the messages."""
