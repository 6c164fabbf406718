"""Loading a published scorer's weights: a hub id or a local safetensors directory, never pickles.

Every standard judge is a causal LM read at one answer position. Its weights come from the hub (needs
network, or a copy in the Hugging Face cache) or from ``model=<dir>``, a directory holding
``*.safetensors`` (a LoRA adapter directory too, on ``base_model``). Unpickling a ``.bin`` checkpoint
runs code, so such a directory is refused, and ``trust_remote_code`` is off unless set.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from evaluators.judges.weights import local_dir, weights_sha256
from harness.api import HarnessError, Params, resolve_device, resolve_dtype


class ScorerParams(Params):
    """Params every published-scorer judge shares; each judge sets its own default ``model``."""

    model: str = Field(..., description="hub id or local directory with *.safetensors weights")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit); None: the default branch")
    dtype: str = Field("auto", description="weights' dtype: auto (bfloat16 on a GPU, float32 on a CPU), float32, "
                                           "bfloat16, float16")
    batch_size: int = Field(8, ge=1, description="examples per forward pass")
    trust_remote_code: bool = Field(False, description="run model code from the hub (only for models you trust)")


@dataclass
class Scorer:
    """A loaded scorer model and where its weights came from."""

    model: torch.nn.Module
    tokenizer: Any
    directory: Path | None  # None: a hub id
    device: torch.device


def identity(judge: str, params: ScorerParams) -> dict[str, Any]:
    """What identifies the scoring weights without loading them (part of the harmfulness stage key)."""
    directory = local_dir(judge, params.model)
    if directory is not None:
        return {"weights_sha256": weights_sha256(directory)}
    return {"hub": params.model, "revision": params.revision}


def load_error(judge: str, ref: str, exc: Exception) -> HarnessError:
    from huggingface_hub import constants

    why = "offline mode is on (HF_HUB_OFFLINE)" if constants.HF_HUB_OFFLINE else f"{type(exc).__name__}: {exc}"
    return HarnessError(
        f"{judge} could not load model {ref!r} ({why}). A hub id needs network access (or a copy in the Hugging "
        f"Face cache). Without network: on a machine with network run `huggingface-cli download {ref} "
        f"--local-dir <dir>` (gated models need their licence accepted and a token), copy <dir> here and pass "
        f"model=<dir>, e.g. --set 'evaluate.harmfulness.judges=[{{name: {judge}, params: {{model: /path/to/dir}}}}]'.")


def load_scorer(judge: str, params: ScorerParams, device: str, base_model: str | None = None) -> Scorer:
    """Tokenizer and causal LM (safetensors only), in eval mode on ``device``. A local LoRA adapter
    directory is applied to ``base_model`` (a local directory or hub id)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = local_dir(judge, params.model)
    torch_device = resolve_device(device)
    dtype = resolve_dtype(params.dtype, torch_device)
    common: dict[str, Any] = {"revision": params.revision, "trust_remote_code": params.trust_remote_code}
    try:
        if directory is not None and (directory / "adapter_config.json").exists():
            model, tokenizer = _load_adapter(judge, directory, base_model, dtype, params.trust_remote_code)
        else:
            source: str | Path = directory if directory is not None else params.model
            tokenizer = AutoTokenizer.from_pretrained(source, **common)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, use_safetensors=True, **common)
    except (OSError, ValueError) as exc:
        if directory is not None:
            raise HarnessError(f"{judge} could not load {directory}: {type(exc).__name__}: {exc}") from None
        raise load_error(judge, params.model, exc) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return Scorer(model.to(torch_device).eval(), tokenizer, directory, torch_device)


def _load_adapter(judge: str, directory: Path, base_model: str | None, dtype: torch.dtype,
                  trust_remote_code: bool) -> tuple[torch.nn.Module, Any]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = base_model or json.loads((directory / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise HarnessError(f"{judge}: {directory} is a LoRA adapter without a base model; set base_model=<dir>.")
    base_dir = local_dir(judge, base)
    base_source: str | Path = base_dir if base_dir is not None else base
    try:
        model = AutoModelForCausalLM.from_pretrained(base_source, dtype=dtype, use_safetensors=True,
                                                     trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        if base_dir is not None:
            raise
        raise load_error(judge, base, exc) from None
    has_tokenizer = (directory / "tokenizer_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(directory if has_tokenizer else base_source,
                                              trust_remote_code=trust_remote_code)
    return PeftModel.from_pretrained(model, directory, is_trainable=False).merge_and_unload(), tokenizer


def source_info(scorer: Scorer, params: ScorerParams) -> dict[str, Any]:
    """Where the weights came from, for describe(): path and sha256, or hub id and resolved commit."""
    info: dict[str, Any] = {"model": params.model, "revision": params.revision,
                            "architecture": type(scorer.model).__name__}
    if scorer.directory is not None:
        info.update(source="local", path=str(scorer.directory), weights_sha256=weights_sha256(scorer.directory))
    else:
        info.update(source="hub", commit=getattr(scorer.model.config, "_commit_hash", None))
    return info
