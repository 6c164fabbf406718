"""Generation backends: batched Hugging Face generation (always available), vLLM (optional extra).

A backend plugin is a factory ``fn(params, ctx) -> Backend`` whose ``generate`` turns formatted
prompts into completions, in the input order.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Protocol

import torch
from pydantic import Field

from harness.context import StageContext
from harness.models.loading import LoadedModel
from harness.registry import Params, backends


class GenerationSettings(Params):
    """Decoding settings, recorded with every harmfulness result."""

    max_new_tokens: int = Field(50, ge=1, description="new tokens per completion (paper: 50)")
    batch_size: int = Field(16, ge=1, description="prompts per generate() call")
    do_sample: bool = Field(False, description="greedy (False, the paper's setting) or sampling")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = Field(0, description="sampling seed (ignored when greedy)")


class Backend(Protocol):
    name: str

    def generate(self, loaded: LoadedModel, prompts: list[str], settings: GenerationSettings) -> list[str]: ...


class HFBackend:
    """Batched ``model.generate``: prompts sorted by length so batches pad little, left padding."""

    name = "hf"

    def __init__(self, ctx: StageContext | None = None) -> None:
        self.ctx = ctx

    @torch.no_grad()
    def generate(self, loaded: LoadedModel, prompts: list[str], settings: GenerationSettings) -> list[str]:
        tokenizer, model = loaded.tokenizer, loaded.model
        encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
        outputs: list[str] = [""] * len(prompts)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        was_training = model.training
        model.eval()
        device = loaded.device
        for start in range(0, len(order), settings.batch_size):
            chunk = order[start : start + settings.batch_size]
            length = max(len(encoded[i]) for i in chunk)
            input_ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
            attention = torch.zeros((len(chunk), length), dtype=torch.long)
            for row, i in enumerate(chunk):  # left padding: every prompt ends where generation starts
                ids = encoded[i]
                input_ids[row, length - len(ids) :] = torch.tensor(ids)
                attention[row, length - len(ids) :] = 1
            kwargs: dict[str, Any] = dict(
                max_new_tokens=settings.max_new_tokens,
                do_sample=settings.do_sample,
                pad_token_id=pad_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            if settings.do_sample:
                torch.manual_seed(settings.seed + start)
                kwargs.update(temperature=settings.temperature, top_p=settings.top_p)
            else:
                kwargs.update(temperature=None, top_p=None, top_k=None)
            generated = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention.to(device), **kwargs
            )
            for row, i in enumerate(chunk):
                outputs[i] = tokenizer.decode(generated[row, length:], skip_special_tokens=True).strip()
        model.train(was_training)
        return outputs


@backends.register("hf", description="Batched Hugging Face generate() (left padding, length-sorted)")
def hf_backend(params: Params, ctx: StageContext) -> HFBackend:
    return HFBackend(ctx)


def choose_backend(cuda_available: bool, vllm_installed: bool) -> str:
    """``auto``: vLLM when it is installed and a GPU is visible, else batched HF."""
    return "vllm" if cuda_available and vllm_installed else "hf"


def vllm_available() -> bool:
    """Whether this interpreter can import vLLM (the optional extra)."""
    return importlib.util.find_spec("vllm") is not None


def resolve_backend(name: str) -> str:
    """The backend a name stands for on this machine (``auto`` is resolved, others are themselves)."""
    if name != "auto":
        return name
    return choose_backend(torch.cuda.is_available(), vllm_available())


@backends.register("auto", description="vLLM when installed and a GPU is visible, else hf")
def auto_backend(params: Params, ctx: StageContext) -> Backend:
    if resolve_backend("auto") == "vllm":
        vllm = backends.get("vllm")
        return vllm.fn(vllm.parse_params({}, "backend_params"), ctx)
    return HFBackend(ctx)
