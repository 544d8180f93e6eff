"""Does federated learning still learn with quantized messages? The learning
bench (``llmwire bench learn``) and the FedAvg example, end to end: server
and client processes over loopback, the tiny character model on the shipped
Shakespeare excerpt. SmolLM2 runs only where the ``[learn]`` extra is."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch", reason="the learning bench trains torch models")

from llmwire.cli import main  # noqa: E402
from llmwire.cli.bench import learn  # noqa: E402
from llmwire.cli.learning import data, models  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "docs" / "examples"
PURE = os.environ.get("LLMWIRE_PURE_PYTHON", "") not in ("", "0")


# ------------------------------------------------------------------ data


def test_excerpt_has_two_works_per_genre():
    works = data.load_excerpt()
    assert set(works) == set(data.GENRES)
    for genre, texts in works.items():
        assert len(texts) == 2 and set(texts) <= set(data.GENRES[genre])
        assert all(len(t) > 10_000 for t in texts.values())


def test_split_keeps_every_character_and_holds_out_line_ends():
    works = data.load_excerpt()
    for clients in (1, 2, 3, 4, 5, 8):
        corpus = data.split(works, clients, holdout=0.1)
        assert len(corpus.train) == clients
        whole = sum(len(t) for g in works.values() for t in g.values())
        assert sum(map(len, corpus.train.values())) + len(corpus.heldout) == whole
    corpus = data.split(works, 4)
    assert list(corpus.train) == list(data.GENRES)  # one genre each: non-IID
    for genre, texts in works.items():
        for text in texts.values():
            cut = text.rfind("\n", 0, int(len(text) * 0.9)) + 1
            assert text[cut:] in corpus.heldout and text[:cut] in corpus.train[genre]


def test_split_refuses_no_clients():
    with pytest.raises(ValueError):
        data.split(data.load_excerpt(), 0)


def test_shakespeare_dir_refuses_a_directory_without_the_texts(tmp_path):
    with pytest.raises(FileNotFoundError, match="hamlet_gut.txt"):
        data.shakespeare_dir(tmp_path)


def test_every_arm_draws_the_same_batches():
    task = models.tiny(data.split(data.load_excerpt(), 4))
    one = task.batch_of(task.train["comedies"], 7)
    assert torch.equal(one, task.batch_of(task.train["comedies"], 7))
    assert one.shape == (task.batch, task.context + 1)
    assert not torch.equal(one, task.batch_of(task.train["comedies"], 8))


def test_prepare_and_load_give_the_same_task(tmp_path):
    corpus = data.split(data.load_excerpt(), 4)
    models.prepare("tiny", corpus, tmp_path, seed=3)
    loaded, built = models.load(tmp_path), models.tiny(corpus, seed=3)
    a, b = loaded.model.state_dict(), built.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(loaded.heldout, built.heldout)
    assert loaded.evaluate() == built.evaluate()
    with pytest.raises(ValueError, match="unknown model"):
        models.prepare("gpt5", corpus, tmp_path)


# ------------------------------------------------------------------ arms


def test_parse_arms():
    arms = learn.parse_arms("fp32, W:nf4,D:bf16,EF:fp4,D:blockwise8")
    assert [(a.label, a.kind, a.fmt) for a in arms] == [
        ("fp32", "D", "raw"), ("W:nf4", "W", "nf4"), ("D:bf16", "D", "bf16"),
        ("EF:fp4", "EF", "fp4"), ("D:blockwise8", "D", "blockwise8")]
    assert learn.parse_arms("D:raw")[0].label == "fp32"
    for bad in ("", "nf4", "X:nf4", "D:int3", "D:nf4,D:nf4", "fp32,raw"):
        with pytest.raises(ValueError):
            learn.parse_arms(bad)


@pytest.mark.parametrize("argv", [
    ["--arms", "Q:nf4"], ["--clients", "0"], ["--rounds", "0"], ["--local-steps", "-1"],
    ["--data", "/nonexistent/texts"],
])
def test_bad_options_are_one_line_and_a_usage_or_error_status(argv, capsys):
    code = main(["bench", "learn", *argv])
    err = capsys.readouterr().err
    assert code in (1, 2) and err.startswith("llmwire bench learn: ") and err.count("\n") == 1


# ------------------------------------------------------------------ the tiny model, end to end


@pytest.fixture(scope="module")
def tiny_run():
    """fp32, D:nf4 and W:nf4 over loopback: 4 clients, 10 rounds of 5 steps."""
    return learn.measure("tiny", learn.parse_arms("fp32,D:nf4,W:nf4"), clients=4, rounds_=10,
                         steps=5)


def test_nf4_updates_match_fp32_and_nf4_weights_do_not(tiny_run):
    arms = {a["arm"]: a for a in tiny_run["arms"]}
    fp32, delta, weights = arms["fp32"], arms["D:nf4"], arms["W:nf4"]
    assert fp32["final_eval"] < tiny_run["initial_eval"] - 1.0  # it learned
    assert abs(delta["gap_pct"]) <= 0.5, delta["gap_pct"]
    assert weights["gap_pct"] > 0.5, weights["gap_pct"]


def test_nf4_traffic_is_at_most_15_percent_of_fp32(tiny_run):
    arms = {a["arm"]: a for a in tiny_run["arms"]}
    fp32_bytes = 4 * models.parameters(models.tiny(data.split(data.load_excerpt(), 4)).model)
    for row in tiny_run["arms"]:
        assert len(row["evals"]) == 11 and len(row["per_round"]) == 10
        # every round: 4 uploads, and the new global to 4 clients
        for r in row["per_round"]:
            assert r["wire_bytes"] == r["up_bytes"] + r["down_bytes"]
            if row["arm"] == "fp32":
                assert r["up_bytes"] > 4 * fp32_bytes and r["down_bytes"] > 4 * fp32_bytes
    for name in ("D:nf4", "W:nf4"):
        assert arms[name]["wire_ratio_to_fp32"] <= 0.15
    assert arms["fp32"]["initial_bytes"] == arms["D:nf4"]["initial_bytes"]  # raw, lossless
    assert arms["W:nf4"]["initial_bytes"] < 0.15 * arms["fp32"]["initial_bytes"]
    assert all(a["server_peak_mib"] > 0 and a["client_peak_mib"] > 0 for a in arms.values())


def test_the_bench_plots_both_figures(tiny_run, tmp_path):
    pytest.importorskip("matplotlib", reason="plots need matplotlib")
    written = learn.plot(tiny_run, str(tmp_path / "learn.png"))
    assert written == [str(tmp_path / "learn.png"), str(tmp_path / "learn-bytes.png")]
    for path in written:
        assert pathlib.Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ the FedAvg example


def _start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LLMWIRE_SECRET": "example-test"}
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _stop(processes: list[subprocess.Popen]) -> None:
    for p in processes:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
        p.wait(10)


def test_fedavg_example_runs_and_learns():
    rounds_ = 3
    server = _start([str(EXAMPLES / "fedavg_server.py"), "--port", "0", "--clients", "4",
                     "--rounds", str(rounds_)])
    processes = [server]
    try:
        first = server.stdout.readline()
        match = re.match(r"listening on port (\d+)", first)
        assert match, first
        processes += [_start([str(EXAMPLES / "fedavg_client.py"), "--index", str(i),
                              "--port", match.group(1), "--rounds", str(rounds_)])
                      for i in range(4)]
        deadline = time.monotonic() + 120
        for p in processes:
            p.wait(max(1, deadline - time.monotonic()))
        out = server.stdout.read()
        clients = [p.stdout.read() for p in processes[1:]]
    finally:
        _stop(processes)
    assert [p.returncode for p in processes] == [0] * 5, (first + out, clients)
    losses = [float(x) for x in re.findall(r"held-out loss ([\d.]+)", out)]
    assert len(losses) == rounds_ + 1 and losses[-1] < losses[0] - 1.0, out
    fp32 = 4 * models.parameters(models.tiny(data.split(data.load_excerpt(), 4)).model)
    for line in re.findall(r"(\d+) bytes up, (\d+) down", out):
        assert all(int(x) <= 0.15 * 4 * fp32 for x in line)  # nf4: 4 clients each way
    for text in clients:
        assert len(text.splitlines()) == rounds_ and f"now at round {rounds_} (" in text


def test_learning_docs_quote_the_example_as_it_is():
    """Every line of the docs' walkthrough snippets is a line of the example."""
    doc = (ROOT / "docs" / "learning.md").read_text()
    sources = {name: (EXAMPLES / name).read_text().splitlines()
               for name in ("fedavg_server.py", "fedavg_client.py")}
    blocks = re.findall(r"```python\n# (fedavg_\w+\.py)\n(.*?)```", doc, re.S)
    assert len(blocks) >= 2
    for name, body in blocks:
        lines = {line.strip() for line in sources[name]}
        for line in body.splitlines():
            if line.strip() and line.strip() != "...":
                assert line.strip() in lines, (name, line)


# ------------------------------------------------------------------ SmolLM2, with [learn]


def _smollm2_missing() -> str | None:
    for module in ("transformers", "gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            return f"the [learn] extra is not installed ({module} missing)"
    try:
        models.smollm2_file()
    except FileNotFoundError as exc:
        return str(exc)
    return None


@pytest.mark.skipif(PURE, reason="run once, in the pass with the C kernels")
@pytest.mark.skipif(_smollm2_missing() is not None, reason=_smollm2_missing() or "")
def test_smollm2_loads_and_runs_one_round():
    r = learn.measure("smollm2", learn.parse_arms("D:nf4"), clients=2, rounds_=1, steps=1,
                      data="excerpt", max_tokens=20_000)
    assert 130e6 < r["params"] < 140e6  # SmolLM2-135M, the tied embedding once
    (arm,) = r["arms"]
    assert len(arm["evals"]) == 2 and all(3.0 < x < 6.0 for x in arm["evals"])
    # nf4 updates of a 135M-parameter model: ~14 % of its 538 MB, per client and direction
    assert arm["wire_bytes"] < 0.15 * 4 * 4 * r["params"]
