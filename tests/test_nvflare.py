"""llmwire.integrations.nvflare: the DXO filters called directly, every
format, dtype, container and kind, as NVFlare calls them (on
``DXO(...).to_shareable()`` with an ``FLContext``), and the wiring helper."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the NVFlare adapter's tests use torch tensors")
pytest.importorskip("nvflare", reason="needs NVFlare: pip install 'llmwire[nvflare]'")

from nvflare.apis.dxo import DXO, DataKind, from_shareable  # noqa: E402
from nvflare.apis.fl_context import FLContext  # noqa: E402

import llmwire  # noqa: E402
from llmwire.errors import LlmwireError  # noqa: E402
from llmwire.integrations import _encoding  # noqa: E402
from llmwire.integrations.nvflare import DequantizeFilter, QuantizeFilter, add_filters  # noqa: E402

FORMATS = ["raw", "fp16", "bf16", "blockwise8", "fp4", "nf4"]


def state(container, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {"w": torch.randn(300, 257, generator=g), "h": torch.randn(64, 64, generator=g).half(),
           "n": torch.tensor([3, 4], dtype=torch.int64)}
    if container == "torch":
        out["b"] = torch.randn(4096, generator=g).to(torch.bfloat16)
        return out
    return {k: v.numpy() for k, v in out.items()}


def through(flt, dxo, site="site-1"):
    """Run a filter as NVFlare does: on a shareable, with a context."""
    ctx = FLContext()
    ctx.set_prop("__identity_name__", site, private=True, sticky=False)
    return from_shareable(flt.process(dxo.to_shareable(), ctx))


def expected(value, fmt):
    return llmwire.dequantize(llmwire.quantize(value, fmt), container=_encoding.view_tensor(
        value).container)


@pytest.mark.parametrize("container", ["torch", "numpy"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", [DataKind.WEIGHTS, DataKind.WEIGHT_DIFF])
def test_quantize_then_dequantize_restores_dtype_container_and_codec_values(container, fmt,
                                                                            kind):
    data = state(container)
    encoded = through(QuantizeFilter(weights=fmt, diffs=fmt, min_elements=1),
                      DXO(kind, data, {"NUM_STEPS_CURRENT_ROUND": 3}))
    assert encoded.data_kind == kind
    assert all(_encoding.is_blob(v) for v in encoded.data.values())
    assert encoded.meta["NUM_STEPS_CURRENT_ROUND"] == 3
    restored = through(DequantizeFilter(), encoded)
    assert "llmwire" not in restored.meta and restored.meta["NUM_STEPS_CURRENT_ROUND"] == 3
    for name, value in data.items():
        got = restored.data[name]
        assert type(got) is type(value), name
        assert got.dtype == value.dtype and tuple(got.shape) == tuple(value.shape), name
        want = expected(value, fmt)
        same = torch.equal(got, want.to(got.dtype)) if container == "torch" else \
            np.array_equal(got, np.asarray(want).astype(got.dtype))
        assert same, (name, fmt)


def test_a_shared_broadcast_is_encoded_once_and_never_changed_in_place():
    data = state("torch")
    meta = {"round": 1}
    flt = QuantizeFilter(weights="nf4", min_elements=1)
    dxo = DXO(DataKind.WEIGHTS, data, meta)
    first = through(flt, dxo, "site-1")
    second = through(flt, dxo, "site-2")
    assert dxo.data is data and all(isinstance(v, torch.Tensor) for v in data.values())
    assert meta == {"round": 1}  # the shared meta is untouched
    assert first.meta is not second.meta
    assert all(first.data[k] is second.data[k] for k in data)  # the same encoding, once
    again = through(flt, first)  # already encoded: judged from the data, passes unchanged
    assert all(again.data[k] is first.data[k] for k in data)


def test_results_as_diffs_against_the_global_the_site_received():
    global_ = state("torch")
    down = through(QuantizeFilter(weights="bf16", min_elements=1),
                   DXO(DataKind.WEIGHTS, global_))
    received = through(DequantizeFilter(keep_base=True), down, "site-7")
    local = {k: v.clone() for k, v in received.data.items()}
    local["w"] += 0.01
    up = through(QuantizeFilter(diffs="nf4", as_diff=True, min_elements=1),
                 DXO(DataKind.WEIGHTS, local), "site-7")
    assert up.data_kind == DataKind.WEIGHT_DIFF
    diff = through(DequantizeFilter(), up)
    assert diff.data_kind == DataKind.WEIGHT_DIFF
    assert float((diff.data["w"] - 0.01).abs().max()) < 1e-6  # a constant step: nf4 exact
    assert not diff.data["h"].any() and diff.data["h"].dtype == torch.float32  # unchanged
    with pytest.raises(LlmwireError, match="no global"):
        through(QuantizeFilter(as_diff=True), DXO(DataKind.WEIGHTS, local), "site-8")


def test_other_kinds_and_plain_dxos_pass_untouched():
    metrics = DXO(DataKind.METRICS, {"loss": 1.0})
    assert through(QuantizeFilter(), metrics).data == {"loss": 1.0}
    plain = DXO(DataKind.WEIGHTS, state("numpy"))
    out = through(DequantizeFilter(), plain)
    assert all(out.data[k] is plain.data[k] for k in plain.data)


def test_a_bad_format_fails_when_the_filter_is_made():
    with pytest.raises(llmwire.QuantizationError):
        QuantizeFilter(weights="int3")


def test_add_filters_needs_explicit_tasks_and_wires_four_positions():
    calls = []

    class Job:
        def to_server(self, obj, **kw):
            calls.append(("server", type(obj).__name__, kw["filter_type"], kw["tasks"]))

        def to(self, obj, site, **kw):
            calls.append((site, type(obj).__name__, kw["filter_type"], kw["tasks"]))

    with pytest.raises(ValueError, match="explicitly"):
        add_filters(Job(), ["site-1"], tasks=["*"])
    add_filters(Job(), ["site-1", "site-2"], tasks=["train"])
    assert ("server", "QuantizeFilter", "TASK_DATA", ["train"]) in calls
    assert ("server", "DequantizeFilter", "TASK_RESULT", ["train"]) in calls
    assert ("site-2", "DequantizeFilter", "TASK_DATA", ["train"]) in calls
    assert ("site-2", "QuantizeFilter", "TASK_RESULT", ["train"]) in calls
    assert len(calls) == 6


@pytest.mark.parametrize("fmt", ["fp16", "blockwise8", "fp4", "nf4"])
@pytest.mark.parametrize("container", ["torch", "numpy"])
def test_nvflare_layout_round_trips_and_says_what_nvflare_reads(fmt, container):
    data = state(container)
    encoded = through(QuantizeFilter(weights=fmt, layout="nvflare"),
                      DXO(DataKind.WEIGHTS, data, {"NUM_STEPS_CURRENT_ROUND": 2}))
    meta = encoded.meta
    assert meta["quantized_flag"] is True and meta["PROCESSED_ALGORITHM"] in (
        "float16", "blockwise8", "float4", "normfloat4")
    assert meta["source_datatype"]["w"] == "float32"
    if fmt in ("fp4", "nf4"):
        state_w = meta["quant_state"]["w"]
        assert set(state_w) == {"quant_type", "absmax", "blocksize", "quant_map", "dtype",
                                "shape"} and tuple(state_w["shape"]) == (300, 257)
    restored = through(DequantizeFilter(), encoded)
    assert "quant_state" not in restored.meta and restored.meta["NUM_STEPS_CURRENT_ROUND"] == 2
    for name, value in data.items():
        got = restored.data[name]
        assert type(got) is type(value) and got.dtype == value.dtype, name
        want = expected(value, fmt) if str(value.dtype) not in ("torch.int64", "int64") \
            else value
        if fmt == "fp16" and str(value.dtype) in ("torch.float16", "float16", "torch.bfloat16"):
            want = value  # not more bits than the format: left as it is, as NVFlare does
        same = torch.equal(got, want.to(got.dtype)) if container == "torch" else \
            np.array_equal(got, np.asarray(want).astype(got.dtype))
        assert same, (name, fmt)


@pytest.mark.parametrize("fmt", ["blockwise8", "fp4", "nf4"])
def test_nvflare_layout_decodes_bit_for_bit_as_bitsandbytes_both_ways(fmt):
    bnb = pytest.importorskip("bitsandbytes.functional",
                              reason="the check against bitsandbytes needs it")
    from llmwire.integrations.nvflare import nvflare_layout as layout

    t = torch.randn(300, 257, generator=torch.Generator().manual_seed(3))
    values, meta = layout.encode({"w": t}, fmt)
    qs = meta["quant_state"]["w"]
    if fmt == "blockwise8":
        theirs = bnb.dequantize_blockwise(values["w"], absmax=qs["absmax"], code=qs["code"])
        q, s = bnb.quantize_blockwise(t)
        their_meta = {"absmax": s.absmax, "code": s.code}
        reference = bnb.dequantize_blockwise(q, s)
    else:
        theirs = bnb.dequantize_4bit(values["w"], bnb.QuantState.from_dict(qs, device="cpu"))
        q, s = bnb.quantize_4bit(t, quant_type=fmt, blocksize=64)
        their_meta = s.as_dict()
        reference = bnb.dequantize_4bit(q, s)
    ours, _ = layout.decode(values, meta)
    assert torch.equal(theirs.reshape(t.shape), ours["w"])  # bitsandbytes reads what we wrote
    got, _ = layout.decode({"w": q}, {**meta, "quant_state": {"w": their_meta}})
    assert torch.equal(got["w"], reference.reshape(t.shape))  # and we read what it wrote


def _server_ctx(site, round_, job="job-1"):
    """A server-side filter's context: the site it runs for, the job."""
    ctx = FLContext()
    ctx.set_prop("__identity_name__", "server", private=True, sticky=False)
    ctx.set_prop("__run_num__", job, private=True, sticky=False)
    peer = FLContext()
    peer.set_prop("__identity_name__", site, private=True, sticky=False)
    ctx.set_peer_context(peer)
    return ctx


def _site_ctx(site, job="job-1"):
    ctx = FLContext()
    ctx.set_prop("__identity_name__", site, private=True, sticky=False)
    ctx.set_prop("__run_num__", job, private=True, sticky=False)
    return ctx


def _run_filter(flt, dxo, ctx, round_=None):
    shareable = dxo.to_shareable()
    if round_ is not None:
        shareable.set_header("current_round", round_)
    return from_shareable(flt.process(shareable, ctx))


def test_the_downlink_is_a_delta_against_what_the_sites_hold(tmp_path):
    """Round 1: the global in bf16 to both sites; then the nf4 delta against
    the mirror, encoded once for both; each site's restored global is the
    server's mirror bit for bit, within one round's nf4 error of the true
    global (errors do not pile up); a site that did not say what it holds,
    or lost its cache, gets the mirror raw, or a clear error."""
    from llmwire.rounds.exchange import Diverged

    torch.manual_seed(0)
    global_ = {"w": torch.randn(300, 257), "b": torch.randn(4096).to(torch.bfloat16),
               "n": torch.tensor([1, 2])}
    server_q = QuantizeFilter(weights="bf16", down="nf4", min_elements=1)
    server_d = DequantizeFilter()
    sites = {s: (DequantizeFilter(cache_dir=str(tmp_path / s)),
                 QuantizeFilter(diffs="nf4", min_elements=1)) for s in ("site-1", "site-2")}
    for round_ in range(4):
        task = DXO(DataKind.WEIGHTS, global_, {"r": round_})
        sent = {s: _run_filter(server_q, task, _server_ctx(s, round_), round_) for s in sites}
        modes = {s: d.meta["llmwire"]["downlink"] for s, d in sent.items()}
        assert set(modes.values()) == ({"whole"} if round_ == 0 else {"update"}), modes
        if round_:
            assert all(sent["site-1"].data[k] is sent["site-2"].data[k] for k in global_)
        for site, (restore, encode) in sites.items():
            got = _run_filter(restore, sent[site], _site_ctx(site)).data
            assert got["b"].dtype == torch.bfloat16 and torch.equal(got["n"], global_["n"])
            error = float((got["w"] - global_["w"]).abs().max())
            assert error < (0.03 if round_ == 0 else 0.01), (round_, error)  # bf16, then nf4
            diff = {k: torch.zeros_like(v, dtype=torch.float32) if v.is_floating_point()
                    else v for k, v in got.items()}
            result = _run_filter(encode, DXO(DataKind.WEIGHT_DIFF, diff), _site_ctx(site))
            said, sent_meta = result.meta["llmwire"]["holds"], sent[site].meta["llmwire"]
            assert said == {**sent_meta["reference"], "run": sent_meta["run"]}
            _run_filter(server_d, result, _server_ctx(site, round_))
        # the true global moves on by a small step, as FedAvg's would
        global_ = {"w": global_["w"] + 0.01 * torch.randn(300, 257),
                   "b": (global_["b"].float() + 0.01).to(torch.bfloat16), "n": global_["n"]}
    # a site the server heard nothing from gets the mirror whole, raw
    task = DXO(DataKind.WEIGHTS, global_, {})
    stranger = _run_filter(server_q, task, _server_ctx("site-3", 9), 9)
    assert stranger.meta["llmwire"]["downlink"] == "whole"
    assert {_encoding.from_blob(v).stype for v in stranger.data.values()} == {"llmwire/1/raw"}
    new = DequantizeFilter(cache_dir=str(tmp_path / "site-3"))
    assert torch.equal(_run_filter(new, stranger, _site_ctx("site-3")).data["b"],
                       server_q._downlink.mirror["b"])
    # a site whose cache is gone cannot add the delta: a clear error, nothing restored
    update = _run_filter(server_q, task, _server_ctx("site-1", 9), 9)
    assert update.meta["llmwire"]["downlink"] == "update"
    with pytest.raises(Diverged, match="needs whole weights"):
        _run_filter(DequantizeFilter(cache_dir=str(tmp_path / "empty")), update,
                    _site_ctx("site-1"))


def test_a_global_whose_tensors_change_dtype_goes_whole_and_integer_diffs_are_differences(
        tmp_path):
    """NVFlare's FedAvg turns an integer buffer (BatchNorm's
    num_batches_tracked) into float32 after round 1: the downlink starts
    over, whole, instead of failing the task; and a site's as_diff result
    carries an integer tensor's change, since FedAvg adds a WEIGHT_DIFF."""
    torch.manual_seed(1)
    first = {"w": torch.randn(64, 64), "bn.num_batches_tracked": torch.tensor(3)}
    server_q = QuantizeFilter(weights="bf16", down="nf4", min_elements=1)
    restore = DequantizeFilter(keep_base=True, cache_dir=str(tmp_path))
    encode = QuantizeFilter(diffs="nf4", as_diff=True, min_elements=1)
    sent = _run_filter(server_q, DXO(DataKind.WEIGHTS, first), _server_ctx("site-1", 0), 0)
    got = _run_filter(restore, sent, _site_ctx("site-1")).data
    local = {"w": got["w"] + 0.01, "bn.num_batches_tracked": got["bn.num_batches_tracked"] + 5}
    up = _run_filter(encode, DXO(DataKind.WEIGHTS, local), _site_ctx("site-1"))
    diff = _run_filter(DequantizeFilter(), up, _server_ctx("site-1", 0))
    assert int(diff.data["bn.num_batches_tracked"]) == 5  # the change, not the value 8
    assert float((diff.data["w"] - 0.01).abs().max()) < 1e-6
    second = {"w": first["w"] + 0.01, "bn.num_batches_tracked": torch.tensor(8.0)}
    sent = _run_filter(server_q, DXO(DataKind.WEIGHTS, second), _server_ctx("site-1", 1), 1)
    assert sent.meta["llmwire"]["downlink"] == "whole"
    got = _run_filter(restore, sent, _site_ctx("site-1")).data
    assert got["bn.num_batches_tracked"].dtype == torch.float32
    assert float(got["bn.num_batches_tracked"]) == 8.0


def test_names_must_be_lists_and_formats_known_when_the_job_is_built():
    from llmwire.integrations.nvflare import OutOfBandFedAvg

    class Job:
        def to_server(self, *a, **kw):
            raise AssertionError("nothing is wired")

        to = to_server

    with pytest.raises(ValueError, match="letter by letter"):
        add_filters(Job(), ["site-1"], tasks="train")
    with pytest.raises(ValueError, match="letter by letter"):
        add_filters(Job(), "site-1", tasks=["train"])
    with pytest.raises(llmwire.QuantizationError):
        OutOfBandFedAvg(down="bogus")
    with pytest.raises(llmwire.QuantizationError):
        OutOfBandFedAvg(up="nf5")
