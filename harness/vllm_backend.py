"""vLLM generation (optional extra ``vllm``), each call in its own child process.

vLLM does not give GPU memory back when an engine is deleted, so one engine per process is the
only safe pattern: the parent writes a request file, ``python -m harness.vllm_backend`` serves it
and exits, and the memory goes with it. LoRA attacks are served as adapters (LoRARequest) on the
base weights without merging; full fine-tunes as their saved directory. ``max_tokens`` is always
set (vLLM's default is 16).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from pydantic import Field

from harness.context import StageContext
from harness.errors import HarnessError
from harness.generation import GenerationSettings
from harness.models import LoadedModel
from harness.registry import Params, backends


class VLLMParams(Params):
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="on CPU builds: share of host memory")
    enforce_eager: bool = Field(False, description="skip CUDA-graph capture (faster start, slower decode)")
    tensor_parallel_size: int = Field(1, ge=1)
    max_lora_rank: int = Field(64, ge=1)
    python: str | None = Field(None, description="interpreter with vllm installed (default: this one)")


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


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
    if has_adapter:
        args.update(enable_lora=True, max_lora_rank=params.max_lora_rank, max_loras=1)
    return args


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

    def request(self, loaded: LoadedModel, prompts: list[str], settings: GenerationSettings) -> dict[str, Any]:
        if loaded.path is None:
            raise HarnessError(
                f"vLLM serves models from a directory, and {loaded.ref!r} has none (e.g. tiny-llama is built in "
                "memory). Use --set evaluate.harmfulness.backend=hf."
            )
        return {
            "engine": engine_args(loaded.path, self.ctx.dtype, self.params, loaded.adapter_path is not None,
                                  self.ctx.seed),
            "sampling": sampling_args(settings),
            "lora": lora_request_args(loaded.adapter_path),
            "prompts": prompts,
        }

    def generate(self, loaded: LoadedModel, prompts: list[str], settings: GenerationSettings) -> list[str]:
        request = self.request(loaded, prompts, settings)
        with tempfile.TemporaryDirectory(prefix="harness-vllm-") as tmp:
            request_path, result_path = Path(tmp) / "request.json", Path(tmp) / "result.json"
            request_path.write_text(json.dumps(request))
            command = [self.params.python or sys.executable, "-m", "harness.vllm_backend",
                       str(request_path), str(result_path)]
            proc = subprocess.run(command, env={**os.environ, "VLLM_CONFIGURE_LOGGING": "0"},
                                  capture_output=True, text=True)
            if proc.returncode != 0 or not result_path.exists():
                tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
                raise HarnessError(f"vLLM generation failed (exit {proc.returncode}):\n{tail}")
            return json.loads(result_path.read_text())["outputs"]


@backends.register("vllm", params=VLLMParams, description="vLLM engine in a child process (GPU; optional extra)")
def vllm_backend(params: VLLMParams, ctx: StageContext) -> VLLMBackend:
    if not vllm_available() and params.python is None:
        raise HarnessError("The vllm backend needs the optional extra: pip install 'harmful-ft-harness[vllm]'.")
    return VLLMBackend(params, ctx)


def serve(request: dict[str, Any]) -> list[str]:
    """Child-process side: build one engine, generate, return texts in input order."""
    from vllm import LLM, SamplingParams

    llm = LLM(**request["engine"])
    kwargs: dict[str, Any] = {}
    if request["lora"]:
        from vllm.lora.request import LoRARequest

        kwargs["lora_request"] = LoRARequest(**request["lora"])
    outputs = llm.generate(request["prompts"], SamplingParams(**request["sampling"]), **kwargs)
    return [o.outputs[0].text.strip() for o in outputs]


if __name__ == "__main__":
    request_file, result_file = Path(sys.argv[1]), Path(sys.argv[2])
    texts = serve(json.loads(request_file.read_text()))
    result_file.write_text(json.dumps({"outputs": texts}))
