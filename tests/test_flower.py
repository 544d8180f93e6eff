"""llmwire.integrations.flower without a Flower runtime: the Array codec, the
client mod, the strategies' aggregation on synthetic replies (against fp64
FedAvg), and the out-of-band link over real loopback sockets. The end-to-end
runs in real Flower deployments are in test_flower_deployment.py."""

from __future__ import annotations

import contextlib
import os
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the Flower adapter's tests use torch models")
pytest.importorskip("flwr", reason="needs Flower: pip install 'llmwire[flower]'")

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType  # noqa: E402
from flwr.app import MetricRecord, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

import llmwire  # noqa: E402
from llmwire.errors import LlmwireError, NonFiniteError, PayloadError  # noqa: E402
from llmwire.integrations import flower as lf  # noqa: E402
from llmwire.integrations.flower.codec import Folder  # noqa: E402

FORMATS = ["raw", "fp16", "bf16", "blockwise8", "fp4", "nf4"]


@pytest.fixture(autouse=True)
def task_identity():
    """Flower's Message() reads the running task's identity, which only its
    runtime sets: stand in for it."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def model(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"layer.weight": torch.randn(300, 257, generator=g),
            "head.weight": torch.randn(64, 128, generator=g).to(torch.bfloat16),
            "norm.weight": torch.ones(300),
            "steps": torch.tensor([3, 4], dtype=torch.int64)}


class Grid:
    def __init__(self, n):
        self.n = n

    def get_node_ids(self):
        return list(range(1, self.n + 1))


class Context:
    def __init__(self, node):
        self.node_id = node


def reply(node, content):
    """A reply as the strategy sees it: its source and content."""
    class Reply:
        metadata = type("Metadata", (), {"src_node_id": node})()

        def __init__(self):
            self.content = content

        def has_error(self):
            return False
    return Reply()


# -- the codec ----------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_weights_round_trip_in_place_match_the_codec_bit_for_bit(fmt):
    state = model()
    record = lf.encode_state(state, fmt, min_elements=1)
    assert lf.is_encoded(record)
    out = {k: torch.full_like(v, 7) for k, v in state.items()}
    pointers = {k: v.data_ptr() for k, v in out.items()}
    lf.decode_state(record, out)
    assert {k: v.data_ptr() for k, v in out.items()} == pointers  # in place
    for name, tensor in state.items():
        expected = llmwire.dequantize(llmwire.quantize(tensor, fmt))
        assert torch.equal(out[name], expected.to(tensor.dtype)), name
        assert record[name].stype == f"llmwire/1/{'raw' if tensor.dtype == torch.int64 else fmt}"
        assert record[name].dtype == str(tensor.dtype).removeprefix("torch.")


def test_a_stock_strategy_refuses_llmwire_arrays_loudly():
    record = lf.encode_state(model(), "nf4", min_elements=1)
    with pytest.raises(TypeError):
        record["layer.weight"].numpy()


def test_an_update_restores_local_minus_base_and_skips_unchanged_tensors():
    base_state = model()
    base = lf.encode_state(base_state, "bf16", min_elements=1)
    received = {k: torch.zeros_like(v) for k, v in base_state.items()}
    lf.decode_state(base, received)
    local = {k: v.clone() for k, v in received.items()}
    local["layer.weight"] += 0.01 * torch.randn(300, 257)
    update = lf.encode_update(local, base, "raw", min_elements=1)
    assert update["norm.weight"].stype == lf.codec.ZERO_STYPE and not update["norm.weight"].data
    assert update["steps"].stype == lf.codec.ZERO_STYPE
    folder = Folder(received)
    folder.add(update, 1.0)
    after = {k: v.clone() for k, v in received.items()}
    folder.apply_mean(after)
    assert torch.allclose(after["layer.weight"], local["layer.weight"], rtol=0, atol=1e-6)
    assert torch.equal(after["norm.weight"], received["norm.weight"])
    assert torch.equal(after["steps"], received["steps"])


def test_an_integer_tensor_that_changed_goes_as_its_values_and_averages_rounded():
    state = model()
    base = lf.encode_state(state, "raw")
    a = {k: v.clone() for k, v in state.items()}
    b = {k: v.clone() for k, v in state.items()}
    a["steps"] = torch.tensor([10, 20])
    b["steps"] = torch.tensor([20, 40])
    folder = Folder(state)
    folder.add(lf.encode_update(a, base, "nf4"), 1.0)
    folder.add(lf.encode_update(b, base, "nf4"), 3.0)
    out = {k: v.clone() for k, v in state.items()}
    folder.apply_mean(out)
    assert out["steps"].tolist() == [18, 35]  # (10 + 60) / 4 = 17.5 -> 18; 35


def test_non_finite_values_are_refused_by_the_encoder_and_the_fold():
    state = model()
    base = lf.encode_state(state, "raw")
    bad = {k: v.clone() for k, v in state.items()}
    bad["layer.weight"][3, 4] = float("nan")
    with pytest.raises(NonFiniteError):
        lf.encode_update(bad, base, "nf4")
    update = lf.encode_update(bad, base, "raw")  # raw carries it: the server must refuse
    folder = Folder(state)
    good = {k: v.clone() for k, v in state.items()}
    good["head.weight"] += 1
    folder.add(lf.encode_update(good, base, "raw"), 1.0)
    before = {k: v.copy() for k, v in folder.sums.items()}
    with pytest.raises(PayloadError, match="not finite"):
        folder.add(update, 1.0)
    for name in before:  # nothing of the bad update stayed in
        assert np.array_equal(folder.sums[name], before[name]), name


@pytest.mark.parametrize("broken", ["stype", "header", "length", "shape"])
def test_a_malformed_array_is_a_clear_error(broken):
    state = model()
    record = lf.encode_state(state, "nf4", min_elements=1)
    a = record["layer.weight"]
    if broken == "stype":
        record["layer.weight"] = Array(a.dtype, a.shape, "llmwire/1/fp4", a.data)
    elif broken == "header":
        record["layer.weight"] = Array(a.dtype, a.shape, a.stype, b"\xff\xff\x00\x00" + a.data[4:])
    elif broken == "length":
        record["layer.weight"] = Array(a.dtype, a.shape, a.stype, a.data[:-1])
    else:
        record["layer.weight"] = Array(a.dtype, (257, 300), a.stype, a.data)
    with pytest.raises(LlmwireError):
        lf.decode_state(record, {k: torch.zeros_like(v) for k, v in state.items()})


# -- the in-message strategy and the mod -------------------------------------

def _fedavg64(global_, locals_, weights):
    total = sum(weights)
    return {k: sum(w * (loc[k].double() - global_[k].double()) for loc, w in
                   zip(locals_, weights)) / total + global_[k].double() for k in global_}


def _client(msg, delta, node):
    state = {k: torch.zeros_like(v) for k, v in model().items()}
    base = lf.load_global(msg, state)
    state["layer.weight"] += delta
    return lf.reply_update(msg, state, {"num-examples": 10 * node}, base=base)


def _raw_round(global_, n):
    """A QuantizedFedAvg, raw both ways, and its round-1 messages to ``n`` nodes."""
    strategy = lf.QuantizedFedAvg(global_, down="raw", up="raw", min_train_nodes=n,
                                  min_available_nodes=n)
    return strategy, list(strategy.configure_train(1, strategy.global_arrays(), ConfigRecord(),
                                                   Grid(n)))


def test_quantized_fedavg_raw_both_ways_is_fedavg_to_float32_rounding():
    global_ = model()
    start = {k: v.clone() for k, v in global_.items()}
    strategy, messages = _raw_round(global_, 3)
    assert len(messages) == 3
    deltas = [0.01 * (i + 1) * torch.randn(300, 257) for i in range(3)]
    replies = [_client(m, d, i + 1) for i, (m, d) in enumerate(zip(messages, deltas))]
    arrays, metrics = strategy.aggregate_train(
        1, [reply(i + 1, r.content) for i, r in enumerate(replies)])
    assert lf.is_encoded(arrays)
    locals_ = [{**start, "layer.weight": start["layer.weight"] + d} for d in deltas]
    exact = _fedavg64(start, locals_, [10, 20, 30])
    assert float((global_["layer.weight"].double() - exact["layer.weight"]).abs().max()) < 1e-6
    assert torch.equal(global_["norm.weight"], start["norm.weight"])
    assert strategy.history[-1]["clients"] == [1, 2, 3]


def test_quantized_fedavg_leaves_out_bad_replies_and_never_half_adds_them():
    global_ = model()
    start = {k: v.clone() for k, v in global_.items()}
    strategy, messages = _raw_round(global_, 2)
    delta = 0.01 * torch.randn(300, 257)
    good = _client(messages[0], delta, 1)
    poisoned = _client(messages[1], delta, 2)
    poisoned.content["arrays"]["head.weight"] = Array(
        "bfloat16", (64, 128), "llmwire/1/raw", b"garbage")  # fails after layer.weight folded
    stale = _client(messages[1], delta, 3)
    stale.content[lf.META]["digest"] = "0" * 32
    unweighted = _client(messages[1], delta, 4)
    unweighted.content["metrics"] = MetricRecord({"loss": 1.0})
    strategy.aggregate_train(1, [reply(1, good.content), reply(2, poisoned.content),
                                 reply(3, stale.content), reply(4, unweighted.content)])
    assert torch.allclose(global_["layer.weight"], start["layer.weight"] + delta, atol=1e-7)
    record = strategy.history[-1]
    assert record["clients"] == [1] and [node for node, _ in record["rejected"]] == [2, 3, 4]


def test_the_mod_lets_an_unchanged_app_send_updates():
    global_ = model()
    start = {k: v.clone() for k, v in global_.items()}
    strategy = lf.QuantizedFedAvg(global_, down="bf16", up="nf4", min_elements=1,
                                  min_train_nodes=1, min_available_nodes=1)
    [msg] = strategy.configure_train(1, strategy.global_arrays(), ConfigRecord(), Grid(1))
    msg.metadata.message_type = MessageType.TRAIN
    seen = {}

    def stock_app(message, context):  # what a Flower app does today
        arrays = message.content["arrays"]
        seen["stypes"] = {a.stype for a in arrays.values()}
        state = arrays.to_torch_state_dict()
        state["layer.weight"] += 0.05
        return Message(RecordDict({"arrays": ArrayRecord(state),
                                   "metrics": MetricRecord({"num-examples": 5})}),
                       reply_to=message)

    out = lf.llmwire_mod(msg, None, stock_app)
    assert seen["stypes"] == {"numpy.ndarray"}
    assert lf.is_encoded(out.content["arrays"])
    assert out.content[lf.META]["kind"] == "update"
    assert lf.wire_bytes(out.content["arrays"]) < 0.2 * 4 * 300 * 257
    strategy.aggregate_train(1, [reply(1, out.content)])
    moved = global_["layer.weight"] - start["layer.weight"]
    assert float((moved - 0.05).abs().max()) < 0.01  # nf4 of a constant 0.05 step, bf16 base
    untouched = Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=2,
                        message_type=MessageType.TRAIN)
    assert lf.llmwire_mod(untouched, None, lambda m, c: "passed") == "passed"


# -- out of band, over real sockets ------------------------------------------

@contextlib.contextmanager
def serving(global_, n, **kwargs):
    """An OutOfBandFedAvg for ``n`` nodes with its llmwire server running."""
    strategy = lf.OutOfBandFedAvg(global_, min_train_nodes=n, min_available_nodes=n,
                                  fraction_evaluate=0.0, **kwargs)
    strategy.open()
    try:
        yield strategy
    finally:
        strategy.close()


def _oob_round(strategy, server_round, n, deltas, cache, fail=None):
    messages = list(strategy.configure_train(server_round, None, ConfigRecord(), Grid(n)))
    seen, errors = {}, {}

    def work(message):
        node = message.metadata.dst_node_id
        if node == fail:
            return  # never connects
        state = {k: torch.zeros_like(v) for k, v in model().items()}
        try:
            with lf.OutOfBandClient(message, Context(node), state, cache_dir=cache) as link:
                link.pull()
                seen[node] = link.pulled
                state["layer.weight"] += deltas[node]
                link.push(10 * node)
        except Exception as exc:  # reported below
            errors[node] = exc

    threads = [threading.Thread(target=work, args=(m,)) for m in messages]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    replies = [reply(m.metadata.dst_node_id, RecordDict({"metrics": MetricRecord(
        {"num-examples": 10 * m.metadata.dst_node_id})})) for m in messages
        if m.metadata.dst_node_id != fail]
    strategy.aggregate_train(server_round, replies)
    return seen, errors


def test_out_of_band_rounds_pull_deltas_and_match_fp64_fedavg(tmp_path):
    global_ = model()
    exact = {k: v.double() for k, v in global_.items()}
    with serving(global_, 2, down="raw", up="raw", gather_timeout=20) as strategy:
        for r in (1, 2, 3):
            deltas = {n: 0.001 * n * r * torch.ones(300, 257) for n in (1, 2)}
            seen, errors = _oob_round(strategy, r, 2, deltas, tmp_path)
            assert not errors
            assert set(seen.values()) == ({"whole"} if r == 1 else {"update"})
            exact["layer.weight"] += (10 * deltas[1] + 20 * deltas[2]).double() / 30
            assert strategy.history[-1]["clients"]
    assert float((global_["layer.weight"].double() - exact["layer.weight"]).abs().max()) < 1e-6
    assert torch.equal(global_["norm.weight"], model()["norm.weight"])


def test_out_of_band_a_client_that_never_comes_is_left_out(tmp_path):
    global_ = model()
    start = {k: v.clone() for k, v in global_.items()}
    deltas = {n: 0.01 * n * torch.ones(300, 257) for n in (1, 2, 3)}
    with serving(global_, 3, down="nf4", up="raw", gather_timeout=2) as strategy:
        seen, errors = _oob_round(strategy, 1, 3, deltas, tmp_path, fail=3)
    assert not errors and len(seen) == 2
    record = strategy.history[-1]
    assert sorted(record["clients"]) == ["1", "2"] and (3, "never connected") in record["failed"]
    mean = (10 * deltas[1] + 20 * deltas[2]) / 30
    assert torch.allclose(global_["layer.weight"], start["layer.weight"] + mean, atol=2e-3)


def test_out_of_band_refuses_a_node_the_round_does_not_expect(tmp_path):
    global_ = model()
    with serving(global_, 1, gather_timeout=1) as strategy:
        [msg] = strategy.configure_train(1, None, ConfigRecord(), Grid(1))
        state = {k: torch.zeros_like(v) for k, v in model().items()}
        with pytest.raises(lf.FlowerLinkError, match="is for node"):
            lf.OutOfBandClient(msg, Context(99), state, cache_dir=tmp_path)
        stray = Message(RecordDict(dict(msg.content.items())), dst_node_id=99,
                        message_type=MessageType.TRAIN)
        stray.content[lf.META] = ConfigRecord({**dict(msg.content[lf.META]), "node": 99})
        with lf.OutOfBandClient(stray, Context(99), state, cache_dir=tmp_path) as link:
            with pytest.raises(lf.FlowerLinkError, match="not expected"):
                link.pull()


def test_out_of_band_client_needs_a_link_message():
    msg = Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=2,
                  message_type=MessageType.TRAIN)
    with pytest.raises(lf.FlowerLinkError, match="no llmwire link"):
        lf.OutOfBandClient(msg, Context(2), {})


def test_weights_must_be_sane():
    folder = Folder(model())
    record = lf.encode_state(model(), "raw")
    with pytest.raises(PayloadError, match="weight"):
        folder.add(record, float("nan"))


def test_the_client_cache_round_trips_and_forgets_other_runs(tmp_path):
    from llmwire.integrations.cache import GlobalCache
    from llmwire.rounds import Reference

    state = model()
    cache = GlobalCache(tmp_path, "runa", 1)
    assert cache.reference() is None and cache.load_into(state) is None
    ref = Reference.of(state, 3)
    cache.store(state, ref)
    assert not list(tmp_path.glob("*.part"))
    out = {k: torch.zeros_like(v) for k, v in state.items()}
    assert cache.load_into(out) == ref == cache.reference()
    assert all(torch.equal(out[k], state[k]) for k in state)
    other = GlobalCache(tmp_path, "runb", 1)
    assert other.path != cache.path and other.load_into(out) is None  # another run's
    wrong = {**out, "extra": torch.zeros(3)}
    assert cache.load_into(wrong) is None  # does not fit: untouched
    old = GlobalCache(tmp_path, "runold", 2)
    old.store(state, ref)
    keep = GlobalCache(tmp_path, "runa", 3)
    keep.store(state, ref)
    for path in (old.path, keep.path):
        os.utime(path, (1, 1))
    assert cache.prune() == 1
    assert not old.path.exists() and keep.path.exists() and cache.path.exists()


def test_a_damaged_cache_is_never_taken_for_the_global(tmp_path):
    from llmwire.integrations.cache import GlobalCache
    from llmwire.rounds import Reference

    state = model()
    cache = GlobalCache(tmp_path, "runa", 1)
    cache.store(state, Reference.of(state, 1))
    with open(cache.path, "r+b") as f:  # 16 bytes of the data zeroed on disk
        f.seek(-4096, 2)
        f.write(bytes(16))
    assert cache.load_into({k: torch.zeros_like(v) for k, v in state.items()}) is None
    assert not cache.path.exists()


def test_a_reply_failing_in_its_second_slice_leaves_nothing_in_the_sums():
    big = {"a": torch.zeros((1 << 20) + 1000), "b": torch.zeros(10)}
    base = lf.encode_state(big, "raw")
    good = {"a": torch.full_like(big["a"], 0.001), "b": torch.full_like(big["b"], 0.001)}
    bad = {k: v.clone() for k, v in good.items()}
    bad["a"][-5] = 1e31  # beyond the limit, in the second slice of "a"
    huge = {k: v.clone() for k, v in good.items()}
    huge["a"] += 1e29  # finite, but it would swamp the others' float32 sums
    huge["b"][0] = float("nan")
    folder = Folder(big)
    folder.add(lf.encode_update(good, base, "raw"), 1.0)
    for poisoned in (bad, huge):
        with pytest.raises(PayloadError):
            folder.add(lf.encode_update(poisoned, base, "raw"), 1.0)
    out = {k: v.clone() for k, v in big.items()}
    folder.apply_mean(out)
    assert torch.allclose(out["a"], good["a"]) and torch.allclose(out["b"], good["b"])


def test_tied_tensors_are_refused_before_any_round():
    shared = torch.randn(64, 32)
    tied = {"embed.weight": shared, "lm_head.weight": shared, "norm": torch.ones(32)}
    with pytest.raises(llmwire.TargetMismatch, match="share one tensor"):
        lf.QuantizedFedAvg(tied)
    with pytest.raises(llmwire.TargetMismatch, match="share one tensor"):
        lf.OutOfBandFedAvg(tied)


def test_out_of_band_a_client_cannot_speak_for_another_node(tmp_path):
    global_ = model()
    with serving(global_, 2, gather_timeout=1) as strategy:
        messages = {m.metadata.dst_node_id: m for m in
                    strategy.configure_train(1, None, ConfigRecord(), Grid(2))}
        first = messages[1]
        assert first.content is not messages[2].content  # each node's message is its own
        forged = Message(RecordDict(dict(first.content.items())), dst_node_id=2,
                         message_type=MessageType.TRAIN)  # node 1's token, as node 2
        forged.content[lf.META] = ConfigRecord({**dict(first.content[lf.META]), "node": 2})
        state = {k: torch.zeros_like(v) for k, v in model().items()}
        with lf.OutOfBandClient(forged, Context(2), state, cache_dir=tmp_path) as link:
            with pytest.raises(lf.FlowerLinkError, match="token"):
                link.pull()
