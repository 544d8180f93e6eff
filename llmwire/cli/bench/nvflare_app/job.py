"""One mode of ``llmwire bench nvflare``: ``python -m
llmwire.cli.bench.nvflare_app.job --mode M ...`` builds the FedJob, runs it
in NVFlare's simulator (this process is the simulator's server; each site
is a ``simulator_worker`` process below it) and writes ``<out>/result.json``
(seconds of ``simulator_run``, its return code, the workspace)."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

from llmwire.cli.bench._fl_task import note_idle

HERE = pathlib.Path(__file__).parent
#: NVFlare's own quantization filter's name for each format
NVFLARE_TYPES = {"nvflare-fp16": "float16", "nvflare-nf4": "normfloat4"}


def build(mode: str, params: int, clients: int, rounds: int, ckpt: str,
          out: pathlib.Path) -> object:
    from nvflare import FedJob
    from nvflare.app_common.workflows.fedavg import FedAvg
    from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor
    from nvflare.client.config import ExchangeFormat
    from nvflare.job_config.defs import FilterType
    from nvflare.job_config.script_runner import FrameworkType, ScriptRunner

    from llmwire.cli.bench.nvflare_app.counter import WireCounter
    from llmwire.integrations.nvflare import OutOfBandFedAvg, add_filters

    sites = [f"site-{i + 1}" for i in range(clients)]
    tasks = ["train"]
    job = FedJob(name=f"llmwire_bench_{mode.replace('-', '_')}", min_clients=clients)
    if mode == "oob":
        controller: object = OutOfBandFedAvg(num_clients=clients, num_rounds=rounds,
                                             down="nf4", up="nf4", gather_timeout=120)
    else:
        controller = FedAvg(num_clients=clients, num_rounds=rounds)
    job.to_server(controller, id="controller")
    job.to_server(PTFileModelPersistor(source_ckpt_file_full_name=ckpt,
                                       allow_numpy_conversion=False), id="persistor")
    counted = str(out / "wire.jsonl")
    if mode != "oob":  # counted first on the way in, before the other result filters
        job.to_server(WireCounter(counted, "up"), filter_type=FilterType.TASK_RESULT,
                      tasks=tasks)
    if mode in NVFLARE_TYPES:
        from nvflare.app_opt.pt.quantization.dequantizer import ModelDequantizer
        from nvflare.app_opt.pt.quantization.quantizer import ModelQuantizer

        kind = NVFLARE_TYPES[mode]
        job.to_server(ModelQuantizer(quantization_type=kind),
                      filter_type=FilterType.TASK_DATA, tasks=tasks)
        job.to_server(ModelDequantizer(), filter_type=FilterType.TASK_RESULT, tasks=tasks)
        for site in sites:
            job.to(ModelDequantizer(), site, filter_type=FilterType.TASK_DATA, tasks=tasks)
            job.to(ModelQuantizer(quantization_type=kind), site,
                   filter_type=FilterType.TASK_RESULT, tasks=tasks)
    elif mode == "filters":
        add_filters(job, sites, tasks=tasks, weights="bf16", diffs="nf4", as_diff=True)
    if mode != "oob":  # counted last on the way out, after the other task data filters
        job.to_server(WireCounter(counted, "down"), filter_type=FilterType.TASK_DATA,
                      tasks=tasks)
    script = "client_oob.py" if mode == "oob" else "client.py"
    script_args = f"--out {out}"
    if mode == "oob":
        script_args += f" --params {params} --cache {out / 'cache'}"
    for site in sites:
        job.to(ScriptRunner(script=str(HERE / script), script_args=script_args,
                            framework=FrameworkType.PYTORCH,
                            server_expected_format=ExchangeFormat.PYTORCH), site,
               tasks=tasks)
    return job


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", required=True)
    parser.add_argument("--params", type=int, required=True)
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    job = build(args.mode, args.params, args.clients, args.rounds, args.ckpt, out)
    note_idle(str(out), "server")
    started = time.perf_counter()
    rc = job.simulator_run(str(out / "workspace"), threads=args.clients)
    seconds = time.perf_counter() - started
    (out / "result.json").write_text(json.dumps({"rc": rc or 0, "seconds": seconds,
                                                 "pid": os.getpid()}))


if __name__ == "__main__":
    main()
