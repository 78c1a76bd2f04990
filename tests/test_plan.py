"""`tunesmith plan`: exact parameter counts from the meta device, and advice that names config keys."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from helpers import chat_records, preference_records, record_kept_casts, run_config, write_jsonl

from tunesmith.methods import METHODS, count_parameters
from tunesmith.models import decoder_layers, load_model
from tunesmith.plan import (
    GIB,
    LayerActivations,
    MemoryPlan,
    RecomputeAdvice,
    advice_for,
    gib_text,
    model_flops_per_token,
    plan_memory,
    recompute_cost,
)


@pytest.fixture
def chat_file(tmp_path):
    return write_jsonl(tmp_path / "chats.jsonl", chat_records(4))


@pytest.mark.parametrize("method", [{"name": "full"}, {"name": "lora", "r": 4}, {"name": "freeze", "layers": 1}])
def test_parameter_counts_equal_the_real_model(method, tiny_llama_dir, chat_file, tmp_path):
    config = run_config(tiny_llama_dir, chat_file, tmp_path / "run", method=method)
    model = METHODS.get(config.method.name).apply(load_model(config.model, "sft"), config.method, "sft")
    trainable, total = count_parameters(model)
    plan = plan_memory(config, on_gpu=False)
    assert (plan.trainable_params, plan.total_params) == (trainable, total)
    assert plan.parts_gib["weights"] == pytest.approx(total * 4 / GIB)  # float32 on CPU
    assert plan.parts_gib["optimizer (AdamW)"] == pytest.approx(trainable * 8 / GIB)


def test_checkpointing_and_chunking_shrink_the_estimate(tiny_llama_dir, chat_file, tmp_path):
    plain = run_config(tiny_llama_dir, chat_file, tmp_path / "a", data={"max_length": 512},
                       train={"batch_size": 8}, objective={"loss_chunk_tokens": None})
    lean = run_config(tiny_llama_dir, chat_file, tmp_path / "b", data={"max_length": 512},
                      train={"batch_size": 8, "gradient_checkpointing": True}, objective={"loss_chunk_tokens": 256})
    big, small = plan_memory(plain, on_gpu=False), plan_memory(lean, on_gpu=False)
    assert small.parts_gib["activations"] < big.parts_gib["activations"]
    assert small.parts_gib["logits + loss"] == pytest.approx(big.parts_gib["logits + loss"] * 256 / (8 * 512))


def test_too_small_budget_gives_advice_by_config_key(tiny_llama_dir, chat_file, tmp_path):
    config = run_config(tiny_llama_dir, chat_file, tmp_path / "run", data={"max_length": 512}, train={"batch_size": 8})
    plan = plan_memory(config, budget_gib=1e-4, on_gpu=False)
    assert not plan.fits
    assert any(line.startswith("train.gradient_checkpointing: true") for line in plan.advice)

    config_file = tmp_path / "run.yaml"
    config_file.write_text(f"model: {{name: {tiny_llama_dir}}}\ndata: {{train: {chat_file}}}\n")
    result = subprocess.run(
        [sys.executable, "-m", "tunesmith.cli", "plan", str(config_file), "--budget-gb", "0.0001", "--cpu"],
        capture_output=True, text=True,
    )
    assert result.returncode == 1 and "does NOT fit" in result.stdout


def test_fsdp_divides_the_layers_state_by_the_processes(tiny_llama_dir, chat_file, tmp_path):
    replicated = run_config(tiny_llama_dir, chat_file, tmp_path / "a", method={"name": "full"},
                            data={"max_length": 16}, train={"batch_size": 1})  # the model state dominates
    sharded = run_config(tiny_llama_dir, chat_file, tmp_path / "b", method={"name": "full"},
                         train={"sharding": "fsdp"})
    model = load_model(sharded.model, "sft")
    layers = [sum(parameter.numel() for parameter in layer.parameters()) for layer in decoder_layers(model)]
    total = sum(parameter.numel() for parameter in model.parameters())
    plan = plan_memory(sharded, on_gpu=False, processes=4)
    held = total - sum(layers) * 3 / 4  # embeddings and final norm stay whole on every process
    assert plan.parts_gib["weights"] == pytest.approx(held * 4 / GIB)
    assert plan.parts_gib["optimizer (AdamW)"] == pytest.approx(held * 8 / GIB)
    assert plan.parts_gib["fsdp: one layer gathered"] == pytest.approx(max(layers) * 4 / GIB)
    # Without sharding, or on one process, every process holds it all; the advice then names the key.
    assert plan_memory(sharded, on_gpu=False, processes=1).parts_gib["weights"] == pytest.approx(total * 4 / GIB)
    tight = plan_memory(replicated, budget_gib=1e-4, on_gpu=False, processes=4)
    assert any(line.startswith("train.sharding: fsdp") for line in tight.advice)
    # Replicas sum their gradients in one flat buffer (ProcessGroup.sum_gradients): a copy of the gradients; sharded
    # processes the gradients of what they hold whole (the embeddings and the final norm); one process none.
    assert tight.parts_gib["data parallel: gradients all-reduced"] == pytest.approx(tight.parts_gib["gradients"])
    assert plan.parts_gib["data parallel: gradients all-reduced"] == pytest.approx((total - sum(layers)) * 4 / GIB)
    assert "data parallel: gradients all-reduced" not in plan_memory(replicated, on_gpu=False).parts_gib
    # The launch an accelerate config names gives the processes, and its FSDP the sharding (sharding: auto).
    launcher = tmp_path / "fsdp.yaml"
    launcher.write_text("distributed_type: FSDP\nnum_processes: 4\n")
    launched = run_config(tiny_llama_dir, chat_file, tmp_path / "c", method={"name": "full"},
                          train={"accelerate_config": str(launcher)})
    assert plan_memory(launched, on_gpu=False).parts_gib == pytest.approx(plan.parts_gib)


def test_fsdp_plan_counts_the_half_precision_gather_and_gradients_reduced_once_a_step(
    tiny_llama_dir, chat_file, tmp_path
):
    model = load_model(run_config(tiny_llama_dir, chat_file, tmp_path / "m").model, "sft")
    layers = [sum(parameter.numel() for parameter in layer.parameters()) for layer in decoder_layers(model)]
    train = {"sharding": "fsdp", "mixed_precision": "bf16", "grad_accum": 4}
    every = run_config(tiny_llama_dir, chat_file, tmp_path / "a", method={"name": "full"}, train=train)
    once = run_config(tiny_llama_dir, chat_file, tmp_path / "b", method={"name": "full"},
                      train={**train, "reduce_each_micro_batch": False})
    float32_gather = run_config(tiny_llama_dir, chat_file, tmp_path / "c", method={"name": "full"},
                                train={**train, "half_precision_gather": False})
    plan = plan_memory(every, on_gpu=False, processes=4)
    assert plan.parts_gib["fsdp: one layer gathered"] == pytest.approx(max(layers) * 2 / GIB)  # float32 in bf16
    assert "fsdp: whole layer gradients" not in plan.parts_gib
    assert plan_memory(float32_gather, on_gpu=False, processes=4).parts_gib["fsdp: one layer gathered"] == (
        pytest.approx(max(layers) * 4 / GIB))
    reduced_once = plan_memory(once, on_gpu=False, processes=4)
    assert reduced_once.parts_gib["fsdp: whole layer gradients"] == pytest.approx(sum(layers) * 2 / GIB)
    # A model whose layers outweigh its embeddings (unlike this tiny one): the advice names the key.
    parts = {**reduced_once.parts_gib, "fsdp: whole layer gradients": 10 * reduced_once.total_gib}
    recompute = RecomputeAdvice(layers=2, fitting=None, cost_all=recompute_cost(1.0))
    advice = advice_for(once, MemoryPlan(1, 1, parts, budget_gib=1e-4, processes=4, sharded=True), recompute, 4, True)
    assert advice[0].startswith("train.reduce_each_micro_batch: true")


def test_the_plan_counts_a_frozen_reference_or_teacher_beside_the_policy(tiny_llama_dir, teacher_dir, tmp_path):
    """dpo with full fine-tuning holds a frozen copy of the model (sharded alike under FSDP); with LoRA the
    reference is the model with its adapters off, and with cache_reference there is none; distill holds its
    teacher."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", preference_records(2))
    model = load_model(run_config(tiny_llama_dir, pairs, tmp_path / "m").model, "sft")
    total = sum(parameter.numel() for parameter in model.parameters())
    in_layers = sum(parameter.numel() for layer in decoder_layers(model) for parameter in layer.parameters())

    def plan(method: dict, processes: int = 1, **train) -> dict[str, float]:
        config = run_config(tiny_llama_dir, pairs, tmp_path / "run", task="dpo", method=method, train=train)
        return plan_memory(config, on_gpu=False, processes=processes).parts_gib

    full = plan({"name": "full"})
    assert full["reference copy (frozen)"] == pytest.approx(total * 4 / GIB) == full["weights"]
    assert plan({"name": "full"}, processes=4, sharding="fsdp")["reference copy (frozen)"] == pytest.approx(
        (total - in_layers * 3 / 4) * 4 / GIB)
    assert "reference copy (frozen)" not in plan({"name": "lora", "r": 4})
    assert "reference copy (frozen)" not in plan({"name": "full"}, cache_reference=True)

    chats = write_jsonl(tmp_path / "chats.jsonl", chat_records(2))
    distill = run_config(tiny_llama_dir, chats, tmp_path / "d", task="distill", objective={"teacher": str(teacher_dir)})
    teacher = load_model(run_config(teacher_dir, chats, tmp_path / "t").model, "sft")
    assert plan_memory(distill, on_gpu=False).parts_gib["teacher (frozen)"] == pytest.approx(
        sum(parameter.numel() for parameter in teacher.parameters()) * 4 / GIB)


@pytest.mark.parametrize("task", ["dpo", "orpo", "reward"])
def test_a_pair_counts_both_of_its_rows(task, tiny_llama_dir, chat_file, tmp_path):
    """A pair batch holds each pair's chosen and rejected rows (collate_pairs): at most twice an sft record's
    activations (its sides may share their prompt's, not more), and, where a pair may run as one row (SDPA), that
    row's (W, W) attention mask, kept for the backward, at the longest W the layout takes."""
    from transformers import AutoConfig

    from tunesmith.objectives.branched_rows import forward_flops, longest_accepted_row

    pairs = write_jsonl(tmp_path / "pairs.jsonl", preference_records(2))

    def activations(task: str, data, attention: str = "sdpa") -> float:
        config = run_config(tiny_llama_dir, data, tmp_path / task, task=task, data={"max_length": 64},
                            model={"name": str(tiny_llama_dir), "attn_implementation": attention},
                            train={"batch_size": 2, "parallel_rows": False})
        return plan_memory(config, on_gpu=False).parts_gib["activations"] * GIB

    model_config = AutoConfig.from_pretrained(tiny_llama_dir)
    width = longest_accepted_row(model_config, 2, 64)
    assert 64 < width <= 128 and forward_flops(model_config, 1, width) < forward_flops(model_config, 2, 64)
    assert width == 128 or forward_flops(model_config, 1, width + 1) >= forward_flops(model_config, 2, 64)
    assert activations(task, pairs, "eager") == pytest.approx(2 * activations("sft", chat_file, "eager"))
    # sft's padded rows keep SDPA's float copy of their boolean (64, 64) mask in each layer (64 x 4 bytes a token);
    # a branched row keeps its float mask once for all the layers.
    layers = model_config.num_hidden_layers
    sft_without_mask_copies = activations("sft", chat_file) - 2 * 64 * layers * 64 * 4
    assert activations(task, pairs) == pytest.approx(2 * sft_without_mask_copies + 2 * width**2 * 4)


@pytest.mark.parametrize("method", [{"name": "full"}, {"name": "lora", "r": 4}])
def test_model_flops_per_token_count_every_matmul_weight(method, tiny_llama_dir, chat_file, tmp_path):
    config = run_config(tiny_llama_dir, chat_file, tmp_path / "run", method=method)
    model = METHODS.get(config.method.name).apply(load_model(config.model, "sft"), config.method, "sft")
    matmuls = [module for module in model.modules() if isinstance(module, torch.nn.Linear)]
    weights = sum(module.weight.numel() for module in matmuls)  # the tied head is one of them
    trainable = sum(module.weight.numel() for module in matmuls if module.weight.requires_grad)
    layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    expected = 4 * weights + 2 * trainable + 12 * layers * hidden * 100
    assert model_flops_per_token(config, record_length=100) == pytest.approx(expected)
    if method["name"] == "full":
        assert trainable == weights  # 6N


def test_model_flops_per_token_count_the_experts_each_token_runs_through(tiny_moe_dirs, chat_file, tmp_path):
    """A mixture of experts: 6 FLOPs per token for each 2-D weight (the router's too), and for the experts' 3-D
    weights only the share a token runs through, 2 of 8 experts; torch's FlopCounterMode agrees on the 2-D part
    (its count leaves out the grouped matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    config = run_config(tiny_moe_dirs["qwen3_moe"], chat_file, tmp_path / "run", method={"name": "full"})
    model = load_model(config.model, "sft")
    matrices = sum(parameter.numel() for parameter in model.parameters() if parameter.ndim == 2)
    experts = sum(parameter.numel() for parameter in model.parameters() if parameter.ndim == 3)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(input_ids=torch.zeros((1, 100), dtype=torch.long))
    assert counter.get_flop_counts()["Global"][torch.ops.aten.mm] == 2 * matrices * 100  # the tied head included
    layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    expected = 6 * (matrices + experts * 2 / 8) + 12 * layers * hidden * 100
    assert model_flops_per_token(config, record_length=100) == pytest.approx(expected)


def test_host_memory_while_loading_follows_how_the_loop_loads(tiny_llama_dir, chat_file, tmp_path):
    """bfloat16 files trained in float32: each process converts the whole model, except a sharded full fine-tuning
    run, which loads them as stored and converts one layer at a time (the parts left whole, one layer); files
    already in the training dtype cost their shared pages only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bf16_dir = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16).save_pretrained(bf16_dir)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(bf16_dir)
    model = load_model(run_config(tiny_llama_dir, chat_file, tmp_path / "m").model, "sft")
    layers = [sum(parameter.numel() for parameter in layer.parameters()) for layer in decoder_layers(model)]
    total = sum(parameter.numel() for parameter in model.parameters())

    def loading(method: str, sharding: str, model_dir=bf16_dir, offload: bool = False):
        config = run_config(model_dir, chat_file, tmp_path / "run", model={"dtype": "float32"},
                            method={"name": method}, train={"sharding": sharding, "cpu_offload": offload})
        return plan_memory(config, on_gpu=True, processes=4).loading

    sharded = loading("full", "fsdp")
    assert sharded.as_stored
    assert sharded.private_gib == pytest.approx((total - sum(layers) + max(layers)) * 4 / GIB)
    assert sharded.shared_gib == pytest.approx(total * 2 / GIB)  # the bfloat16 files
    replicated = loading("full", "none")
    assert not replicated.as_stored and replicated.private_gib == pytest.approx(total * 4 / GIB)
    offloaded = loading("full", "fsdp", offload=True)
    assert offloaded.private_gib == pytest.approx(sharded.private_gib + sum(layers) / 4 * 4 / GIB)
    assert loading("full", "fsdp", model_dir=tiny_llama_dir).private_gib == 0  # float32 files: nothing converted


def test_host_memory_while_loading_counts_experts_stacked_from_per_expert_tensors(tiny_moe_dirs, chat_file,
                                                                                   tmp_path):
    """A mixture of experts' checkpoint holds a tensor per expert, which loading stacks into 3-D weights in the
    process's own memory, whatever the dtype: those are private, the other weights the files' shared pages."""
    folder = tiny_moe_dirs["qwen3_moe"]
    model = load_model(run_config(folder, chat_file, tmp_path / "m").model, "sft")
    experts = sum(parameter.numel() for parameter in model.parameters() if parameter.ndim == 3)
    assert experts == 2 * 8 * 3 * 32 * 64
    config = run_config(folder, chat_file, tmp_path / "run", method={"name": "lora", "r": 4})
    assert plan_memory(config, on_gpu=False).loading.private_gib == pytest.approx(experts * 4 / GIB)


def test_loss_memory_follows_the_loss_path_and_the_row_threads(tiny_llama_dir, chat_file, tmp_path, monkeypatch):
    """A plain head's fused loss holds one float32 (C, V) buffer; in bf16 the bf16 logits and a float32 copy; a
    LoRA on the head takes the checkpointed chunks: float32 logits and their gradient. Parallel rows (CPU) run
    a loss chunk per thread and hold one more copy of the gradients per extra thread."""
    from transformers import AutoConfig

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    vocab = AutoConfig.from_pretrained(tiny_llama_dir).vocab_size
    positions = 2 * 64  # batch 2 x max_length 64, one chunk

    def plan(parallel_rows: bool | None = False, **sections):
        config = run_config(tiny_llama_dir, chat_file, tmp_path / "run", data={"max_length": 64},
                            train={"batch_size": 2, "parallel_rows": parallel_rows},
                            objective={"loss_chunk_tokens": None}, **sections)
        return plan_memory(config, on_gpu=False)

    assert plan().parts_gib["logits + loss"] * GIB == positions * vocab * 4
    bf16 = plan(model={"name": str(tiny_llama_dir), "dtype": "bfloat16"})
    assert bf16.parts_gib["logits + loss"] * GIB == positions * vocab * (2 + 4)
    on_head = plan(method={"name": "lora", "r": 4, "target_modules": ["q_proj", "lm_head"]})
    assert on_head.parts_gib["logits + loss"] * GIB == positions * vocab * 4 * 3

    lora = {"name": "lora", "r": 2, "target_modules": ["q_proj"]}
    sequential, parallel = plan(method=lora), plan(parallel_rows=True, method=lora)
    assert parallel.parts_gib["logits + loss"] == sequential.parts_gib["logits + loss"]  # 2 x half the positions
    assert parallel.parts_gib["parallel rows: gradient copies"] * GIB == sequential.trainable_params * 4
    assert "parallel rows: gradient copies" not in sequential.parts_gib
    assert "parallel rows: gradient copies" not in plan(parallel_rows=None).parts_gib  # auto: full fine-tuning
    # LoRA's dropout masks come from a seed per part (training/keyed_dropout.py): auto splits its rows too
    assert "parallel rows: gradient copies" in plan(parallel_rows=None, method=lora | {"dropout": 0.1}).parts_gib


def test_lora_dropout_holds_each_dropped_input_and_its_mask(tiny_llama_dir, chat_file, tmp_path):
    """Each LoRA linear with dropout keeps its own dropped copy of its input for A's gradient, in place of the input
    it shared with its neighbours (q and k read the same one), and, in float32 on a CPU and on a GPU, a bool mask;
    in every layer (in one at a time where every layer is recomputed). The layers' totals are checked against
    autograd in test_layer_activations_are_what_autograd_keeps."""
    lora = {"name": "lora", "r": 2, "target_modules": ["q_proj", "k_proj", "down_proj"]}
    tokens, layers = 2 * 64, 2  # batch 2 x max_length 64

    def dropout_bytes(dropout: float, recompute: bool = False, dtype: str = "auto", on_gpu: bool = False) -> float:
        def activations(p: float) -> float:
            config = run_config(tiny_llama_dir, chat_file, tmp_path / "run", data={"max_length": 64},
                                model={"name": str(tiny_llama_dir), "dtype": dtype}, method=lora | {"dropout": p},
                                train={"batch_size": 2, "gradient_checkpointing": recompute})
            return plan_memory(config, on_gpu=on_gpu).parts_gib["activations"] * GIB
        return activations(dropout) - activations(0.0)

    shared, dropped = 64 + 128, 64 + 64 + 128  # q and k share the hidden-sized input; down_proj reads the MLP's
    assert dropout_bytes(0.1) == pytest.approx(layers * tokens * ((dropped - shared) * 4 + dropped))
    assert dropout_bytes(0.1, recompute=True) == pytest.approx(tokens * ((dropped - shared) * 4 + dropped))
    # in half precision on the CPU the mask is made again in the backward; CUDA's kernel keeps it
    assert dropout_bytes(0.1, dtype="bfloat16") == pytest.approx(layers * tokens * (dropped - shared) * 2)
    assert dropout_bytes(0.1, dtype="bfloat16", on_gpu=True) == pytest.approx(
        layers * tokens * ((dropped - shared) * 2 + dropped))
    assert dropout_bytes(0.0) == 0


def test_loha_and_lokr_deltas_are_kept_in_every_layer_and_row_thread(tiny_llama_dir, chat_file, tmp_path):
    """LoHa and LoKr build each adapted linear's weight delta in the forward and run F.linear(x, delta), which
    keeps the delta (float32, as peft keeps its adapters) for the input's gradient: a layer's matrices' worth per
    layer whatever the tokens, and again in each row thread's forward (train.parallel_rows)."""
    from tunesmith.plan import parameter_counts

    def activations(method: str, parallel: bool) -> tuple[float, object]:
        config = run_config(tiny_llama_dir, chat_file, tmp_path / "run", method={"name": method},
                            train={"batch_size": 2, "parallel_rows": parallel})
        return plan_memory(config, on_gpu=False).parts_gib["activations"] * GIB, config

    for method in ("loha", "lokr"):
        sequential, config = activations(method, parallel=False)
        shape = parameter_counts(config)[0].layer_shape
        assert shape.delta_weights == 64 * (64 + 32 + 32 + 64) + 3 * 64 * 128  # q, k, v, o; gate, up, down
        assert activations(method, parallel=True)[0] - sequential == pytest.approx(2 * shape.delta_weights * 4)
    lora_shape = parameter_counts(run_config(tiny_llama_dir, chat_file, tmp_path / "run",
                                             method={"name": "lora"}))[0].layer_shape
    assert lora_shape.delta_weights == 0  # LoRA runs x through A and B: no weight-sized delta


def test_distillation_counts_its_chunks_and_the_teacher_side(tiny_llama_dir, chat_file, tmp_path):
    """distill: each chunk holds several (C, V) float32 buffers (more for reverse KL and jsd, fewer against the
    teacher's top-k), whatever the precision, and the teacher's side is held for the whole micro-batch: its (N, H_t)
    hidden states, in the dtype it loads in (float32 on the CPU, bf16 on a GPU)."""
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(tiny_llama_dir)
    vocab, hidden = model_config.vocab_size, model_config.hidden_size
    positions = 2 * 64  # batch 2 x max_length 64

    def loss_bytes(mixed_precision: str = "no", on_gpu: bool = False, cached: bool = False, **objective) -> float:
        config = run_config(tiny_llama_dir, chat_file, tmp_path / "run", task="distill", data={"max_length": 64},
                            train={"batch_size": 2, "parallel_rows": False, "mixed_precision": mixed_precision,
                                   "cache_reference": cached},
                            objective={"teacher": str(tiny_llama_dir), **objective})
        return plan_memory(config, on_gpu=on_gpu).parts_gib["logits + loss"] * GIB

    teacher_side = positions * hidden * 4
    assert loss_bytes(loss_chunk_tokens=16) == 16 * 10 * vocab * 4 + teacher_side
    assert loss_bytes(loss_chunk_tokens=None) == positions * 10 * vocab * 4 + teacher_side
    assert loss_bytes(loss_chunk_tokens=16, divergence="reverse_kl") == 16 * 11 * vocab * 4 + teacher_side
    assert loss_bytes(loss_chunk_tokens=16, divergence="jsd") == 16 * 15 * vocab * 4 + teacher_side
    assert loss_bytes(loss_chunk_tokens=16, teacher_top_k=8) == 16 * 4 * vocab * 4 + teacher_side
    # train.cache_reference: the stored top-k values and ids, (N, k) each, in place of the teacher's states
    assert loss_bytes(loss_chunk_tokens=16, teacher_top_k=8, cached=True) == 16 * 4 * vocab * 4 + positions * 8 * 12
    # the teacher runs outside the student's autocast: float32 as it loads on the CPU, bf16 on a GPU
    assert loss_bytes(loss_chunk_tokens=16, mixed_precision="bf16") == 16 * 10 * vocab * 4 + teacher_side
    assert loss_bytes(loss_chunk_tokens=16, on_gpu=True) == 16 * 10 * vocab * 4 + teacher_side // 2


def test_a_soft_capped_teacher_side_is_its_whole_logits(tiny_llama_dir, chat_file, tmp_path):
    """A teacher whose logits need its full forward (soft-capped head) gives the (N, V) logits, or its top-k."""
    from types import SimpleNamespace

    from tunesmith.plan import teacher_side_bytes

    capped = SimpleNamespace(hidden_size=64, vocab_size=1000, final_logit_softcapping=30.0)
    plain = SimpleNamespace(hidden_size=64, vocab_size=1000)
    config = run_config(tiny_llama_dir, chat_file, tmp_path / "run", task="distill",
                        objective={"teacher": str(tiny_llama_dir)})
    top_k = config.objective.model_copy(update={"teacher_top_k": 8})
    assert teacher_side_bytes(10, plain, config.objective, 2) == 10 * 64 * 2
    assert teacher_side_bytes(10, capped, config.objective, 2) == 10 * 1000 * 2
    assert teacher_side_bytes(10, capped, top_k, 4) == 10 * 8 * 12


def test_online_rl_counts_every_sampled_sequence_and_its_log_prob_chunks(tiny_llama_dir, chat_file, tmp_path):
    """grpo / ppo: the activations of each prompt once and batch_size x group_size completions after it (of every
    sequence of prompt + completion where a group's prompt cannot run once: prefix tuning; with recomputed layers,
    of each group as one row and its mask, unless the row's attention would cost more), and one chunk of
    completion log-probs (float32 logits, their log-softmax and gradient) at a time."""
    from transformers import AutoConfig

    from tunesmith.plan import layer_activations, parameter_counts

    vocab = AutoConfig.from_pretrained(tiny_llama_dir).vocab_size
    layers = AutoConfig.from_pretrained(tiny_llama_dir).num_hidden_layers

    def config_of(task: str = "grpo", method: str = "lora", train: dict | None = None, **objective):
        return run_config(tiny_llama_dir, chat_file, tmp_path / "run", task=task, data={"max_length": 32},
                          method={"name": method}, train={"batch_size": 2, **(train or {})},
                          objective={"max_new_tokens": 16, **objective})

    def plan(*args, **kwargs):
        return plan_memory(config_of(*args, **kwargs), on_gpu=False)

    def per_token(row_length: int, recomputed: int = 0, branched: bool = False, **kwargs) -> float:
        """What the layers keep per token in rows of `row_length` (plan.layer_activations), in GiB."""
        config = config_of(**kwargs)
        counts, model_config = parameter_counts(config)
        kept = layer_activations(config, counts, model_config, False, row_length, branched)
        return kept.bytes_per_token(recomputed) / GIB

    four, eight = plan(group_size=4), plan(group_size=8)
    padded = per_token(32 + 16)  # prompts and completions in rows padded to the longest
    assert four.parts_gib["activations"] == pytest.approx(padded * (2 * 32 + 2 * 4 * 16))  # each prompt once
    assert eight.parts_gib["activations"] == pytest.approx(padded * (2 * 32 + 2 * 8 * 16))
    prefix_four, prefix_eight = (plan(group_size=group, method="prefix").parts_gib["activations"] for group in (4, 8))
    assert prefix_eight == pytest.approx(prefix_four * (2 * 8 * 48) / (2 * 4 * 48))  # every sequence whole
    checkpointing = {"gradient_checkpointing": True, "checkpoint_layers": 1}
    recomputed = plan(group_size=4, train=checkpointing)
    group_row = 32 + 4 * 16  # recomputed layers: each group as one row, its (W, W) mask kept (float32 here)
    assert recomputed.parts_gib["activations"] * GIB == pytest.approx(
        per_token(group_row, 1, True, group_size=4, train=checkpointing) * GIB * 2 * group_row + 2 * group_row**2 * 4)
    long_completions = plan(group_size=4, max_new_tokens=4096, train={"gradient_checkpointing": True})
    every_copy = long_completions.parts_gib["activations"] / (2 * 4 * (32 + 4096))  # attention outweighs the rows
    assert every_copy == pytest.approx(per_token(32 + 4096, layers, group_size=4, max_new_tokens=4096,
                                                 train={"gradient_checkpointing": True}))
    completions = 2 * 4 * 16
    assert plan(group_size=4, loss_chunk_tokens=None).parts_gib["logits + loss"] * GIB == completions * vocab * 12
    assert four.parts_gib["logits + loss"] * GIB == completions * vocab * 12  # default 512 > 128 positions
    assert plan(group_size=4, loss_chunk_tokens=50).parts_gib["logits + loss"] * GIB == 50 * vocab * 12
    assert plan("ppo", group_size=1, loss_chunk_tokens=8).parts_gib["logits + loss"] * GIB == 8 * vocab * 12


@pytest.mark.parametrize("method", [
    {"name": "lora", "r": 4, "dropout": 0.0}, {"name": "lora", "r": 4, "dropout": 0.1}, {"name": "full"},
    {"name": "ia3"}, {"name": "prompt", "num_virtual_tokens": 4}, {"name": "freeze", "layers": 1},
])
def test_weight_casts_under_autocast_count_what_the_loop_keeps(method, tiny_llama_dir, chat_file, tmp_path,
                                                               monkeypatch):
    import tunesmith.training.loop as loop
    from tunesmith.plan import parameter_counts

    kept = record_kept_casts(monkeypatch)
    amp = {"max_steps": 1, "mixed_precision": "bf16", "parallel_rows": False}  # float32 weights, bf16 autocast
    config = run_config(tiny_llama_dir, chat_file, tmp_path / "run", method=method, train=amp)
    loop.train(config)
    counts, _ = parameter_counts(config)
    # lora, ia3, prompt: every frozen linear and the tied head; full: nothing frozen; freeze: the head (layer 0 is
    # below every trained layer: its casts are transient)
    assert [sum(cast.numel() for cast in casts) for casts in kept] == [counts.cast_once]
    casts = plan_memory(config, on_gpu=False).parts_gib["weight casts (autocast)"]
    assert casts == pytest.approx(counts.in_matrices * 2 / GIB)  # tied head: every matrix is a matmul's, one thread
    for others in ({"mixed_precision": "no"}, {"gradient_checkpointing": True}):
        other = run_config(tiny_llama_dir, chat_file, tmp_path / "other", method=method, train=amp | others)
        assert "weight casts (autocast)" not in plan_memory(other, on_gpu=False).parts_gib


def saved_in_layers(config, monkeypatch) -> tuple[int, list[int]]:
    """Bytes autograd keeps inside the decoder layers in the first forward of a one-step training run through the
    loop (parameters, their kept autocast casts and the attention mask left out: the plan counts those apart), and
    the lengths of the records that forward attended over (position ids restart at each record of a packed row)."""
    import tunesmith.training.loop as loop
    from tunesmith.training import train, weight_casts
    from tunesmith.training.packed_attention import record_spans

    saved: dict[int, int] = {}  # storage address -> bytes
    lengths: list[int] = []
    state = {"layer": 0, "hooks": None, "excluded": set()}
    load = loop.load_run_model

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in state["excluded"]:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    def load_and_watch(*args, **kwargs):
        model, *rest = load(*args, **kwargs)
        layers = decoder_layers(model)

        def before(layer, args, kwargs):
            if state["layer"] == 0 and not lengths:
                state["excluded"] = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}
                if isinstance(kwargs.get("attention_mask"), torch.Tensor):  # the plan counts the mask once apart
                    state["excluded"].add(kwargs["attention_mask"].untyped_storage().data_ptr())
                hidden = args[0] if args else kwargs["hidden_states"]
                positions = kwargs["position_ids"].expand(hidden.shape[0], -1)  # (1, T) for rows that are not packed
                for row in positions:
                    lengths.extend(end - start for start, end in record_spans(row))
            if state["layer"] < len(layers):
                state["hooks"] = torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor)
                state["hooks"].__enter__()

        def after(layer, args, kwargs, output):
            if state["hooks"] is not None:
                state["hooks"].__exit__(None, None, None)
                state["hooks"] = None
                state["layer"] += 1
                if state["layer"] == len(layers):  # the kept casts exist by now
                    for _, _, _, cast in (weight_casts._casts or {}).values():
                        saved.pop(cast.untyped_storage().data_ptr(), None)

        for layer in layers:
            layer.register_forward_pre_hook(before, with_kwargs=True)
            layer.register_forward_hook(after, with_kwargs=True)
        return (model, *rest)

    monkeypatch.setattr(loop, "load_run_model", load_and_watch)
    train(config)
    return sum(saved.values()), lengths


@pytest.mark.parametrize(("method", "model", "train", "packing"), [
    ({"name": "full"}, {}, {}, True),
    ({"name": "full"}, {}, {}, False),  # padded rows: transformers' SDPA under a mask repeats k and v per head
    ({"name": "lora", "r": 8}, {}, {}, True),
    ({"name": "full"}, {"dtype": "bfloat16"}, {}, True),  # half precision on the CPU: the matmul kernel's probabilities
    ({"name": "lora", "r": 8}, {"dtype": "bfloat16"}, {}, True),  # bfloat16 weights: autocast (auto) like the next
    # Without autocast peft runs its float32 adapters on a float32 copy of each adapted linear's input.
    ({"name": "lora", "r": 8}, {"dtype": "bfloat16"}, {"mixed_precision": "no"}, True),
    ({"name": "lora", "r": 8}, {}, {"mixed_precision": "bf16"}, True),  # autocast: each linear keeps its input's cast
    ({"name": "freeze", "layers": 1}, {}, {}, True),  # the layer below the trained one keeps nothing
    ({"name": "prefix", "num_virtual_tokens": 4}, {}, {}, False),  # frozen linears keep no inputs
    # LoRA dropout: each adapted linear keeps its dropped copy of the input (or its cast) and the mask
    ({"name": "lora", "r": 8, "dropout": 0.1}, {}, {}, True),
    ({"name": "lora", "r": 8, "dropout": 0.1}, {}, {"mixed_precision": "bf16"}, True),
    ({"name": "lora", "r": 8, "dropout": 0.1}, {"dtype": "bfloat16"}, {"mixed_precision": "no"}, True),
    ({"name": "loha"}, {}, {}, True),  # F.linear(x, delta weight): each layer keeps its weight-sized deltas
    ({"name": "lokr"}, {}, {"mixed_precision": "bf16"}, True),  # ... or their casts under autocast
], ids=["full", "full-padded", "lora", "full-bf16", "lora-bf16", "lora-bf16-no-autocast", "lora-autocast", "freeze",
        "prefix", "lora-dropout", "lora-dropout-autocast", "lora-dropout-bf16-no-autocast", "loha", "lokr-autocast"])
def test_layer_activations_are_what_autograd_keeps(method, model, train, packing, tiny_llama_dir, tmp_path,
                                                    monkeypatch):
    """The plan's bytes per token of each decoder layer (plan.layer_bytes_per_token), times the layers a gradient
    flows into, with what each keeps whatever the tokens (LoHa's and LoKr's deltas), equal what autograd keeps
    inside the layers in a real training step, to 5%: the rest (RoPE's tables, the norms' (N, 1) statistics) is
    small. The record lengths of the step stand for `row_length`."""
    planned, saved = planned_and_saved(tiny_llama_dir, method, model, train, packing, tmp_path, monkeypatch)
    assert planned == pytest.approx(saved, rel=0.05)


def planned_and_saved(folder, method, model, train, packing, tmp_path, monkeypatch) -> tuple[float, int]:
    """The plan's bytes for the decoder layers of a one-step run of the model in `folder` (per token of each
    record, and per layer), and what autograd keeps in them (`saved_in_layers`)."""
    from tunesmith.plan import layer_activations, parameter_counts

    chats = write_jsonl(tmp_path / "chats.jsonl", chat_records(12))
    config = run_config(folder, chats, tmp_path / "run", method=method, model={"name": str(folder), **model},
                        data={"packing": packing}, train={"batch_size": 2, "max_steps": 1, "parallel_rows": False,
                                                          **train})
    saved, lengths = saved_in_layers(config, monkeypatch)
    counts, model_config = parameter_counts(config)
    planned = sum(length * layer_activations(config, counts, model_config, False, length).bytes_per_token(0)
                  for length in lengths)
    planned += layer_activations(config, counts, model_config, False, max(lengths)).bytes_for(0, 0)  # per layer
    return planned, saved


ATTENTION_ONLY = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.mark.parametrize(("architecture", "method", "model", "train"), [
    ("qwen3_moe", {"name": "full"}, {}, {}),
    ("qwen3_moe", {"name": "full"}, {"dtype": "bfloat16"}, {}),
    # all-linear reaches the experts' 3-D weights and the router's (peft's ParamWrapper): each forward merges them
    ("qwen3_moe", {"name": "lora", "r": 8}, {}, {}),
    ("qwen3_moe", {"name": "lora", "r": 8}, {}, {"mixed_precision": "bf16"}),  # the experts still run in float32
    ("qwen3_moe", {"name": "lora", "r": 8}, {"dtype": "bfloat16"}, {}),  # factors cast to bfloat16 to merge
    ("qwen3_moe", {"name": "lora", "r": 8, "target_modules": ATTENTION_ONLY}, {}, {}),  # frozen experts, router
    ("qwen2_moe", {"name": "full"}, {}, {}),  # a shared expert beside the routed ones, under a sigmoid gate
    ("qwen2_moe", {"name": "lora", "r": 8}, {}, {"mixed_precision": "bf16"}),
], ids=["qwen3-full", "qwen3-full-bf16", "qwen3-lora", "qwen3-lora-autocast", "qwen3-lora-bf16", "qwen3-lora-attention",
        "qwen2-full", "qwen2-lora-autocast"])
def test_mixture_of_experts_layers_are_what_autograd_keeps(architecture, method, model, train, tiny_moe_dirs, tmp_path,
                                                          monkeypatch):
    """A mixture of experts' layers as the plan counts them (plan.experts_bytes_per_token: every token through
    its top-k experts, in transformers' grouped matmuls; LoRA's merged expert weights per layer) equal what
    autograd keeps in a real training step, to 5%. Counted as a dense MLP of config.intermediate_size they came to
    0.3-0.6 of it."""
    planned, saved = planned_and_saved(tiny_moe_dirs[architecture], method, model, train, True, tmp_path,
                                       monkeypatch)
    assert planned == pytest.approx(saved, rel=0.05)


def test_layers_below_the_first_trained_one_keep_nothing(tiny_llama_dir, chat_file, tmp_path):
    """freeze trains the top layers: no gradient flows below them, so the layers beneath keep no activations, and
    recomputing them (train.checkpoint_layers counts from the bottom) saves nothing and costs nothing."""
    def plan(method: dict, **train):
        config = run_config(tiny_llama_dir, chat_file, tmp_path / "run", method=method, train={"batch_size": 2,
                                                                                               **train})
        return plan_memory(config, on_gpu=False).parts_gib["activations"]

    assert plan({"name": "freeze", "layers": 1}) == pytest.approx(plan({"name": "full"}) / 2)  # 1 of the 2 layers
    assert plan({"name": "freeze", "layers": 1}, gradient_checkpointing=True, checkpoint_layers=1) == pytest.approx(
        plan({"name": "freeze", "layers": 1}))

    kept = LayerActivations(layers=10, first_trained=6, layer_bytes=100.0, input_bytes=4.0)
    assert kept.bytes_per_token(0) == kept.bytes_per_token(6) == 4 * 100
    assert kept.bytes_per_token(8) == 2 * 100 + 2 * 4  # two trained layers recomputed: their inputs kept
    assert kept.bytes_per_token(10) == 4 * 4 + 100  # every trained layer recomputed: one at a time
    advice = RecomputeAdvice(layers=10, fitting=8, cost_all=0.5, untrained=6).line()
    assert "train.checkpoint_layers: 8" in advice and "~10% more compute" in advice and "every layer: ~20%" in advice


def test_train_notes_a_run_the_plan_puts_over_the_free_memory(tiny_llama_dir, chat_file, tmp_path, monkeypatch,
                                                              capsys):
    """Before loading anything, `tunesmith train` compares the plan's estimate with the memory the device has free
    and notes a run that may not fit, with the first change the plan advises; the run still goes on (an upper
    bound is no reason to refuse). A run that fits prints nothing of it."""
    import tunesmith.training.memory as memory
    from tunesmith.plan import device_memory_note
    from tunesmith.training import train

    config = run_config(tiny_llama_dir, chat_file, tmp_path / "run", train={"max_steps": 1, "batch_size": 2})
    assert device_memory_note(config, torch.device("cpu")) is None  # megabytes against this machine's GiBs
    train(config)
    assert "may run out of memory" not in capsys.readouterr().err

    monkeypatch.setattr(memory, "available_mb", lambda: 1.0)  # 1 MB free
    note = device_memory_note(config, torch.device("cpu"))
    assert note.startswith("note: this run needs an estimated") and "MiB per device, more than the 1 MiB" in note
    assert "advises first: train." in note or "advises first: method." in note or "advises first: data." in note
    assert "more than the 256 KiB" in device_memory_note(config, torch.device("cpu"), processes_on_node=4)
    result = train(run_config(tiny_llama_dir, chat_file, tmp_path / "run2", train={"max_steps": 1, "batch_size": 2}))
    assert result.exit_code == 0 and result.summary["steps"] == 1
    assert capsys.readouterr().err.count("may run out of memory") == 1

    # A model the plan cannot read still trains: the note says there is no estimate.
    import tunesmith.plan as plan_module

    def unreadable(*args, **kwargs):
        raise ValueError("Unrecognized configuration class")

    monkeypatch.setattr(plan_module, "plan_memory", unreadable)
    result = train(run_config(tiny_llama_dir, chat_file, tmp_path / "run3", train={"max_steps": 1, "batch_size": 2}))
    assert result.exit_code == 0 and result.summary["steps"] == 1
    assert "note: no memory estimate for this run (ValueError: Unrecognized configuration class)" in (
        capsys.readouterr().err)



def test_the_plan_advises_lora_on_the_attention_where_merged_experts_weigh_most(tiny_moe_dirs, tmp_path):
    """LoRA on a mixture of experts' weights keeps each layer's merged W + BA of all its experts until the
    backward (with SmolLM2-sized ranks on Qwen3-30B-A3B: 54 GiB in bf16, docs/scaling.md). Where that is over a
    fifth of the plan, the advice names LoRA on the attention alone, with the memory it frees; with rows in two
    threads each holds its own merged weights."""
    chats = write_jsonl(tmp_path / "chats.jsonl", chat_records(4))

    def advice(max_length: int, **train) -> list[str]:
        config = run_config(tiny_moe_dirs["qwen3_moe"], chats, tmp_path / "run", method={"name": "lora", "r": 4},
                            data={"max_length": max_length, "packing": True}, train={"batch_size": 1, **train})
        return plan_memory(config, budget_gib=1e-6, on_gpu=False).advice

    merged = 2 * 8 * (64 * 64 + 64 * 32) * 4  # 2 layers, 8 experts' gate_up (64 x 64) and down (64 x 32), float32
    line = next(line for line in advice(16) if line.startswith('method.target_modules: ["q_proj", "k_proj"'))
    assert line.endswith(f"W + BA until the backward, {gib_text(merged / GIB)})") and "384 KiB" in line
    assert not any(line.startswith("method.target_modules") for line in advice(64))  # per-token activations outweigh


def test_the_plan_reads_transposed_experts_and_names_an_attention_the_model_lacks(chat_file, tmp_path):
    """GPT-OSS keeps its experts transposed (experts x in x out) and has no SDPA attention in transformers: the
    plan reads its experts' width and count from the weights' shapes, and SDPA (the default) is a config error
    naming model.attn_implementation, not transformers' traceback."""
    import json

    from tunesmith.errors import ConfigError
    from tunesmith.plan import parameter_counts

    folder = tmp_path / "gpt-oss"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": 64, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 512, "sliding_window": 16,
        "layer_types": ["sliding_attention", "full_attention"]}))
    config = run_config(folder, chat_file, tmp_path / "run", method={"name": "full"})
    with pytest.raises(ConfigError, match="^model.attn_implementation: .* cannot run 'sdpa' attention"):
        plan_memory(config, on_gpu=True)
    config = run_config(folder, chat_file, tmp_path / "run", method={"name": "full"},
                        model={"name": str(folder), "attn_implementation": "eager"})
    experts = parameter_counts(config)[0].layer_shape.experts
    assert (experts.count, experts.top_k, experts.width, experts.trained) == (8, 2, 48, True)
    assert plan_memory(config, on_gpu=True).total_gib > 0
