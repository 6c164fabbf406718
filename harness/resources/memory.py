"""How much memory one device needs to train a stage, estimated from the model's shape before any weight loads.

A stage that cannot fit should fail in a second with the numbers and the options that would fit, not after an
hour of loading and a CUDA OOM. The estimate adds, per device:

- weights: every parameter in the weight dtype (a ``shards``-way FSDP run keeps 1/shards of them, plus the
  gathered parameters of two decoder layers: the one running and the one prefetched);
- gradients: trainable parameters in the weight dtype (sharded the same way);
- optimizer state: AdamW/Adam two states, SGD none (SGD with momentum one), in ``state_bytes``; a float32
  master copy of bf16 weights when ``master_weights``;
- the optimizer step's temporary (Adam: one state-sized tensor), counted only where it exceeds the activations,
  which backward has freed by then;
- activations kept for backward for one micro-batch (``batch_size / shards`` sequences of ``seq_len``):
  per token and decoder layer 8·hidden + 2·kv_dim + 4·intermediate values (RMSNorm input and output twice,
  q and o inputs, k and v, the attention output; the MLP's gate, SiLU, up and product), or only the layer
  input under gradient checkpointing plus one layer recomputed; and the LM-head logits with the loss's float32
  copies and their gradients (5·vocab values per token), which dominate small models with big vocabularies;
- RepNoise (``stage="repnoise"``): the decoder runs over harmful and harmless sides stacked (2× the sequences),
  no full logits exist (the head pass is chunked), but each layer's noise MMD keeps float32 noise, masked
  activations and the stacked points (16 bytes per harmful token and hidden unit, one layer under
  checkpointing), and the layer-wise ascent gathers L + 2 hidden states per harmful token, normed, with
  their gradients.

The coefficients are counted from the Llama code path and checked against measured peaks on CPU
(tests/test_memory_estimate.py states the factor). It is an estimate: the refusal leaves a margin.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from harness.errors import HarnessError

GIB = 2**30
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
OPTIMIZER_STATES = {"adam": 2, "adamw": 2, "sgd": 0, "sgd-momentum": 1}  # others: counted as 2 (Adam-like)
HEADROOM = 1.10  # refuse unless the estimate plus 10% fits: allocator fragmentation, CUDA context, buffers
DEFAULT_CHUNK_ELEMENTS = 2**24  # harness.train.losses: the chunked LM-head pass holds this many logits at a time

# Activation values kept per token of one decoder layer: c_hidden·hidden + c_kv·kv_dim + c_inter·intermediate.
C_HIDDEN, C_KV, C_INTER = 8, 2, 4
C_VOCAB = 3  # logits, the loss's flattened float32 copy, its log-softmax (gradients reuse freed copies)


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama-style decoder that set its memory."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = True
    head_dim: int | None = None

    @property
    def q_dim(self) -> int:
        return self.heads * (self.head_dim or self.hidden // self.heads)

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.head_dim or self.hidden // self.heads)

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear module in one decoder layer."""
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def layer_params(self) -> int:
        return sum(a * b for a, b in self.linears().values()) + 2 * self.hidden  # + two RMSNorm weights

    @property
    def params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * self.layer_params + embeddings + self.hidden

    def lora_params(self, rank: int, targets: tuple[str, ...]) -> int:
        return self.layers * sum(rank * (a + b) for name, (a, b) in self.linears().items() if name in targets)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        """From a transformers config.json (Llama, Mistral, Qwen2 and friends share these names)."""
        try:
            return cls(
                layers=int(config["num_hidden_layers"]), hidden=int(config["hidden_size"]),
                intermediate=int(config["intermediate_size"]), heads=int(config["num_attention_heads"]),
                kv_heads=int(config.get("num_key_value_heads") or config["num_attention_heads"]),
                vocab=int(config["vocab_size"]), tied=bool(config.get("tie_word_embeddings", False)),
                head_dim=config.get("head_dim"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise HarnessError(f"The model config has no usable {exc} field: the memory estimate needs a "
                               "Llama-style config.json (num_hidden_layers, hidden_size, ...).") from None


# Named shapes, for estimates without the weights at hand (``harness memory --model llama-2-7b``).
SHAPES = {
    "llama-2-7b": ModelShape(32, 4096, 11008, 32, 32, 32000, tied=False),
    "llama-2-13b": ModelShape(40, 5120, 13824, 40, 40, 32000, tied=False),
    "llama-3-8b": ModelShape(32, 4096, 14336, 32, 8, 128256, tied=False),
    "llama-3-70b": ModelShape(80, 8192, 28672, 64, 8, 128256, tied=False),
    "smollm2-135m": ModelShape(30, 576, 1536, 9, 3, 49152, tied=True),
}
SMOLLM2_VOCAB = 49152  # the tiny test model uses SmolLM2's tokenizer


@dataclass(frozen=True)
class TrainingPlan:
    """How a stage trains: every option that changes its memory."""

    batch_size: int
    seq_len: int
    weight_bytes: int = 4  # 4 float32, 2 bf16/fp16
    optimizer: str = "adamw"
    state_bytes: int | None = None  # optimizer state dtype; None: the weights' (what torch does by default)
    master_weights: bool = False  # a float32 copy of bf16 weights that the optimizer updates
    checkpointing: bool = False
    lora_rank: int | None = None
    lora_targets: tuple[str, ...] = ALL_LINEAR
    shards: int = 1  # FSDP world size: parameters, gradients and states split; the batch split too
    stage: Literal["sft", "repnoise"] = "sft"

    def __post_init__(self) -> None:
        if min(self.batch_size, self.seq_len, self.shards, self.weight_bytes) < 1:
            raise HarnessError("batch_size, seq_len, shards and weight_bytes must be positive.")

    def but(self, **changes: Any) -> TrainingPlan:
        return dataclasses.replace(self, **changes)


@dataclass
class MemoryEstimate:
    """Bytes per device, by part."""

    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        return ", ".join(f"{name} {gib(value)}" for name, value in self.parts.items() if value)


def gib(value: float) -> str:
    return f"{value / GIB:.3g} GiB" if value >= GIB / 100 else f"{value / 2**20:.3g} MiB"


def estimate(shape: ModelShape, plan: TrainingPlan) -> MemoryEstimate:
    """Peak bytes one device needs for one training step of ``plan`` on a model of ``shape``."""
    wb, shards = plan.weight_bytes, plan.shards
    state_bytes = plan.state_bytes or wb
    trainable = shape.lora_params(plan.lora_rank, plan.lora_targets) if plan.lora_rank else shape.params
    base = shape.params + (trainable if plan.lora_rank else 0)
    gathered = 2 * shape.layer_params * wb if shards > 1 else 0  # FSDP: two unsharded layers at a time
    parts = {
        "weights": math.ceil(base * wb / shards) + gathered,
        "gradients": math.ceil(trainable * wb / shards),
        "optimizer": math.ceil(trainable * (OPTIMIZER_STATES.get(plan.optimizer, 2) * state_bytes
                                            + (4 if plan.master_weights else 0)) / shards),
    }
    batch = math.ceil(plan.batch_size / shards)
    tokens = batch * plan.seq_len
    activations = _activations(shape, plan, tokens, wb)
    parts.update(activations)
    # Adam's foreach step allocates one state-sized temporary (sqrt of the second moment) after backward has
    # freed the activations: the peak is whichever is larger, so only the excess counts.
    step = math.ceil(trainable * state_bytes / shards) if OPTIMIZER_STATES.get(plan.optimizer, 2) >= 2 else 0
    if step > sum(activations.values()):
        parts["optimizer_step"] = step - sum(activations.values())
    return MemoryEstimate(parts)


def _activations(shape: ModelShape, plan: TrainingPlan, tokens: int, wb: int) -> dict[str, int]:
    """Activation bytes: the decoder's, the head's and (RepNoise) the loss's own."""
    per_layer_token = (C_HIDDEN * shape.hidden + C_KV * shape.kv_dim + C_INTER * shape.intermediate) * wb
    decoder_tokens = tokens * (2 if plan.stage == "repnoise" else 1)  # both sides stacked in one forward
    if plan.checkpointing:  # each layer keeps its input; backward recomputes one layer at a time
        decoder = decoder_tokens * (shape.layers * shape.hidden * wb + per_layer_token)
    else:
        decoder = decoder_tokens * shape.layers * per_layer_token
    if plan.stage != "repnoise":
        return {"activations": decoder, "logits": tokens * shape.vocab * C_VOCAB * 4}
    mmd_layers = 1 if plan.checkpointing else shape.layers
    noise = tokens * shape.hidden * 16 * mmd_layers
    states = shape.layers + 2  # hidden states h_0..h_{L-1}, the final state twice, plus the retain side
    gathered = tokens * states * shape.hidden * wb * 4  # gathered, normed (2), gradient
    rows = tokens * states
    head = min(rows, max(1, DEFAULT_CHUNK_ELEMENTS // shape.vocab)) * shape.vocab * 4 * 2  # chunk + its gradient
    return {"activations": decoder, "repnoise_loss": noise + gathered, "logits": head}


# ----- the device ------------------------------------------------------------------------------------------


def available_memory(device: Any) -> int:
    """Free bytes on ``device`` now: CUDA's free memory, or the system's available memory for the CPU."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return system_available_memory()


def system_available_memory() -> int:
    """MemAvailable from /proc/meminfo (what the kernel can give without swapping), else psutil's."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        raise HarnessError("Cannot read the available memory (no /proc/meminfo, no psutil); set "
                           "resources.device_memory_gb to plan for a given size.") from None
    return int(psutil.virtual_memory().available)


# ----- refusing early ----------------------------------------------------------------------------------------


def fits(shape: ModelShape, plan: TrainingPlan, available: int) -> bool:
    return estimate(shape, plan).total * HEADROOM <= available


def fitting_options(shape: ModelShape, plan: TrainingPlan, available: int) -> list[str]:
    """Changes to ``plan`` that would fit in ``available`` bytes, simplest first (each said as the user sets it)."""
    options = []
    bf16 = {"weight_bytes": 2, "state_bytes": 4, "master_weights": True}
    if not plan.checkpointing and fits(shape, plan.but(checkpointing=True), available):
        options.append("gradient checkpointing")
    if plan.batch_size > 1 and fits(shape, plan.but(batch_size=1), available):
        options.append(f"micro-batch 1 with grad_accum {plan.batch_size} (same effective batch)")
    if plan.weight_bytes > 2:
        for changes, label in ((bf16, "bf16 weights (float32 optimizer state)"),
                               ({**bf16, "checkpointing": True}, "bf16 weights + gradient checkpointing")):
            if fits(shape, plan.but(**changes), available):
                options.append(label)
                break
    if plan.lora_rank is None and plan.stage == "sft" and fits(shape, plan.but(lora_rank=8), available):
        options.append("LoRA (rank 8) instead of full-parameter training")
    for shards in (2, 4, 8, 16, 32, 64):
        if shards > plan.shards and fits(shape, plan.but(shards=shards), available):
            options.append(f"--nproc {shards} sharded (FSDP over {shards} devices)")
            break
    return options


def check_fits(shape: ModelShape, plan: TrainingPlan, available: int, what: str) -> MemoryEstimate:
    """The estimate, or a HarnessError naming the need, what is available and what would fit."""
    needed = estimate(shape, plan)
    if needed.total * HEADROOM <= available:
        return needed
    options = fitting_options(shape, plan, available)
    fix = (f"Fits with: {'; or '.join(options)}." if options else
           "No single change fits: combine LoRA, bf16 weights, checkpointing and sharding, or use a bigger device.")
    raise HarnessError(
        f"{what} needs about {gib(needed.total)} per device ({needed.describe()}; plus {HEADROOM - 1:.0%} headroom) "
        f"but {gib(available)} is available. {fix} To run anyway set resources.memory_check=warn; to plan for "
        "another device set resources.device_memory_gb (--device-memory)."
    )


# ----- from a run's config --------------------------------------------------------------------------------


def shape_for_ref(ref: str) -> ModelShape | None:
    """The shape of a model reference without loading weights, or None when only the hub could say."""
    from harness.models.loading import EMBEDDED_MODEL, TINY_LLAMA_SHAPE, TINY_MODEL, default_asset_dir

    if ref in SHAPES:
        return SHAPES[ref]
    if ref == TINY_MODEL:
        return ModelShape.from_config({**TINY_LLAMA_SHAPE, "vocab_size": SMOLLM2_VOCAB})
    if ref == EMBEDDED_MODEL:
        for directory in sorted(default_asset_dir().glob(f"{EMBEDDED_MODEL}-*")):
            if (directory / "config.json").is_file():
                return ModelShape.from_config(json.loads((directory / "config.json").read_text()))
        return SHAPES["smollm2-135m"]
    config = Path(ref).expanduser() / "config.json"
    if config.is_file():
        return ModelShape.from_config(json.loads(config.read_text()))
    try:  # a hub id: its config may be in the local hub cache (never fetched just for an estimate)
        from transformers import AutoConfig

        return ModelShape.from_config(AutoConfig.from_pretrained(ref, local_files_only=True).to_dict())
    except Exception:  # offline and not cached, or not a Llama-style config: no estimate, no refusal
        return None


def plan_for_params(params: Any, plugin_name: str, weight_bytes: int, *, shards: int = 1) -> TrainingPlan | None:
    """The training plan a stage's params describe (batch, length, optimizer, LoRA rank and targets, gradient
    checkpointing, float32 optimizer state), or None for a stage that does not train."""
    from harness.train.loop import TrainSettings

    if not isinstance(params, TrainSettings):
        return None
    rank = getattr(params, "rank", None) if hasattr(params, "targets") else None
    fp32_state = bool(getattr(params, "fp32_optimizer", False)) and weight_bytes < 4
    return TrainingPlan(
        batch_size=params.batch_size, seq_len=int(getattr(params, "max_length", 256)), weight_bytes=weight_bytes,
        optimizer=params.optimizer, state_bytes=4 if fp32_state else None, master_weights=fp32_state,
        checkpointing=bool(getattr(params, "gradient_checkpointing", False)), lora_rank=rank,
        lora_targets=tuple(getattr(params, "targets", ALL_LINEAR)), shards=shards,
        stage="repnoise" if plugin_name == "repnoise" else "sft",
    )


def weight_bytes_for(dtype: str, device: str) -> int:
    """Bytes per weight the run's ``model.dtype`` gives on its device (auto: bf16 on CUDA, float32 on CPU)."""
    import torch

    from harness.models.loading import resolve_device, resolve_dtype

    return torch.empty((), dtype=resolve_dtype(dtype, resolve_device(device))).element_size()


def device_memory(override_gb: float | None, device: Any) -> int:
    """The bytes to plan for: the override (``resources.device_memory_gb``), else what the device has free."""
    if override_gb is not None:
        return int(override_gb * GIB)
    env = os.environ.get("HARNESS_DEVICE_MEMORY_GB")
    return int(float(env) * GIB) if env else available_memory(device)


def check_run_memory(pipeline: Any) -> None:
    """Before the first stage of a run: every training stage not stored yet must fit on the device
    (``resources.memory_check``: refuse, warn or off). Models the hub alone could describe are not checked."""
    from harness.models.loading import resolve_device
    from harness.resources.plan import planned_model_stages
    from harness.terminal import plain

    config = pipeline.config
    mode = config.resources.memory_check
    if mode == "off":
        return
    shape = shape_for_ref(config.model.ref)
    if shape is None:
        return
    device = resolve_device(config.model.device)
    weight_bytes = weight_bytes_for(config.model.dtype, config.model.device)
    world = getattr(pipeline, "world", None)
    shards = getattr(world, "size", None) or int(os.environ.get("WORLD_SIZE", "1"))
    available: int | None = None
    checked: set[tuple[str, str, TrainingPlan]] = set()
    for stage in planned_model_stages(pipeline):
        plan = plan_for_params(stage.params, stage.plugin, weight_bytes, shards=shards)
        if stage.stored or plan is None or (stage.kind, stage.plugin, plan) in checked:
            continue  # the reference branch's attack is usually the same plan as the defended one's
        checked.add((stage.kind, stage.plugin, plan))
        available = available if available is not None else device_memory(config.resources.device_memory_gb, device)
        what = f"The {stage.kind} stage {stage.plugin} ({plan.batch_size}×{plan.seq_len} tokens, {device.type})"
        try:
            needed = check_fits(shape, plan, available, what)
        except HarnessError as exc:
            if mode == "refuse":
                raise
            pipeline.console.print(f"[yellow]Memory:[/] {plain(str(exc))}", highlight=False)
            continue
        pipeline.console.print(f"[dim]memory: {stage.kind} {plain(stage.plugin)} needs about {gib(needed.total)} of "
                               f"{gib(available)} available[/]", highlight=False)
