"""DeepSpeed configs run on FSDP2: the ZeRO stage, offload and precision of a DeepSpeed JSON file or of an
accelerate DEEPSPEED config become train.sharding / reshard_after_forward / cpu_offload / mixed_precision;
values of the training itself must be "auto" or agree with the run config; what needs DeepSpeed's engine is
refused before any work; a 2-process run launched from a DEEPSPEED accelerate config (no DeepSpeed installed)
reaches the losses and weights of one unsharded process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import assert_same_weights, chat_records, run_cli, run_config, write_jsonl

from tunesmith.config import TrainConfig
from tunesmith.errors import ConfigError
from tunesmith.plan import plan_memory
from tunesmith.training.deepspeed_config import check_global_batch, zero_plan
from tunesmith.training.launch import without_deepspeed

# The shape of the ZeRO-3 config in transformers' DeepSpeed guide: "auto" wherever the trainer decides.
ZERO3 = {
    "bf16": {"enabled": "auto"},
    "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                          "offload_param": {"device": "cpu", "pin_memory": True}, "overlap_comm": True,
                          "stage3_gather_16bit_weights_on_model_save": True},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto", "steps_per_print": 2000,
}


def deepspeed_file(tmp_path, **changes) -> str:
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps({**ZERO3, **changes}))
    return str(path)


@pytest.mark.parametrize("stage, sharding, reshard", [(0, "none", True), (1, "fsdp", False), (2, "fsdp", False),
                                                      (3, "fsdp", True)])
def test_zero_stage_becomes_the_sharding(tmp_path, stage, sharding, reshard):
    ds = deepspeed_file(tmp_path, zero_optimization={"stage": stage})
    train = TrainConfig(deepspeed_config=ds)
    assert (train.sharding, train.reshard_after_forward, train.cpu_offload) == (sharding, reshard, False)


def test_auto_values_keep_the_run_config_and_offload_and_precision_come_from_the_file(tmp_path):
    train = TrainConfig(deepspeed_config=deepspeed_file(tmp_path), batch_size=3, grad_accum=5, lr=3e-4)
    assert (train.sharding, train.reshard_after_forward, train.cpu_offload) == ("fsdp", True, True)
    assert (train.batch_size, train.grad_accum, train.lr, train.mixed_precision) == (3, 5, 3e-4, "auto")
    explicit = deepspeed_file(tmp_path, bf16={"enabled": True}, train_micro_batch_size_per_gpu=3, gradient_clipping=0.5,
                              optimizer={"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.95]}})
    train = TrainConfig(deepspeed_config=explicit, batch_size=3, lr=3e-4, adam_betas=(0.9, 0.95), max_grad_norm=0.5)
    assert train.mixed_precision == "bf16"
    plan = zero_plan(train.model_dump())
    assert "ZeRO-3" in plan.describe() and "zero_optimization.overlap_comm" in plan.ignored


@pytest.mark.parametrize("changes, train, message", [
    ({"gradient_accumulation_steps": 4}, {}, "train.grad_accum: 1, but"),
    ({"train_micro_batch_size_per_gpu": 16}, {}, "train.batch_size: 8, but"),
    ({"gradient_clipping": 0.0}, {}, "train.max_grad_norm: 1.0, but"),  # DeepSpeed's 0: no clipping
    ({"optimizer": {"type": "AdamW", "params": {"lr": 2e-5}}}, {}, "train.lr: unset"),
    ({"bf16": {"enabled": True}}, {"mixed_precision": "fp16"}, "train.mixed_precision: 'fp16'"),
    ({"zero_optimization": {"stage": 2}}, {"reshard_after_forward": True}, "train.reshard_after_forward: True"),
    ({"zero_optimization": {"stage": 1}}, {"sharding": "none"}, "train.sharding: 'none'"),
    ({"scheduler": {"type": "WarmupLR"}}, {}, "scheduler: not supported"),
    ({"optimizer": {"type": "Lamb"}}, {}, "optimizer.type Lamb"),
    ({"optimizer": {"type": "AdamW", "params": {"eps": 1e-6}}}, {}, "optimizer.params.eps"),
    ({"zero_optimization": {"stage": 3, "zero_quantized_gradients": True}}, {}, "zero_quantized_gradients"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}, {}, "device nvme"),
])
def test_disagreements_and_engine_only_settings_are_refused_by_key(tmp_path, changes, train, message):
    with pytest.raises(ConfigError, match="^train.") as error:
        TrainConfig(deepspeed_config=deepspeed_file(tmp_path, **changes), **train)
    assert message in str(error.value)


def test_train_batch_size_is_checked_once_the_processes_are_known(tmp_path):
    train = TrainConfig(deepspeed_config=deepspeed_file(tmp_path, train_batch_size=16), batch_size=4, grad_accum=2)
    plan = zero_plan(train.model_dump())
    check_global_batch(plan, train.batch_size, train.grad_accum, processes=2)  # 4 x 2 x 2
    with pytest.raises(ConfigError, match="train_batch_size 16, but batch_size 4 x grad_accum 2 x 1 processes is 8"):
        check_global_batch(plan, train.batch_size, train.grad_accum, processes=1)


def test_a_bad_deepspeed_file_is_one_line_before_any_work(capsys, tiny_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "chats.jsonl", chat_records(4))
    broken = tmp_path / "broken.json"
    broken.write_text('{\n  "zero_optimization": {"stage": 3,}\n}\n')
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {{name: {tiny_llama_dir}}}\ndata: {{train: {data}}}\n"
                      f"train: {{deepspeed_config: {broken}}}\noutput_dir: {tmp_path / 'run'}\n")
    code, _, err = run_cli(capsys, "train", str(config))
    assert code == 2 and f"train.deepspeed_config: {broken}:2: not valid JSON" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_accelerate_deepspeed_config_maps_and_launches_without_deepspeed(tmp_path):
    launcher = tmp_path / "accelerate.yaml"
    launcher.write_text("distributed_type: DEEPSPEED\nmixed_precision: bf16\nnum_processes: 4\nnum_machines: 1\n"
                        "deepspeed_config:\n  zero_stage: 2\n  offload_optimizer_device: cpu\n"
                        "  offload_param_device: none\n  gradient_accumulation_steps: 2\n  zero3_init_flag: false\n")
    train = TrainConfig(accelerate_config=launcher, grad_accum=2)
    assert (train.sharding, train.reshard_after_forward, train.cpu_offload, train.mixed_precision) == (
        "fsdp", False, True, "bf16")
    with pytest.raises(ConfigError, match="train.grad_accum: 1, but .* says deepspeed_config.gradient_accumulation"):
        TrainConfig(accelerate_config=launcher)
    # The JSON file the section names is read instead of its inline keys.
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    launcher.write_text("distributed_type: DEEPSPEED\nnum_processes: 2\n"
                        "deepspeed_config: {deepspeed_config_file: ds.json}\n")
    assert TrainConfig(accelerate_config=launcher).reshard_after_forward is True
    with pytest.raises(ConfigError, match="name the DeepSpeed settings once"):
        TrainConfig(accelerate_config=launcher, deepspeed_config=deepspeed_file(tmp_path))
    # The launch itself is plain data parallel: accelerate does not look for DeepSpeed.
    plain = without_deepspeed({"distributed_type": "DEEPSPEED", "num_processes": 2, "use_cpu": True,
                               "deepspeed_config": {"zero_stage": 3}, "main_process_port": 29581})
    assert plain == {"distributed_type": "MULTI_GPU", "num_processes": 2, "use_cpu": True, "main_process_port": 29581}
    assert without_deepspeed({"distributed_type": "DEEPSPEED", "num_processes": 8})["distributed_type"] == "MULTI_GPU"
    assert without_deepspeed({"distributed_type": "DEEPSPEED", "num_processes": 1})["distributed_type"] == "NO"


def test_plan_counts_offloaded_layers_in_host_memory(tiny_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "chats.jsonl", chat_records(4))
    sharded = run_config(tiny_llama_dir, data, tmp_path / "a", train={"sharding": "fsdp"})
    offloaded = run_config(tiny_llama_dir, data, tmp_path / "b", train={"sharding": "fsdp", "cpu_offload": True})
    on_device, with_offload = (plan_memory(config, on_gpu=True, processes=4).parts_gib
                               for config in (sharded, offloaded))
    for part in ("weights", "gradients", "optimizer (AdamW)"):
        assert with_offload[part] < on_device[part]  # only the embeddings, final norm and head stay on the device
    small_batch = run_config(tiny_llama_dir, data, tmp_path / "c", data={"max_length": 16},
                             train={"sharding": "fsdp", "batch_size": 1})  # the model state dominates
    tight = plan_memory(small_batch, budget_gib=1e-6, on_gpu=True, processes=4)
    assert any(line.startswith("train.cpu_offload: true") for line in tight.advice)


ACCELERATE_DEEPSPEED = """\
compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  zero_stage: 2
  offload_optimizer_device: cpu
  offload_param_device: none
  gradient_clipping: 0.5
  zero3_init_flag: false
main_process_port: 29580
mixed_precision: 'no'
num_machines: 1
num_processes: 2
use_cpu: true
"""


def test_two_processes_from_a_deepspeed_accelerate_config_equal_one_process(tiny_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "chats.jsonl", chat_records(12))
    launcher = tmp_path / "deepspeed.yaml"
    launcher.write_text(ACCELERATE_DEEPSPEED)

    def write(name: str, batch_size: int, extra: str = "") -> str:
        path = tmp_path / f"{name}.yaml"
        path.write_text(
            f"model: {{name: {tiny_llama_dir}}}\n"
            f"data: {{train: {data}, eval_split: 0.0, max_length: 128, group_by_length: true}}\n"
            "method: {name: full}\n"
            f"train: {{max_steps: 3, batch_size: {batch_size}, lr: 1e-3, warmup: 0, eval_before: false, seed: 3, "
            f"max_grad_norm: 0.5{extra}}}\n"
            f"output_dir: {tmp_path / name}\n")
        return str(path)

    runs = {}
    configs = {"single": write("single", 4), "zero2": write("zero2", 2, f", accelerate_config: {launcher}")}
    for name, config in configs.items():
        completed = subprocess.run([sys.executable, "-m", "tunesmith.cli", "train", config], capture_output=True,
                                   text=True, timeout=600)
        assert completed.returncode == 0, [line for line in completed.stderr.splitlines() if "rror" in line][:5]
        runs[name] = completed
    assert "ZeRO-2 on FSDP2" in runs["zero2"].stderr and "zero3_init_flag" in runs["zero2"].stderr
    summary = json.loads((tmp_path / "zero2" / "summary.json").read_text())
    assert (summary["processes"], summary["sharding"], summary["cpu_offload"]) == (2, "fsdp", True)

    def losses(name: str) -> list[float]:
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines]

    assert losses("zero2") == pytest.approx(losses("single"), rel=1e-5)
    assert_same_weights(tmp_path / "single" / "model/model.safetensors", tmp_path / "zero2" / "model/model.safetensors",
                        rtol=1e-4)
