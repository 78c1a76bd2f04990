"""`tunesmith plan CONFIG`: how much memory a run needs per device, before any training starts.

Parameter counts are exact: the model is built on the meta device (no weights are read) and the
method is applied to it, so LoRA / adapters / prompts count what they really add. The rest is
the standard accounting for mixed-precision training (Rajbhandari et al. 2020, ZeRO, sec. 3.1)
and activation sizes per transformer layer (Korthikanti et al. 2022, sec. 4.1), worked out for the
model's shape, the method and precision, and the kernels the loop runs (`layer_bytes_per_token`,
checked against what autograd keeps in tests/test_plan.py); logits only at loss positions, computed
in chunks, and optional activation checkpointing. It is an estimate: allocator slack, the CUDA
context and the process itself (~0.5 GiB of imports on the CPU) add what no formula sees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunesmith.config import RunConfig
from tunesmith.methods import METHODS, count_parameters
from tunesmith.methods.base import creates_head
from tunesmith.models import decoder_layers, unwrapped_model
from tunesmith.objectives import OBJECTIVES
from tunesmith.objectives.branched_rows import costs_less, longest_accepted_row, takes_branched_rows
from tunesmith.objectives.causal_lm import _can_skip_unused_logits, continues_from_cache, rescales_logits
from tunesmith.objectives.linear_cross_entropy import SOFTMAX_BLOCK_ELEMENTS, fusable_head
from tunesmith.objectives.preference import collate_pairs
from tunesmith.training.launch import launched_shape
from tunesmith.training.packed_attention import MATMUL_ATTENTION_MAX_LENGTH, QUERY_BLOCKS, QUERY_BLOCKS_FROM_LENGTH
from tunesmith.training.parallel_rows import active_dropout, parallel_rows_choice, swapped_weights
from tunesmith.training.recompute import recomputed_layers
from tunesmith.training.weight_casts import casts_kept, keeping_linears, trained_blocks

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GIB = 2**30

# Linears named so read the same input: the attention's (q, k, v) or the MLP's (gate and up, or its one up
# projection). Autograd keeps a shared input once; any other linear's input is its own.
ATTENTION_INPUT_NAMES = ("q_proj", "k_proj", "v_proj", "qkv_proj", "query", "key", "value", "query_key_value",
                         "Wqkv", "c_attn")
MLP_INPUT_NAMES = ("gate_proj", "up_proj", "gate_up_proj", "w1", "w3", "fc1", "c_fc", "wi", "wi_0", "wi_1",
                   "shared_expert_gate")
GATE_NAMES = ("gate_proj", "gate_up_proj", "w1", "wi_0")  # a gated MLP (SwiGLU): gate and up, their product down


@dataclass
class MemoryPlan:
    total_params: int
    trainable_params: int
    parts_gib: dict[str, float] = field(default_factory=dict)
    budget_gib: float | None = None
    advice: list[str] = field(default_factory=list)
    processes: int = 1
    sharded: bool = False  # FSDP across the processes
    loading: HostLoading | None = None

    @property
    def total_gib(self) -> float:
        return sum(self.parts_gib.values())

    @property
    def fits(self) -> bool:
        return self.budget_gib is None or self.total_gib <= self.budget_gib


@dataclass(frozen=True)
class HostLoading:
    """Host memory while the model is loaded and set up, before the first step (training/loop.py)."""

    private_gib: float
    """Each process's own memory at its peak: converted weights, the parts kept whole, host shards."""
    shared_gib: float
    """The weight files' pages (mapped, one copy in the page cache, shared by a node's processes)."""
    as_stored: bool
    """Loaded in the files' dtype, each layer converted just before it is sharded (sharding.load_as_stored)."""


@dataclass
class ParameterCounts:
    trainable: int
    total: int
    trainable_in_layers: int  # what FSDP shards (training/sharding.py): the decoder layers' parameters
    total_in_layers: int
    largest_layer: int  # parameters of one decoder layer: gathered whole while it runs
    in_matrices: int  # parameters of 2-D weights (what matmuls use; not norms or biases)
    trainable_in_matrices: int
    active_in_experts: float = 0.0  # a mixture of experts' 3-D weights, the share each token runs through (top-k)
    trainable_active_in_experts: float = 0.0
    cast_once: int = 0  # frozen weights whose autocast cast the loop keeps for the run (training/weight_casts.py)
    has_disabled_adapters: bool = False  # a peft model: its reference is itself with the adapters off, not a copy
    plain_head: bool = True  # the output head is a plain linear layer: the loss takes the fused path
    dropout: str | None = None  # where the model draws dropout masks in training (parallel_rows.active_dropout)
    swapped_weights: str | None = None  # a module swapping merged weights in each forward (parallel_rows)
    prompt_cache: bool = False  # grpo / ppo may run a group's prompt once (causal_lm.continues_from_cache)
    branched_rows: bool = False  # pairs and groups may run as one row each (objectives/branched_rows.py)
    layer_shape: LayerShape | None = None  # what one layer's saved activations follow (None: none found)
    fused_on_load: int = 0  # 3-D weights the files hold per expert, which loading stacks into the process's memory
    first_trained_layer: int = 0  # layers below it keep no activations: no gradient flows into them

    def held(self, processes: int, sharded: bool, cpu_offload: bool, trainable: bool = False) -> float:
        """Parameters (or trainable ones) one device holds: all, or with FSDP 1/processes of the layers'
        (none of them when offloaded to host memory)."""
        whole, in_layers = self.total, self.total_in_layers
        if trainable:
            whole, in_layers = self.trainable, self.trainable_in_layers
        if not sharded:
            return whole
        kept = 0 if cpu_offload else 1 / processes
        return whole - in_layers * (1 - kept)


def counts_of(model: torch.nn.Module) -> ParameterCounts:
    trainable, total = count_parameters(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    layers = decoder_layers(model)
    blocks, first_trained = trained_blocks(model)
    in_layers = [parameter for layer in layers for parameter in layer.parameters()]
    matrices = [parameter for parameter in model.parameters() if parameter.ndim == 2]
    active, trainable_active = active_expert_weights(model)
    return ParameterCounts(
        trainable, total,
        trainable_in_layers=sum(parameter.numel() for parameter in in_layers if parameter.requires_grad),
        total_in_layers=sum(parameter.numel() for parameter in in_layers),
        largest_layer=max((sum(parameter.numel() for parameter in layer.parameters()) for layer in layers), default=0),
        in_matrices=sum(parameter.numel() for parameter in matrices),
        trainable_in_matrices=sum(parameter.numel() for parameter in matrices if parameter.requires_grad),
        active_in_experts=active, trainable_active_in_experts=trainable_active,
        cast_once=sum(weight.numel() for weight in weights_cast_once(model, head)),
        has_disabled_adapters=hasattr(model, "disable_adapter"),
        plain_head=head is None or fusable_head(head),
        dropout=active_dropout(model),
        swapped_weights=swapped_weights(model),
        prompt_cache=continues_from_cache(model),
        branched_rows=takes_branched_rows(model) and _can_skip_unused_logits(model),
        layer_shape=layer_shape_of(model, blocks),
        first_trained_layer=first_trained,
    )


@dataclass(frozen=True)
class ExpertsShape:
    """A mixture of experts' routed MLP as transformers 5 runs it: each expert's weights in one 3-D parameter per
    projection, every token through `top_k` of `count` experts of intermediate size `width`."""

    count: int
    top_k: int
    width: int
    gated: bool  # gate and up projections (one gate_up_proj); else one up projection
    trained: bool  # the experts' weights take gradients (full fine-tuning, LoRA on them): their inputs are kept
    merged_weights: int = 0  # elements of W + BA that LoRA on the experts' weights builds in each forward
    lora_factors: int = 0  # elements of the experts' LoRA factors (cast to half-precision weights' dtype to merge)
    router_merged_weights: int = 0  # elements of the router's W + BA under LoRA
    gated_shared_output: bool = False  # the shared experts' output scaled by a sigmoid gate (Qwen2-MoE), kept for it


@dataclass(frozen=True)
class LayerShape:
    """The sizes that what one transformer layer keeps for its backward follows (`layer_bytes_per_token`): read
    from the model's config and from its last layer's linears, as the method left them."""

    hidden: int
    heads: int
    query_width: int  # query heads x head dim
    key_value_width: int  # key-value heads x head dim
    mlp_width: int  # the dense MLP's intermediate size (beside routed experts: the shared experts', or 0)
    gated_mlp: bool  # gate and up projections whose product is projected down (SwiGLU); else one up projection
    shared_inputs: int  # input features the trained linears keep, each input once (q, k and v share theirs)
    own_inputs: int  # input features the trained linears read, summed over the linears
    adapted_inputs: int  # input features of the linears an adapter (LoRA, LoHa, LoKr, IA3) wraps, summed
    hidden_dropout: float  # dropout on each sublayer's output (BERT's 0.1; none in Llama families)
    attention_dropout: float  # dropout on the attention probabilities (in training)
    lora_rank: int = 0  # LoRA ranks summed over the layer's adapted linears: each keeps its A's (N, r) output
    dropped_inputs: int = 0  # input features of the adapted linears whose adapter drops its input (LoRA dropout)
    delta_weights: int = 0  # weight elements of the deltas LoHa and LoKr build in each forward, per layer
    mlp_in_input_dtype: bool = False  # the MLP's gate / up outputs cast back to their input's dtype (LoHa, LoKr)
    experts: ExpertsShape | None = None  # a routed mixture of experts in place of (or beside) the dense MLP
    qk_norm_rows: int = 0  # rows per token that norms on the queries and keys normalise (Qwen3, OLMo: per head)


def is_experts(module: torch.nn.Module) -> bool:
    """A mixture of experts' experts module as transformers 5 writes them (`has_gate`, 3-D weights)."""
    return (hasattr(module, "has_gate") and isinstance(getattr(module, "down_proj", None), torch.Tensor)
            and module.down_proj.ndim == 3)


def experts_of(block: torch.nn.Module, config, hidden: int) -> tuple[ExpertsShape, int] | None:
    """The routed experts of a decoder block (transformers 5's experts modules, marked by `has_gate`), and the
    router's input features where its weight takes gradients (it keeps its input then; else 0). None for a block
    without experts."""
    from peft.tuners.lora.layer import ParamWrapper

    experts = next((module for module in block.modules() if is_experts(module)), None)
    if experts is None:
        return None
    wrappers = [module for module in block.modules() if isinstance(module, ParamWrapper)]
    routers = [module for module in block.modules() if isinstance(getattr(module, "top_k", None), int)
               and isinstance(getattr(module, "weight", None), torch.Tensor)]
    router = routers[0] if routers else None
    merged = factors = router_merged = 0
    for wrapper in wrappers:
        parameter = wrapper.get_param()
        if parameter.ndim == 3:
            merged += parameter.numel()
            factors += sum(wrapper.lora_A[adapter].weight.numel() + wrapper.lora_B[adapter].weight.numel()
                           for adapter in wrapper.lora_A)  # its own: a wrapper may wrap another
        else:
            router_merged += parameter.numel()
    top_k = router.top_k if router is not None else getattr(config, "num_experts_per_tok", 1)
    router_trained = router is not None and (router.weight.requires_grad or router_merged > 0)
    trained = merged > 0 or any(parameter.requires_grad for parameter in experts.parameters())
    down = experts.down_proj  # (experts, hidden, width), or transposed
    width = down.shape[2] if down.shape[1] == hidden else down.shape[1]
    # A linear to one feature: the sigmoid gate on the shared experts' output.
    shared_gate = any(getattr(module, "out_features", 0) == 1 for module in block.modules())
    shape = ExpertsShape(count=down.shape[0], top_k=top_k, width=width, gated=experts.has_gate,
                         trained=trained, merged_weights=merged, lora_factors=factors,
                         router_merged_weights=router_merged, gated_shared_output=shared_gate)
    return shape, hidden if router_trained else 0


def layer_shape_of(model: torch.nn.Module, blocks: list[torch.nn.Module]) -> LayerShape | None:
    """The shape of `model`'s layers, its last block's linears (trained whenever any block is) standing for all."""
    from peft.tuners.lora.layer import ParamWrapper
    from peft.tuners.lycoris_utils import LycorisLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    config = getattr(unwrapped_model(model), "config", None)
    hidden = getattr(config, "hidden_size", 0) or getattr(config, "d_model", 0)
    heads = getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 0)
    if not (hidden and heads):
        return None
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    key_value_heads = getattr(config, "num_key_value_heads", None) or heads
    # Linears whose input autograd keeps: a trainable weight's gradient needs it, and so does an adapter's.
    kept: dict[str, int] = {}
    adapted = own = lora_rank = dropped = delta_weights = gate_width = qk_norm_rows = 0
    gated = mlp_in_input_dtype = False
    for name, module in (blocks[-1].named_modules() if blocks else ()):
        short = name.rsplit(".", 1)[-1]
        if short in ("q_norm", "k_norm") and isinstance(getattr(module, "weight", None), torch.Tensor):
            # Norms on the queries and keys: over each head (a head_dim weight) or the whole projection.
            per_head = module.weight.numel() == head_dim
            qk_norm_rows += (heads if short == "q_norm" else key_value_heads) if per_head else 1
        if short in GATE_NAMES and hasattr(module, "out_features"):
            gated = True
            gate_width += module.out_features // (2 if short == "gate_up_proj" else 1)
        if isinstance(module, ParamWrapper):  # LoRA merged into a parameter: `experts_of` counts it
            continue
        is_adapter = isinstance(module, BaseTunerLayer)
        inside_adapter = ".base_layer" in name or ".lora_" in name
        drops = False
        if is_adapter and hasattr(module, "in_features"):
            adapted += module.in_features
            lora_rank += sum(getattr(module, "r", {}).get(adapter, 0) for adapter in getattr(module, "lora_A", {}))
            # LoRA's dropout gives each adapted linear a dropped copy of its input, which it keeps instead
            drops = any(getattr(dropout, "p", 0) > 0 for dropout in getattr(module, "lora_dropout", {}).values())
            dropped += module.in_features if drops else 0
            if isinstance(module, LycorisLayer):  # LoHa, LoKr: F.linear(x, delta weight) keeps the delta
                delta_weights += module.in_features * module.out_features
                mlp_in_input_dtype = mlp_in_input_dtype or short in MLP_INPUT_NAMES  # peft's result.to(x.dtype)
        trained = is_adapter or (isinstance(module, torch.nn.Linear) and module.weight.requires_grad)
        if trained and not inside_adapter and hasattr(module, "in_features"):
            group = ("attention" if short in ATTENTION_INPUT_NAMES else "mlp" if short in MLP_INPUT_NAMES else name)
            if not drops:
                kept[group] = module.in_features
            own += module.in_features
    mlp_width = (getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
                 or getattr(config, "ffn_dim", None) or 4 * hidden)
    routed = experts_of(blocks[-1], config, hidden) if blocks else None
    experts = None
    if routed is not None:
        experts, router_input = routed
        mlp_width = gate_width  # the shared experts' (config.intermediate_size may be a dense layer's elsewhere)
        if router_input:  # the router reads the MLP's input, like the shared experts' gate and up projections
            kept["mlp"] = router_input
            own += router_input
    return LayerShape(
        hidden=hidden, heads=heads, query_width=heads * head_dim, key_value_width=key_value_heads * head_dim,
        mlp_width=mlp_width, gated_mlp=gated, shared_inputs=sum(kept.values()), own_inputs=own,
        adapted_inputs=adapted,
        hidden_dropout=getattr(config, "hidden_dropout_prob", None) or getattr(config, "resid_pdrop", None) or 0.0,
        attention_dropout=(getattr(config, "attention_probs_dropout_prob", None)
                           or getattr(config, "attention_dropout", None) or getattr(config, "attn_pdrop", None)
                           or 0.0),
        lora_rank=lora_rank, dropped_inputs=dropped, delta_weights=delta_weights,
        mlp_in_input_dtype=mlp_in_input_dtype, experts=experts, qk_norm_rows=qk_norm_rows,
    )


def active_expert_weights(model: torch.nn.Module) -> tuple[float, float]:
    """The experts' 3-D weights that each token runs through (config.num_experts_per_tok of each layer's
    num_experts), all and trainable."""
    top_k = getattr(getattr(unwrapped_model(model), "config", None), "num_experts_per_tok", None) or 1
    active = trainable = 0.0
    for module in model.modules():
        if not is_experts(module):
            continue
        for parameter in module.parameters(recurse=False):
            if parameter.ndim == 3:  # (experts, out, in), or transposed
                share = parameter.numel() * min(top_k, parameter.shape[0]) / parameter.shape[0]
                active += share
                trainable += share if parameter.requires_grad else 0.0
    return active, trainable


def weights_cast_once(model: torch.nn.Module, head: torch.nn.Module | None) -> list[torch.Tensor]:
    """The weights whose half-precision casts the loop keeps for a run (training/weight_casts.py): the frozen
    weights of the linears that keep their casts, and a frozen head of the fused loss."""
    weights = {id(layer.weight): layer.weight for layer in keeping_linears(model)}
    if head is not None and fusable_head(head):
        weights[id(head.weight)] = head.weight
    return [weight for weight in weights.values() if not weight.requires_grad]


def parameter_counts(config: RunConfig) -> tuple[ParameterCounts, object]:
    """Parameter counts of the method applied to the model built on the meta device, and the model config."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from tunesmith.models import resolve_model, stored_names, unsupported_attention

    folder = resolve_model(config.model)
    model_config = AutoConfig.from_pretrained(folder, trust_remote_code=config.model.trust_remote_code)
    model_class = AutoModelForSequenceClassification if creates_head(config.task) else AutoModelForCausalLM
    with torch.device("meta"):
        try:
            model = model_class.from_config(model_config, attn_implementation=config.model.attn_implementation)
        except ValueError as error:
            unsupported = unsupported_attention(error, config.model)
            if unsupported is None:
                raise
            raise unsupported from None
        stored = stored_names(folder)
        fused = sum(parameter.numel() for name, parameter in model.named_parameters()
                    if parameter.ndim == 3 and stored and name not in stored)
        model = METHODS.get(config.method.name).apply(model, config.method, config.task)
    counts = counts_of(model)
    counts.fused_on_load = fused
    return counts, model_config


def teacher_counts(teacher: str) -> tuple[ParameterCounts, object]:
    """Parameter counts and model config of a distillation teacher (a model name or folder, or a run: its model,
    or the base of its adapter, whose own few parameters are left out), built on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunesmith.config import ModelConfig
    from tunesmith.models import read_run, resolve_model
    from tunesmith.objectives.distill import is_run_directory

    if is_run_directory(teacher):
        run = read_run(Path(teacher))
        folder = resolve_model(run.model) if run.is_adapter else run.weights_dir
    else:
        folder = resolve_model(ModelConfig(name=teacher))
    model_config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        return counts_of(AutoModelForCausalLM.from_config(model_config)), model_config


def model_flops_per_token(config: RunConfig, record_length: float) -> float:
    """Model FLOPs of one trained token, PaLM's accounting (Chowdhery et al. 2022, appendix B): 2 per matmul
    weight in the forward and 2 in the backward for the input gradients, 2 more per trainable weight for its
    gradient (full fine-tuning: 6N; LoRA: 4N plus the adapters'), plus attention's 12 x layers x hidden x
    record length (not halved for causality). Embedding lookups count nothing; the head counts as a matmul; a
    mixture of experts counts the experts each token runs through. Model FLOPs per second over the device's peak
    is MFU."""
    counts, model_config = parameter_counts(config)
    hidden = getattr(model_config, "hidden_size", 0) or getattr(model_config, "d_model", 0)
    layers = getattr(model_config, "num_hidden_layers", 0) or getattr(model_config, "n_layer", 0)
    vocab = getattr(model_config, "vocab_size", 0)
    tied = getattr(model_config, "tie_word_embeddings", False)
    # The input embedding table is a lookup; tied, it is also the head's matmul weight.
    matmul_weights = counts.in_matrices - (0 if tied else vocab * hidden) + counts.active_in_experts
    trainable_matmul_weights = min(counts.trainable_in_matrices + counts.trainable_active_in_experts, matmul_weights)
    return 4 * matmul_weights + 2 * trainable_matmul_weights + 12 * layers * hidden * record_length


def host_loading(config: RunConfig, counts: ParameterCounts, dtype: str, processes: int, sharded: bool) -> HostLoading:
    """What loading costs the host (see `HostLoading`), as the loop loads: in `dtype` (a private converted copy
    of the whole model when the files hold another dtype, else their mapped pages, but for experts stacked from
    per-expert tensors), or in a sharded run whose
    weights are the files' as stored, converting one layer at a time (`load_as_stored`). Counts the model's
    parameters as the method leaves them (an adapter's few are not in the files)."""
    from tunesmith.models import resolve_model, stored_dtype
    from tunesmith.training.sharding import load_as_stored

    stored = stored_dtype(resolve_model(config.model))
    stored_name = dtype if stored is None else str(stored).removeprefix("torch.")
    as_stored = sharded and load_as_stored(config, METHODS.get(config.method.name), OBJECTIVES.get(config.task))
    files = counts.total * BYTES.get(stored_name, 4)
    target = BYTES[dtype]
    if as_stored and stored_name != dtype:
        # The parts left whole, converted as they are placed, and the one layer being converted.
        private = (counts.total - counts.total_in_layers + counts.largest_layer) * target
    elif stored_name != dtype:
        private = counts.total * target  # every process converts the whole model
        objective = OBJECTIVES.get(config.task)
        if sharded and objective.has_reference and objective.reference_is_starting_model and not (
                counts.has_disabled_adapters):
            private += counts.total * target  # the frozen reference, copied on the host before sharding
    else:
        # The files' pages until the weights move to the device (or, on the CPU, are trained); a mixture of experts'
        # per-expert tensors stacked into 3-D weights are the process's own (models.own_weights_of_converted_files).
        private = counts.fused_on_load * target
    if sharded and config.train.cpu_offload:
        private += counts.total_in_layers / processes * target  # the process's shards stay on the host
    return HostLoading(private / GIB, files / GIB, bool(as_stored))


def weights_dtype(config: RunConfig, on_gpu: bool) -> str:
    if config.model.dtype != "auto":
        return config.model.dtype
    return "bfloat16" if on_gpu else "float32"


def mixed_precision_of(setting: str, on_gpu: bool, weights: str = "auto") -> str:
    """train.mixed_precision as the loop resolves it (auto: bf16 on GPUs, and on the CPU for bfloat16 weights
    (`model.dtype`, `weights`); none for float32 weights on the CPU). Without autocast, peft runs the float32
    adapters it keeps beside bfloat16 weights in float32, on a float32 copy of each adapted linear's input:
    bench/README.md measures the two."""
    if setting == "auto":
        return "bf16" if on_gpu or weights == "bfloat16" else "no"
    return setting


def compute_bytes_of(dtype: str, mixed_precision: str) -> int:
    """Bytes of an activation: autocast's half dtype, else the weights'. The residual stream (each layer's input)
    stays in the weights' dtype."""
    return 2 if (mixed_precision != "no" or dtype != "float32") else 4


def launch_plan(config: RunConfig, processes: int | None) -> tuple[int, bool]:
    """(processes, sharded): `processes` if given, else what `train.accelerate_config` launches (else 1);
    sharded for `train.sharding: fsdp`, or `auto` with an FSDP accelerate config."""
    launched, launched_fsdp = 1, False
    if config.train.accelerate_config is not None:
        launched, launched_fsdp = launched_shape(config.train.accelerate_config)
    processes = processes or launched
    sharding = config.train.sharding
    return processes, processes > 1 and (sharding == "fsdp" or (sharding == "auto" and launched_fsdp))


def plan_memory(
    config: RunConfig, budget_gib: float | None = None, on_gpu: bool | None = None, processes: int | None = None
) -> MemoryPlan:
    """Estimated peak memory per device. Data parallel: every process holds a full replica; sharded
    (FSDP, see `launch_plan`), each holds 1/processes of the decoder layers' weights, gradients and
    optimizer state, plus one layer gathered whole while it runs."""
    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    processes, sharded = launch_plan(config, processes)
    counts, model_config = parameter_counts(config)
    trainable, total = counts.trainable, counts.total
    dtype = weights_dtype(config, on_gpu)
    weight_bytes = BYTES[dtype]
    train = config.train
    hidden = getattr(model_config, "hidden_size", 0) or getattr(model_config, "d_model", 0)
    layers = getattr(model_config, "num_hidden_layers", 0) or getattr(model_config, "n_layer", 0)
    vocab = getattr(model_config, "vocab_size", 0)
    objective = OBJECTIVES.get(config.task)
    rows_per_record = 2 if objective.collate is collate_pairs else 1  # a pair's chosen and rejected rows
    # Per micro-batch, per process; at most: a pair's sides may run their common prompt once (pair_row_hidden)
    tokens = train.batch_size * rows_per_record * config.data.max_length
    row_length = config.data.max_length  # the longest row, for attention probabilities kept per token
    # The longest row of a shared beginning and its continuations (objectives/branched_rows.py), whose attention
    # mask, (W, W) per row, every layer keeps for its backward.
    branched_width = 0
    if rows_per_record == 2 and counts.branched_rows:
        branched_width = longest_accepted_row(model_config, 2, config.data.max_length)
        row_length = max(row_length, branched_width)
    completion = getattr(config.objective, "max_new_tokens", None)
    if completion is not None:  # grpo, ppo: group_size sampled completions per prompt, each after its prompt
        group = config.objective.group_size
        sequences = train.batch_size * group
        tokens = sequences * (config.data.max_length + completion)
        row_length = config.data.max_length + completion
        group_row = config.data.max_length + group * completion
        if group > 1 and counts.prompt_cache and not train.gradient_checkpointing:
            tokens = train.batch_size * config.data.max_length + sequences * completion  # each prompt run once
        elif group > 1 and counts.branched_rows and costs_less(
                model_config, 1, group_row, group, config.data.max_length + completion):
            tokens, branched_width = train.batch_size * group_row, group_row  # each group as one row
            row_length = group_row
    mixed_precision = mixed_precision_of(train.mixed_precision, on_gpu, dtype)
    activation_bytes = compute_bytes_of(dtype, mixed_precision)
    teacher = getattr(config.objective, "teacher", None)  # distillation's own frozen model
    teacher_parameters, teacher_config = teacher_counts(teacher) if teacher else (None, None)

    # On the CPU each micro-batch's rows may run in parallel threads (training/parallel_rows.py): each thread
    # computes its own loss chunks and LoHa / LoKr deltas at the same time, and each but the first holds a copy
    # of the gradients.
    row_threads = parallel_rows_choice(
        train.parallel_rows, device=torch.device("cuda" if on_gpu else "cpu"), processes=processes,
        compiled=train.compile, mixed_precision=mixed_precision, rows_independent=objective.rows_independent,
        reference_per_batch=objective.has_reference and not train.cache_reference, batch_size=train.batch_size,
        dropout=counts.dropout, trainable_share=trainable / total if total else 1.0, swapped=counts.swapped_weights,
    )
    kept = layer_activations(config, counts, model_config, on_gpu, row_length, branched=branched_width > 0)
    recomputed = recomputed_layers(train.checkpoint_layers, layers) if train.gradient_checkpointing else 0
    activations = kept.bytes_for(tokens, recomputed, forwards=row_threads)
    activations += train.batch_size * branched_width**2 * activation_bytes
    if creates_head(config.task):
        logits = train.batch_size * 4 * 64  # a handful of classes: negligible
    else:
        # Logits for at most loss_chunk_tokens positions at a time: of each row thread's part, or of grpo / ppo's
        # completion tokens (each one's log-prob).
        positions = sequences * completion if completion is not None else math.ceil(tokens / row_threads)
        chunk = min(getattr(config.objective, "loss_chunk_tokens", None) or positions, positions)
        if completion is not None:
            logits = chunk * vocab * SAMPLED_LOGPS_BYTES_PER_LOGIT
        elif config.task == "distill":
            logits = row_threads * distill_chunk_bytes(chunk, vocab, config.objective) + teacher_side_bytes(
                tokens, teacher_config, config.objective, teacher_bytes(on_gpu), train.cache_reference)
        else:
            half = mixed_precision != "no" or dtype != "float32"
            logits = row_threads * loss_chunk_bytes(chunk, vocab, counts.plain_head, half, on_gpu)

    # Each process holds 1/processes of the layers when sharded; with cpu_offload none of them (host memory).
    held = counts.held(processes, sharded, train.cpu_offload)
    held_trainable = counts.held(processes, sharded, train.cpu_offload, trainable=True)
    gathered, whole_layer_gradients = 0, 0
    if sharded:
        # Float32 layers under half-precision autocast are gathered in the half dtype (train.half_precision_gather).
        half = mixed_precision != "no" and train.half_precision_gather
        gathered_bytes = 2 if half and dtype == "float32" else weight_bytes
        gathered = counts.largest_layer * gathered_bytes
        if not train.reduce_each_micro_batch and train.grad_accum > 1:
            # Between reductions every process accumulates whole gradients of every layer it trains.
            whole_layer_gradients = counts.trainable_in_layers * gathered_bytes
    parts = {
        "weights": held * weight_bytes,
        "gradients": held_trainable * weight_bytes,
        # AdamW: two moments per trainable parameter, in the parameter's dtype (torch's zeros_like).
        "optimizer (AdamW)": held_trainable * 2 * weight_bytes,
        "activations": activations,
        "logits + loss": logits,
    }
    if row_threads > 1:
        parts["parallel rows: gradient copies"] = (row_threads - 1) * held_trainable * weight_bytes
    autocast_casts = mixed_precision != "no" and dtype == "float32"
    if autocast_casts and casts_kept(sharded, train.gradient_checkpointing, train.compile):
        # Float32 matmul weights under half-precision autocast, cast to the half dtype: kept for the run where the
        # loop keeps them (training/weight_casts.py), else made by each forward and kept for its backward, one set
        # per row thread. Sharded, recomputed or compiled layers are cast a layer at a time (not counted).
        tied = getattr(model_config, "tie_word_embeddings", False)
        matmul_weights = counts.in_matrices - (0 if tied else vocab * hidden)  # a lookup table is never cast
        per_forward = max(matmul_weights - counts.cast_once, 0)
        parts["weight casts (autocast)"] = (counts.cast_once + row_threads * per_forward) * 2
    # A reference model held beside the policy (sharded alike under FSDP), unless its outputs are cached.
    if objective.has_reference and not train.cache_reference:
        if objective.reference_is_starting_model and not counts.has_disabled_adapters:
            parts["reference copy (frozen)"] = held * weight_bytes
        if not objective.reference_is_starting_model and teacher:
            held_teacher = teacher_parameters.held(processes, sharded, train.cpu_offload)
            parts["teacher (frozen)"] = held_teacher * teacher_bytes(on_gpu)
    if gathered:
        parts["fsdp: one layer gathered"] = gathered
    if whole_layer_gradients:
        parts["fsdp: whole layer gradients"] = whole_layer_gradients
    # Processes sum the gradients of the parameters they hold whole in one flat all-reduce (ProcessGroup): all of
    # them for replicas; with FSDP those outside the sharded layers (embeddings, final norm, head).
    all_reduced = counts.trainable - (counts.trainable_in_layers if sharded else 0)
    if processes > 1 and all_reduced:
        parts["data parallel: gradients all-reduced"] = all_reduced * weight_bytes
    plan = MemoryPlan(total, trainable, {name: value / GIB for name, value in parts.items()}, budget_gib,
                      processes=processes, sharded=sharded,
                      loading=host_loading(config, counts, dtype, processes, sharded))
    if not plan.fits:
        # The fewest recomputed layers that would fit, all else equal (None: not even every layer).
        room = (budget_gib - (plan.total_gib - parts["activations"] / GIB)) * GIB  # bytes left for activations
        fitting = next((count for count in range(1, layers + 1)
                        if kept.bytes_for(tokens, count, forwards=row_threads) <= room), None)
        recompute = RecomputeAdvice(layers, fitting, recompute_cost(trainable / total if total else 1.0),
                                    untrained=counts.first_trained_layer)
        experts = counts.layer_shape.experts if counts.layer_shape is not None else None
        merged = row_threads * kept.layers_in_flight(recomputed) * experts.merged_weights * weight_bytes if (
            experts is not None) else 0
        plan.advice = advice_for(config, plan, recompute, processes, sharded, merged_experts_gib=merged / GIB)
    return plan


def device_memory_note(config: RunConfig, device: torch.device, processes: int = 1,
                       processes_on_node: int = 1) -> str | None:
    """For `tunesmith train`, before any weight is loaded: a one-line note when this run's estimate is over what
    its device has free now (a GPU's free memory; on the CPU the process's share of the memory the system can
    give), with the first change `tunesmith plan` advises. None when it fits, or the memory cannot be read. A
    note, not an error: the estimate counts every row at data.max_length, an upper bound."""
    from tunesmith.training.memory import available_mb

    on_gpu = device.type == "cuda"
    if on_gpu:
        free_gib = torch.cuda.mem_get_info(device)[0] / GIB
    else:
        available = available_mb()
        if available is None:
            return None
        free_gib = available / max(processes_on_node, 1) / 2**10
    try:
        plan = plan_memory(config, budget_gib=free_gib, on_gpu=on_gpu, processes=processes)
    except (ValueError, TypeError, AttributeError, KeyError, NotImplementedError) as error:
        # A model the plan cannot build on the meta device (remote code, an architecture it does not read) still
        # trains; a bad config (UserError) fails here as it would a moment later.
        return f"note: no memory estimate for this run ({type(error).__name__}: {error})"
    if plan.fits:
        return None
    advice = f"; `tunesmith plan` advises first: {plan.advice[0]}" if plan.advice else ""
    return (f"note: this run needs an estimated {gib_text(plan.total_gib)} per device, more than the "
            f"{gib_text(free_gib)} the {'GPU' if on_gpu else 'machine'} has free; it may run out of memory{advice}")


def gib_text(gib: float) -> str:
    if gib * 2**10 < 1:
        return f"{gib * 2**20:.0f} KiB"
    return f"{gib:.1f} GiB" if gib >= 1 else f"{gib * 2**10:.0f} MiB"


def loss_chunk_bytes(positions: int, vocab: int, plain_head: bool, half: bool, on_gpu: bool) -> int:
    """Memory of one loss chunk's (C, V) logits (objectives/causal_lm.py). A plain head takes the fused loss
    (objectives/linear_cross_entropy.py): the logits in the compute dtype, their softmax and gradient worked
    out in float32 over them (float32 logits) or in a float32 copy (half precision; on the CPU in blocks of
    SOFTMAX_BLOCK_ELEMENTS). A wrapped head's chunk, run through autograd with its gradients: float32 logits, their
    log-softmax and its gradient (measured: 3.0 (C, V) float32 buffers at its peak, C = 512, V = 49,152)."""
    logits = positions * vocab
    if not plain_head:
        return logits * 4 * 3
    if not half:
        return logits * 4
    return logits * 2 + (logits if on_gpu else min(logits, SOFTMAX_BLOCK_ELEMENTS)) * 4


# One chunk of grpo / ppo's completion log-probs (objectives/rl.py, checkpointed): its float32 logits, their
# log-softmax kept for the backward pass, and the gradient that pass makes, 4 bytes each per logit.
SAMPLED_LOGPS_BYTES_PER_LOGIT = 3 * 4

# (C, V) float32 buffers one distillation chunk holds at its peak (objectives/distill.py: the student's logits,
# the teacher's, their log-softmaxes at the temperature, the divergence's elementwise terms and their gradients,
# all made in the forward pass). Measured on the CPU (peak resident memory of one chunk's terms and gradients, the
# backward pass after them, C = 512, V = 49,152, T = 2, alpha = 0.5, a float32 or bf16 teacher): forward KL 10,
# reverse KL 11, jsd 15, the teacher's top-k 4.
DISTILL_CHUNK_BUFFERS = {"reverse_kl": 11, "jsd": 15, "top_k": 4}
DISTILL_CHUNK_BUFFERS_KL = 10


def distill_chunk_bytes(positions: int, vocab: int, settings) -> int:
    """Memory of one distillation chunk of `positions` loss positions at its peak."""
    key = "top_k" if settings.teacher_top_k is not None else settings.divergence
    return positions * vocab * 4 * DISTILL_CHUNK_BUFFERS.get(key, DISTILL_CHUNK_BUFFERS_KL)


def teacher_bytes(on_gpu: bool) -> int:
    """Bytes per value of the teacher's weights and outputs: it loads in model.dtype auto (load_teacher) and runs
    outside the student's autocast."""
    return 2 if on_gpu else 4


def teacher_side_bytes(positions: int, teacher_config, settings, value_bytes: int, cached: bool = False) -> int:
    """The teacher's side of a micro-batch, held for the whole batch: on the fly its final hidden states (N, H_t),
    whose logits each chunk makes; or where its logits need its full forward (soft-capped heads), (N, V) logits,
    or with teacher_top_k its log-probs (float32) and token ids (int64), (N, k) each, as `cached`
    (train.cache_reference) stores them."""
    if not rescales_logits(teacher_config) and not cached:
        return positions * (getattr(teacher_config, "hidden_size", 0) or teacher_config.d_model) * value_bytes
    if settings.teacher_top_k is not None:
        return positions * settings.teacher_top_k * (4 + 8)
    return positions * teacher_config.vocab_size * value_bytes


# Bytes per token of a layer whose structure `layer_shape_of` could not read, in hidden-size activations.
FALLBACK_UNITS_PER_LAYER = 20


def layer_bytes_per_token(shape: LayerShape, residual_bytes: int, compute_bytes: int, on_gpu: bool,
                          row_length: int, implementation: str = "sdpa", upcast_adapters: bool = False,
                          rows: str = "packed") -> float:
    """Bytes one layer's forward keeps for its backward, per token (Korthikanti et al. 2022, sec. 4.1, for the
    kernels tunesmith runs; tests/test_plan.py checks it against what autograd saves):
    - each norm's input: the residual stream, in the weights' dtype (`residual_bytes`);
    - the input of each linear whose weight trains or that an adapter wraps (a frozen linear's gradient needs
      only its weight): q, k and v share theirs, and gate and up; under autocast of float32 weights each linear
      keeps its own cast (autocast keeps no cast of an activation); with `upcast_adapters` (half-precision
      weights without autocast: peft runs its float32 adapters on a float32 copy) each adapted linear keeps a
      float32 copy instead; where an adapter drops its input (LoRA dropout) each adapted linear keeps its dropped
      copy (or its cast) instead of the shared input, and the dropout its one-byte mask;
    - q, k and v: `rows` "packed" attend record by record (training/packed_attention.py); "padded" (rows padded
      to the longest) and "branched" (objectives/branched_rows.py) attend under a mask, where transformers'
      attention repeats k and v for every query head, and SDPA keeps its own float copy of a padded batch's
      boolean (T, T) mask in each layer (a branched row's float mask is counted once, apart); a flash or
      memory-efficient kernel keeps its output too, while attention that keeps its
      (L, L) probabilities keeps those instead: attention dropout (also its mask and the dropped probabilities),
      the eager implementation (float32 probabilities and their cast), and the matmul kernel tunesmith runs on
      the CPU in half precision for records of up to 1,024 tokens (training/packed_attention.py), counted at
      `row_length`, the longest row;
    - the MLP's activation input and, gated, the activation's output and the up projection (their product is
      the down projection's input, above), in the weights' dtype where peft casts an adapted gate or up
      projection's output back to its input's (LoHa, LoKr);
    - each sublayer's output dropout mask (1 byte on a GPU, the compute dtype on the CPU);
    - norms on the queries and keys (Qwen3, OLMo): their inputs, q and k, and each row's statistics;
    - LoRA: each adapted linear's (N, r) down projection;
    - a mixture of experts' routed MLP: `experts_bytes_per_token`, its router's input among the MLP's inputs.
    LoHa's and LoKr's weight deltas, and the experts' weights that LoRA merges, are kept per layer, whatever the
    tokens: `LayerActivations.layer_fixed_bytes`."""
    compute = compute_bytes
    # An adapter's dropout keeps a one-byte mask per input feature, and its linear the dropped copy (or its cast);
    # on the CPU a half-precision keyed dropout makes its mask again in the backward (training/keyed_dropout.py).
    masks = shape.dropped_inputs if on_gpu or compute == 4 or upcast_adapters else 0
    if upcast_adapters:  # peft casts each adapted linear's input to float32 before its dropout
        inputs = shape.adapted_inputs * 4 + masks
    elif residual_bytes != compute_bytes:
        inputs = shape.own_inputs * compute + masks
    else:
        inputs = (shape.shared_inputs + shape.dropped_inputs) * compute + masks
    matmul_kernel = (rows != "padded" and implementation == "sdpa" and not on_gpu and compute == 2
                     and row_length <= MATMUL_ATTENTION_MAX_LENGTH)
    key_value_width = shape.key_value_width if rows == "packed" or matmul_kernel else shape.query_width
    attention = (shape.query_width + 2 * key_value_width) * compute
    mask_bytes = 1 if on_gpu else compute
    if shape.attention_dropout > 0:
        attention += shape.heads * row_length * (2 * compute + mask_bytes)
    elif implementation == "eager":
        attention += shape.heads * row_length * (4 + compute)
    elif matmul_kernel:
        blocks = QUERY_BLOCKS if row_length >= QUERY_BLOCKS_FROM_LENGTH else 1
        attention += shape.heads * row_length * (blocks + 1) / (2 * blocks) * compute  # the causal blocks' share
    else:
        attention += shape.query_width * compute
    if shape.qk_norm_rows:  # each norm keeps its input and its rows' float32 statistics
        attention += (shape.query_width + shape.key_value_width) * compute + shape.qk_norm_rows * 4
    if rows == "padded" and implementation == "sdpa":
        attention += row_length * compute  # SDPA's own (T, T) float copy of the rows' boolean mask, in each layer
    mlp = (3 if shape.gated_mlp else 1) * shape.mlp_width * (residual_bytes if shape.mlp_in_input_dtype else compute)
    if shape.experts is not None:
        mlp += experts_bytes_per_token(shape.experts, shape.hidden, residual_bytes, compute)
    dropout_masks = 2 * shape.hidden * mask_bytes if shape.hidden_dropout > 0 else 0
    ranks = shape.lora_rank * (4 if upcast_adapters else compute)
    return 2 * shape.hidden * residual_bytes + inputs + attention + mlp + dropout_masks + ranks


def experts_bytes_per_token(experts: ExpertsShape, hidden: int, weight_bytes: int, compute_bytes: int) -> float:
    """What a routed MLP keeps per token beside its router's input, run by transformers' default experts kernel
    (grouped_mm, the only one a run loads; tests/test_plan.py checks it against autograd): the router's float32
    probabilities and its top-k indices, and per token and chosen expert, in the weights' dtype (grouped matmuls
    run outside autocast): the gate and up projections' output and the activation's (or the one up projection's
    output), the down projection's output (the routing weight's gradient needs it), that weight in the router's
    output dtype, and the sort's three int64 indices; where the experts' weights train, also the expert's copy of
    its input and the down projection's input. A sigmoid gate on the shared experts keeps their output."""
    width = experts.width
    pair = ((3 if experts.gated else 1) * width + hidden) * weight_bytes + compute_bytes + 3 * 8
    if experts.trained:
        pair += (hidden + width) * weight_bytes
    shared_output = hidden * compute_bytes if experts.gated_shared_output else 0
    return experts.count * 4 + experts.top_k * (8 + pair) + shared_output


def layer_activations(config: RunConfig, counts: ParameterCounts, model_config, on_gpu: bool, row_length: int,
                      branched: bool = False) -> LayerActivations:
    """What the run's decoder layers keep per token, in rows of at most `row_length` tokens: packed, `branched`
    (a pair's or a group's shared beginning and continuations as one row) or padded."""
    rows = "branched" if branched else "packed" if config.data.packing else "padded"
    dtype = weights_dtype(config, on_gpu)
    mixed_precision = mixed_precision_of(config.train.mixed_precision, on_gpu, dtype)
    compute_bytes = compute_bytes_of(dtype, mixed_precision)
    hidden = getattr(model_config, "hidden_size", 0) or getattr(model_config, "d_model", 0)
    layers = getattr(model_config, "num_hidden_layers", 0) or getattr(model_config, "n_layer", 0)
    layer_bytes, fixed_bytes = hidden * compute_bytes * FALLBACK_UNITS_PER_LAYER, 0
    if counts.layer_shape is not None:
        # peft keeps adapters in float32 beside half-precision weights; without autocast they run in float32.
        upcast = dtype != "float32" and mixed_precision == "no" and counts.layer_shape.adapted_inputs > 0
        layer_bytes = layer_bytes_per_token(counts.layer_shape, BYTES[dtype], compute_bytes, on_gpu, row_length,
                                            config.model.attn_implementation, upcast, rows)
        # LoHa's and LoKr's deltas: float32 as peft keeps its adapters, or their half-precision casts under autocast
        fixed_bytes = counts.layer_shape.delta_weights * (4 if upcast else compute_bytes)
        experts = counts.layer_shape.experts
        if experts is not None:
            # LoRA on the experts' weights: W + BA in the weights' dtype (merged outside autocast), from factors cast
            # to it; on the router's, W + BA as its linear runs it.
            factors = experts.lora_factors if BYTES[dtype] != 4 else 0
            fixed_bytes += (experts.merged_weights + factors) * BYTES[dtype]
            fixed_bytes += experts.router_merged_weights * compute_bytes
    return LayerActivations(layers, counts.first_trained_layer, layer_bytes, hidden * BYTES[dtype], fixed_bytes)


@dataclass(frozen=True)
class LayerActivations:
    """What the decoder layers keep per token: `layer_bytes` each, from `first_trained` up (below it nothing),
    with the first layers recomputed (training/recompute.py) keeping only their input (`input_bytes`); and per
    layer, whatever the tokens, `layer_fixed_bytes` (the weight deltas LoHa and LoKr build in each forward)."""

    layers: int
    first_trained: int
    layer_bytes: float
    input_bytes: float
    layer_fixed_bytes: float = 0.0

    def bytes_for(self, tokens: float, recomputed: int, forwards: int = 1) -> float:
        """Bytes kept for a micro-batch of `tokens` positions: per token, and per layer in flight in each of the
        `forwards` that run at once (its rows in parallel threads)."""
        fixed = forwards * self.layers_in_flight(recomputed) * self.layer_fixed_bytes
        return tokens * self.bytes_per_token(recomputed) + fixed

    def recomputed_in_graph(self, recomputed: int) -> int:
        """Recomputed layers that would keep activations: a recomputed layer below `first_trained` saves nothing."""
        return max(0, min(recomputed, self.layers) - self.first_trained)

    def layers_in_flight(self, recomputed: int) -> int:
        """Layers whose activations are kept at once: the others', or one recomputed layer's at a time."""
        in_graph = self.recomputed_in_graph(recomputed)
        return max(self.layers - self.first_trained, 0) - in_graph + (1 if in_graph else 0)

    def bytes_per_token(self, recomputed: int) -> float:
        """Either every layer's activations and the recomputed layers' inputs as the backward starts, or, while
        it recomputes a layer (the later layers' activations freed by then), the recomputed layers' inputs and
        that one layer's activations: whichever is more."""
        in_graph = self.recomputed_in_graph(recomputed)
        kept = (max(self.layers - self.first_trained, 0) - in_graph) * self.layer_bytes + in_graph * self.input_bytes
        return max(kept, in_graph * self.input_bytes + self.layer_bytes) if in_graph else kept


def recompute_cost(trainable_fraction: float) -> float:
    """Extra compute of recomputing every layer, as a fraction of a step's: one more forward (2 FLOPs per
    weight and token) on top of forward + input gradients (4) + weight gradients (2 per trainable weight)."""
    return 2 / (4 + 2 * trainable_fraction)


@dataclass(frozen=True)
class RecomputeAdvice:
    layers: int
    fitting: int | None  # the fewest checkpointed layers that fit the budget; None: even all of them do not
    cost_all: float  # extra compute of recomputing every layer (recompute_cost)
    untrained: int = 0  # the layers below the first trained one: no backward reaches them, none is recomputed

    def cost(self, recomputed: int) -> float:
        return self.cost_all * max(recomputed - self.untrained, 0) / self.layers

    def line(self) -> str:
        if self.fitting is None or self.fitting == self.layers:
            return (f"train.gradient_checkpointing: true (recompute every layer's activations; "
                    f"~{self.cost(self.layers):.0%} more compute, far less memory)")
        return (f"train.gradient_checkpointing: true with train.checkpoint_layers: {self.fitting} (recompute the "
                f"first {self.fitting} of {self.layers} layers: ~{self.cost(self.fitting):.0%} more compute; every "
                f"layer: ~{self.cost(self.layers):.0%})")


def advice_for(config: RunConfig, plan: MemoryPlan, recompute: RecomputeAdvice, processes: int = 1,
               sharded: bool = False, merged_experts_gib: float = 0.0) -> list[str]:
    """What to change, largest saving first, named by config key. `merged_experts_gib`: the expert weights that
    LoRA on a mixture of experts merges and keeps per layer (within the activations)."""
    parts = plan.parts_gib
    advice = []
    model_state = parts["weights"] + parts["gradients"] + parts["optimizer (AdamW)"]
    if not sharded and model_state > 0.3 * plan.total_gib:
        devices = f"the {processes} processes" if processes > 1 else "several devices (accelerate launch)"
        advice.append(f"train.sharding: fsdp (weights, gradients and optimizer state split across {devices})")
    if sharded and not config.train.cpu_offload and model_state > 0.3 * plan.total_gib:
        advice.append("train.cpu_offload: true (the sharded layers' weights, gradients and optimizer state in host "
                      "memory; slower)")
    if merged_experts_gib > 0.2 * plan.total_gib:
        advice.append(f'method.target_modules: ["q_proj", "k_proj", "v_proj", "o_proj"] (LoRA on the attention alone: '
                      f"on the experts' weights each layer keeps all its experts' W + BA until the backward, "
                      f"{gib_text(merged_experts_gib)})")
    if parts.get("fsdp: whole layer gradients", 0) > 0.2 * plan.total_gib:
        advice.append("train.reduce_each_micro_batch: true (gradients reduce-scattered after every micro-batch, "
                      "so they stay sharded)")
    train = config.train
    recomputing_all = train.gradient_checkpointing and (train.checkpoint_layers or recompute.layers) >= recompute.layers
    if not recomputing_all and parts["activations"] > 0.2 * plan.total_gib:
        advice.append(recompute.line())
    if config.train.batch_size > 1 and parts["activations"] > 0.2 * plan.total_gib:
        advice.append(
            f"train.batch_size: {max(1, config.train.batch_size // 2)} with train.grad_accum: "
            f"{config.train.grad_accum * 2} (same effective batch, half the activations)"
        )
    training_state = parts["optimizer (AdamW)"] + parts["gradients"]
    if config.method.name in ("full", "freeze") and training_state > 0.3 * plan.total_gib:
        advice.append("method.name: lora (optimizer state and gradients only for the adapters)")
    if config.model.dtype in ("auto", "float32") and parts["weights"] > 0.3 * plan.total_gib:
        advice.append("model.dtype: bfloat16 on a GPU that supports it (half the weight memory)")
    if not advice or parts["activations"] > 0.5 * plan.total_gib:
        advice.append(f"data.max_length: {max(64, config.data.max_length // 2)} (activations scale with length)")
    return advice
