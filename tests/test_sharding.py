"""FSDP: two processes with sharded decoder layers (gloo on CPU), launched by `tunesmith train` through the
accelerate config file the run config names, reach the weights of one unsharded process with the same global
batch; their checkpoint resumes on one process; bad accelerate configs are refused before any work."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import assert_same_weights, chat_records, preference_records, run_cli, write_jsonl

ACCELERATE_FSDP = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
fsdp_config:
  fsdp_version: 2
  fsdp_reshard_after_forward: true
main_process_port: {port}
mixed_precision: 'no'
num_machines: 1
num_processes: 2
use_cpu: true
"""


def write_config(tmp_path, model_dir, data, name: str, batch_size: int, method: str, extra: str = "",
                 output: str | None = None):
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"model: {{name: {model_dir}}}\n"
        f"data: {{train: {data}, eval_split: 0.2, max_length: 128, group_by_length: true}}\n"
        f"method: {{name: {method}}}\n"
        f"train: {{max_steps: 3, batch_size: {batch_size}, grad_accum: 2, lr: 1e-3, warmup: 0, eval_before: false, "
        f"seed: 3, save_every: 2, max_grad_norm: 0.5, eval_batch_size: 1{extra}}}\n"
        f"output_dir: {tmp_path / (output or name)}\n"
    )
    return path


def train(config, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunesmith.cli", "train", str(config), *options],
                          capture_output=True, text=True, timeout=600)


def losses(run_dir) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row]


@pytest.mark.parametrize("method, weights", [("full", "model"), ("lora", "adapter/adapter_model.safetensors")])
def test_two_sharded_processes_equal_one_process(tiny_llama_dir, tmp_path, method, weights):
    # 13 training records: global micro-batches of 4, 4, 4 and 1; for the last the second process runs a stand-in
    # weighted 0, so the collective forwards line up and no record is skipped.
    data = write_jsonl(tmp_path / "chats.jsonl", chat_records(16))
    # Full fine-tuning exports a model in several files: the sharded run gathers and writes them one by one.
    export = ", export_shard_size: 40KB" if method == "full" else ""
    single = write_config(tmp_path, tiny_llama_dir, data, "single", 4, method, export)
    assert train(single).returncode == 0
    port = 29540 + (method == "lora")
    launcher = tmp_path / "fsdp.yaml"
    launcher.write_text(ACCELERATE_FSDP.format(port=port))
    # Full fine-tuning also recomputes activations: each layer's recomputation gathers its weights again; it
    # reduce-scatters the gradients after each of a step's 2 micro-batches, LoRA after the last one only.
    options = (", gradient_checkpointing: true" if method == "full" else ", reduce_each_micro_batch: false") + export
    sharded = write_config(tmp_path, tiny_llama_dir, data, "sharded", 2, method,
                           f", accelerate_config: {launcher}{options}")
    two = train(sharded)
    assert two.returncode == 0, [line for line in two.stderr.splitlines() if "rror" in line][:5]

    summary = json.loads((tmp_path / "sharded" / "summary.json").read_text())
    assert (summary["processes"], summary["sharding"]) == (2, "fsdp")
    # The final evaluation: 3 held-out records in batches of 1, split 2 + 1 between the processes (the second
    # runs a spare batch: the sharded forwards are collective), the totals added: one process's metrics.
    evaluation = json.loads((tmp_path / "single" / "summary.json").read_text())["eval"]
    assert evaluation["eval_tokens"] > 0 and summary["eval"] == pytest.approx(evaluation, rel=1e-5)
    # Same losses (gradients summed, not averaged, across the shards; clipping on the global norm) and weights.
    assert losses(tmp_path / "sharded") == pytest.approx(losses(tmp_path / "single"), rel=1e-5)
    # AdamW turns float rounding in a near-zero gradient into ~1e-6 steps (a lost reduction moves weights ~lr).
    assert_same_weights(tmp_path / "single" / weights, tmp_path / "sharded" / weights, rtol=1e-4, atol=1e-5)

    # The sharded step-2 checkpoint (each process's own rows, tests/test_sharded_checkpoint.py): one unsharded
    # process (full) or two sharded ones again (lora: each reads its own rows) resume it to the same end.
    if method == "full":
        resumed = write_config(tmp_path, tiny_llama_dir, data, "resumed", 4, method, output="sharded")
    else:
        resumed = write_config(tmp_path, tiny_llama_dir, data, "resumed", 2, method,
                               f", accelerate_config: {launcher}{options}", output="sharded")
    one_more = train(resumed, "--resume")
    assert one_more.returncode == 0, one_more.stderr[-2000:]
    assert_same_weights(tmp_path / "single" / weights, tmp_path / "sharded" / weights, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("contents, message", [
    ("distributed_type: MEGATRON_LM\nnum_processes: 2\n", "MEGATRON_LM is not supported"),
    ("distributed_type: DEEPSPEED\ndeepspeed_config: {zero_stage: 3, offload_param_device: nvme}\n", "device nvme"),
    ("distributed_type: FSDP\nfsdp_config: {fsdp_version: [2}\n", "not valid YAML"),
    ("distributed_type: TPU\n", "TPU is not supported"),
])
def test_unsupported_accelerate_config_is_refused(capsys, tiny_llama_dir, tmp_path, contents, message):
    data = write_jsonl(tmp_path / "chats.jsonl", chat_records(4))
    launcher = tmp_path / "launcher.yaml"
    launcher.write_text(contents)
    config = write_config(tmp_path, tiny_llama_dir, data, "run", 2, "lora", f", accelerate_config: {launcher}")
    code, _, err = run_cli(capsys, "train", str(config))
    assert code == 2
    assert "train.accelerate_config" in err and message in err
    assert not (tmp_path / "run").exists()


def test_layers_give_back_their_gathered_weights_after_forward(one_process_group, tiny_llama_dir):
    """With reshard_after_forward, no layer keeps its whole weights between forward and backward (FSDP2
    registers the gathered ones as plain tensors while a layer is unsharded): the memory FSDP saves."""
    import torch
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM

    from tunesmith.models import decoder_layers
    from tunesmith.training.sharding import shard_layers

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    shard_layers(model, reshard_after_forward=True)
    model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits.sum().backward()  # the first step initialises FSDP
    model.model(input_ids=torch.tensor([[1, 2, 3, 4]]))  # a forward, as the LM loss calls it
    weights = [layer.mlp.up_proj.weight for layer in decoder_layers(model)]
    assert all(isinstance(weight, DTensor) for weight in weights)
    assert not isinstance(model.model.embed_tokens.weight, DTensor)  # replicated, still tied to the head
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_only_the_parts_left_whole_are_placed_after_sharding(one_process_group, tiny_llama_dir):
    """A sharded run sets up on the host and FSDP moves each layer to the device as it shards it; the rest
    (embeddings tied to the head, final norm, rotary table) is then placed on its own. The meta device
    stands in for a GPU here: only the parts outside the layers go there, and the head stays tied."""
    import torch
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM

    from tunesmith.training.sharding import place_unsharded, shard_layers

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    shard_layers(model, reshard_after_forward=True)
    place_unsharded(model, torch.device("meta"))
    parameters = dict(model.named_parameters())
    sharded = {name for name, parameter in parameters.items() if isinstance(parameter, DTensor)}
    assert sharded == {name for name in parameters if name.startswith("model.layers.")}
    assert all(parameters[name].to_local().device.type == "cpu" for name in sharded)
    assert all(parameter.is_meta for name, parameter in parameters.items() if name not in sharded)
    assert all(buffer.is_meta for buffer in model.model.rotary_emb.buffers())
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_float32_layers_are_gathered_in_bf16_and_reduced_into_float32_shards(one_process_group, tiny_llama_dir):
    """Under bf16 autocast, half_precision_gather gathers the layers in bf16 (what each linear sees inside the
    forward), keeps the shards and their gradients float32, and computes the loss and gradients of float32
    weights under autocast to bf16's precision; with gradient reduction off the shards get no gradient."""
    import torch
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM

    from tunesmith.models import decoder_layers
    from tunesmith.training.sharding import reduce_gradients, shard_layers

    batch = torch.randint(0, 100, (2, 16))

    def loss_and_gradients(model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        gradient = decoder_layers(model)[0].mlp.up_proj.weight.grad
        return loss.detach(), (gradient.full_tensor() if isinstance(gradient, DTensor) else gradient)

    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    sharded = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    shard_layers(sharded, reshard_after_forward=True, gather_dtype=torch.bfloat16)
    seen = []
    decoder_layers(sharded)[0].mlp.up_proj.register_forward_pre_hook(lambda module, _: seen.append(module.weight.dtype))
    expected_loss, expected_gradient = loss_and_gradients(plain)
    loss, gradient = loss_and_gradients(sharded)
    assert seen == [torch.bfloat16]
    assert decoder_layers(sharded)[0].mlp.up_proj.weight.dtype == torch.float32  # the shard itself
    assert gradient.dtype == torch.float32
    torch.testing.assert_close(loss, expected_loss, rtol=1e-2, atol=0)
    torch.testing.assert_close(gradient, expected_gradient, rtol=0.05, atol=1e-3)

    sharded.zero_grad(set_to_none=True)
    reduce_gradients(sharded, now=False)
    loss_and_gradients(sharded)
    assert decoder_layers(sharded)[0].mlp.up_proj.weight.grad is None  # held whole, unreduced
    reduce_gradients(sharded, now=True)
    loss_and_gradients(sharded)
    torch.testing.assert_close(decoder_layers(sharded)[0].mlp.up_proj.weight.grad.full_tensor(), 2 * gradient,
                               rtol=1e-2, atol=1e-4)  # both backwards' gradients


def test_an_adapter_export_gathers_the_adapters_not_the_sharded_base(one_process_group, tiny_llama_dir, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM

    from tunesmith.training.sharding import adapter_parameters, gather_for_export, shard_layers

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                           LoraConfig(r=4, target_modules=["q_proj", "up_proj"]))
    expected = {name: parameter.detach().clone() for name, parameter in model.named_parameters()
                if parameter.requires_grad}
    shard_layers(model, reshard_after_forward=True)
    gather_for_export(model, is_main=True, exported=adapter_parameters(model))
    parameters = dict(model.named_parameters())
    assert all(not isinstance(parameters[name], DTensor) for name in expected)
    assert isinstance(parameters["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"], DTensor)
    assert isinstance(parameters["base_model.model.model.layers.0.mlp.down_proj.weight"], DTensor)
    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert len(saved) == len(expected) == 8  # A and B of 2 modules in 2 layers
    for name, tensor in expected.items():
        torch.testing.assert_close(saved[name.replace(".default", "")], tensor)


@pytest.mark.parametrize("max_shard_size", ["5GB", "40KB"])
def test_a_sharded_model_is_exported_file_by_file_as_save_pretrained_writes_it(
    one_process_group, tiny_llama_dir, tmp_path, max_shard_size
):
    """The streamed export of sharded layers writes save_pretrained's folder: the same files (one, or several
    with the same index), tensors, metadata and config; the head tied to the embeddings is left out as there."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from tunesmith.training.sharded_export import save_sharded_model
    from tunesmith.training.sharding import shard_layers

    plain = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    plain.save_pretrained(tmp_path / "expected", max_shard_size=max_shard_size)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    shard_layers(model, reshard_after_forward=True)
    save_sharded_model(model, tmp_path / "streamed", is_main=True, max_shard_size=max_shard_size)

    expected_files = sorted(path.name for path in (tmp_path / "expected").iterdir())
    assert sorted(path.name for path in (tmp_path / "streamed").iterdir()) == expected_files
    weight_files = [name for name in expected_files if name.endswith(".safetensors")]
    assert len(weight_files) == 1 if max_shard_size == "5GB" else len(weight_files) > 1
    for name in expected_files:
        if name.endswith(".json"):
            assert (tmp_path / "streamed" / name).read_text() == (tmp_path / "expected" / name).read_text(), name
            continue
        with safe_open(tmp_path / "expected" / name, "pt") as expected, safe_open(tmp_path / "streamed" / name,
                                                                                   "pt") as streamed:
            assert streamed.metadata() == expected.metadata()
            assert list(streamed.keys()) == list(expected.keys()) and "lm_head.weight" not in expected.keys()  # noqa: SIM118
            for key in expected.keys():  # noqa: SIM118 (a safe_open handle has keys(), no __contains__ or __iter__)
                torch.testing.assert_close(streamed.get_tensor(key), expected.get_tensor(key), rtol=0, atol=0)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed")
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    tokens = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(reloaded(input_ids=tokens).logits, plain(input_ids=tokens).logits, rtol=0, atol=0)


def test_a_model_whose_save_converts_weights_is_gathered_and_saved_by_transformers(
    one_process_group, tiny_tokenizer_dir, tmp_path
):
    """Mixtral's experts are fused on load and split again on save (a conversion over several tensors), so
    its export cannot be planned from shapes: it is gathered and written by save_pretrained, same files."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    from tunesmith.methods import METHODS
    from tunesmith.training.loop import export_sharded
    from tunesmith.training.sharded_export import streamable
    from tunesmith.training.sharding import shard_layers

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    config = MixtralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=2)
    torch.manual_seed(0)
    plain = MixtralForCausalLM(config)
    plain.save_pretrained(tmp_path / "expected")
    model = MixtralForCausalLM(config)
    model.load_state_dict(plain.state_dict())
    shard_layers(model, reshard_after_forward=True)
    assert not streamable(model)
    export_sharded(model, METHODS.get("full"), tokenizer, tmp_path, is_main=True, max_shard_size="5GB")
    expected = load_file(tmp_path / "expected" / "model.safetensors")
    saved = load_file(tmp_path / "model" / "model.safetensors")
    assert saved.keys() == expected.keys() and any(".experts.0." in name for name in saved)  # split again
    for name, tensor in expected.items():
        torch.testing.assert_close(saved[name], tensor, rtol=0, atol=0)


SAMPLE_ON_SHARDS = """
import sys, torch, torch.distributed as dist
from transformers import AutoModelForCausalLM
from tunesmith.objectives.rl import SamplingSettings, sample_groups
from tunesmith.training.sharding import shard_layers

dist.init_process_group("gloo")
torch.manual_seed(dist.get_rank())
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
shard_layers(model, reshard_after_forward=True)
# Process 1 decodes 3 times as long as process 0: every forward gathers the layers from both.
settings = SamplingSettings(group_size=2, max_new_tokens=4 + 8 * dist.get_rank())
batch = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
samples = sample_groups(model, batch, settings)
with open(f"{sys.argv[2]}/decoded-{dist.get_rank()}", "w") as file:  # one file each: stdout lines interleave
    file.write(str(samples["completion_mask"].shape[1]))
dist.destroy_process_group()
"""


def test_processes_decoding_to_different_lengths_stay_in_step(tiny_llama_dir, tmp_path):
    """Sampling on sharded layers: a process whose completions end first keeps joining the others'
    forwards (generate's synced_gpus) until all are done; without that it would wait forever."""
    script = tmp_path / "sample.py"
    script.write_text(SAMPLE_ON_SHARDS)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29548"]
    completed = subprocess.run([*torchrun, str(script), str(tiny_llama_dir), str(tmp_path)], capture_output=True,
                               text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]
    decoded = [(tmp_path / f"decoded-{rank}").read_text() for rank in (0, 1)]
    assert decoded == ["4", "12"]  # completion columns each process decoded


def test_grpo_trains_on_sharded_layers(tiny_llama_dir, tmp_path):
    """The whole online-RL path on sharded layers: sampling, the reference (the LoRA base), the loss,
    the greedy evaluation."""
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"question": f"What is {index} plus {index}?",
                                                     "answer": f"#### {2 * index}"} for index in range(8)])
    config = tmp_path / "grpo.yaml"
    config.write_text(
        f"model: {{name: {tiny_llama_dir}}}\n"
        f"data: {{train: {data}, eval: {data}, max_length: 64}}\n"
        "task: grpo\n"
        "objective: {rewards: [gsm8k_correctness, length_penalty], group_size: 2, max_new_tokens: 8, beta: 0.1}\n"
        "method: {name: lora, r: 4}\n"
        "train: {max_steps: 2, batch_size: 2, sharding: fsdp, eval_before: false}\n"
        f"output_dir: {tmp_path / 'run'}\n"
    )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547"]
    completed = subprocess.run([*torchrun, "-m", "tunesmith.cli", "train", str(config)],
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, [line for line in completed.stderr.splitlines() if "rror" in line][:5]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["sharding"] == "fsdp" and "reward" in summary["eval"]
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("kl" in step and "reward" in step for step in steps if "loss" in step)


def assert_two_sharded_processes_equal_one(
    write: Callable[[str, int], Path], tmp_path: Path, port: int
) -> subprocess.CompletedProcess:
    """`write(name, batch_size)` -> a run config (train.sharding: fsdp, output under tmp_path / name): one process
    at batch 4 and two (torchrun) at batch 2 reach the same losses and exported model. Returns the 2-process run."""
    assert train(write("single", 4)).returncode == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    completed = subprocess.run([*torchrun, "-m", "tunesmith.cli", "train", str(write("sharded", 2))],
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, [line for line in completed.stderr.splitlines() if "rror" in line][:5]
    assert json.loads((tmp_path / "sharded" / "summary.json").read_text())["sharding"] == "fsdp"
    assert losses(tmp_path / "sharded") == pytest.approx(losses(tmp_path / "single"), rel=1e-5)
    assert_same_weights(tmp_path / "single" / "model", tmp_path / "sharded" / "model", rtol=1e-4, atol=1e-5)
    return completed


@pytest.mark.parametrize("cache_reference, port", [(False, 29594), (True, 29595)])
def test_dpo_full_fine_tuning_on_sharded_layers_equals_one_process(
    tiny_llama_dir, bf16_llama_dir, tmp_path, cache_reference, port
):
    """Full fine-tuning's frozen reference copy is sharded like the policy (forward only), or its outputs are
    cached in one pass through the sharded copy; both processes set up on the host and place the layers as
    they shard them. 2 processes reach the losses and weights of one with the same global batch.

    Without the cache the model comes from bfloat16 files and trains in float32: the sharded run loads the
    files as stored and converts each layer of the policy, and of the reference it loads from the files again,
    as it shards it (tests/test_sharded_loading.py); the one process loads them converted."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", preference_records(8))
    model = f"{{name: {tiny_llama_dir}}}" if cache_reference else f"{{name: {bf16_llama_dir}, dtype: float32}}"

    def write(name: str, batch_size: int) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(
            f"model: {model}\n"
            f"data: {{train: {pairs}, eval_split: 0.0, max_length: 64}}\n"
            "task: dpo\nmethod: {name: full}\n"
            f"train: {{max_steps: 2, batch_size: {batch_size}, lr: 1e-4, warmup: 0, eval_before: false, seed: 5, "
            f"sharding: fsdp, cache_reference: {str(cache_reference).lower()}}}\n"
            f"output_dir: {tmp_path / name}\n")
        return path

    sharded = " ".join(assert_two_sharded_processes_equal_one(write, tmp_path, port).stderr.split())
    if not cache_reference:
        assert ("weights loaded as stored (bfloat16), converted to torch.float32 layer by layer as they were "
                "sharded; the frozen reference loaded from the files too") in sharded


def test_distillation_with_a_sharded_teacher_equals_one_process(tiny_llama_dir, teacher_dir, tmp_path):
    """The teacher (the objective's own model) is loaded on the host and sharded like the student: 2 sharded
    processes reach the losses and weights of one process that holds it whole."""
    data = write_jsonl(tmp_path / "chats.jsonl", chat_records(8))

    def write(name: str, batch_size: int) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(
            f"model: {{name: {tiny_llama_dir}}}\n"
            f"data: {{train: {data}, eval_split: 0.0, max_length: 64, group_by_length: true}}\n"
            f"task: distill\nobjective: {{teacher: {teacher_dir}}}\nmethod: {{name: full}}\n"
            f"train: {{max_steps: 2, batch_size: {batch_size}, lr: 1e-3, warmup: 0, eval_before: false, seed: 5, "
            "sharding: fsdp}\n"
            f"output_dir: {tmp_path / name}\n")
        return path

    assert_two_sharded_processes_equal_one(write, tmp_path, 29596)


@pytest.mark.parametrize("environment, setting, expected", [
    ({}, "auto", None),  # not launched with FSDP: replicas
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_RESHARD_AFTER_FORWARD": "false"}, "auto", False),  # FSDP2 config
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP"}, "auto", False),  # FSDP1 names
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "FULL_SHARD"}, "auto", True),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "NO_SHARD"}, "auto", None),
    ({"ACCELERATE_USE_FSDP": "true"}, "none", None),  # the run config's explicit choice wins
    ({}, "fsdp", True),  # train.reshard_after_forward's default
])
def test_sharding_follows_the_launcher_unless_the_config_says(monkeypatch, environment, setting, expected):
    from tunesmith.config import TrainConfig
    from tunesmith.training.sharding import sharding_choice

    for name in ("ACCELERATE_USE_FSDP", "FSDP_RESHARD_AFTER_FORWARD", "FSDP_SHARDING_STRATEGY"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    train = TrainConfig(sharding=setting)
    assert sharding_choice(train, processes=2) == expected
    assert sharding_choice(train, processes=1) is None  # nothing to shard across


def continued_run_config(tmp_path, model_dir, data, name: str, batch_size: int, method: str, continual: str,
                         extra: str = "", from_run=None):
    path = tmp_path / f"{name}.yaml"
    from_run = f", from_run: {from_run}" if from_run else ""
    lora = ", r: 4, target_modules: [q_proj, v_proj, up_proj]" if method == "lora" else ""
    path.write_text(
        f"model: {{name: {model_dir}{from_run}}}\n"
        f"data: {{train: {data}, eval_split: 0.0, max_length: 128, group_by_length: true}}\n"
        f"method: {{name: {method}{lora}}}\n"
        f"continual: {continual}\n"
        f"train: {{max_steps: 3, batch_size: {batch_size}, lr: 1e-3, warmup: 0, eval_before: false, seed: 3, "
        f"max_grad_norm: 10.0{extra}}}\n"
        f"output_dir: {tmp_path / name}\n"
    )
    return path


def penalties(run_dir) -> list[float]:
    return [json.loads(line)["continual_penalty"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method, regularizer, port", [("full", "ewc", 29590), ("lora", "ewc", 29591),
                                                       ("lora", "olora", 29592)])
def test_continual_penalties_on_sharded_layers_equal_one_process(tiny_llama_dir, tmp_path, method, regularizer, port):
    """EWC holds each sharded weight's start rows and Fisher rows where the weight's shard lives (full fine-tuning)
    or the rows of B A this process holds (LoRA, A gathered); O-LoRA gathers the new A. Two sharded processes
    reach the penalties, losses and weights of one unsharded process."""
    data = write_jsonl(tmp_path / "chats.jsonl", chat_records(12))
    old = write_jsonl(tmp_path / "old.jsonl", chat_records(20)[12:])
    weights = {"full": "model/model.safetensors", "lora": "adapter/adapter_model.safetensors"}[method]
    previous = None
    if regularizer == "olora":  # O-LoRA keeps the new adapter away from a previous LoRA run's subspace
        first = continued_run_config(tmp_path, tiny_llama_dir, old, "previous", 4, "lora", "null")
        assert train(first).returncode == 0
        previous = tmp_path / "previous"
    weight = 1e3 if method == "full" else 1e5  # a penalty whose gradient weighs in the update
    continual = (f"{{regularizer: {{name: ewc, weight: {weight}, fisher_examples: 6}}, old_data: {old}}}"
                 if regularizer == "ewc" else "{regularizer: {name: olora, weight: 10.0}}")
    single = continued_run_config(tmp_path, tiny_llama_dir, data, "single", 4, method, continual, from_run=previous)
    assert train(single).returncode == 0
    launcher = tmp_path / "fsdp.yaml"
    launcher.write_text(ACCELERATE_FSDP.format(port=port))
    sharded = continued_run_config(tmp_path, tiny_llama_dir, data, "sharded", 2, method, continual,
                                   f", accelerate_config: {launcher}", from_run=previous)
    two = train(sharded)
    assert two.returncode == 0, [line for line in two.stderr.splitlines() if "rror" in line][:5]

    assert json.loads((tmp_path / "sharded" / "summary.json").read_text())["sharding"] == "fsdp"
    assert min(penalties(tmp_path / "single")[1:]) > 0  # the weights have moved from the anchor
    assert penalties(tmp_path / "sharded") == pytest.approx(penalties(tmp_path / "single"), rel=1e-4)
    assert losses(tmp_path / "sharded") == pytest.approx(losses(tmp_path / "single"), rel=1e-5)
    assert_same_weights(tmp_path / "single" / weights, tmp_path / "sharded" / weights, rtol=1e-4, atol=1e-5)
