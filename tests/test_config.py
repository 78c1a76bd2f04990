"""Config: YAML + --set overrides, defaults from the papers, one-line errors naming the key."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tunesmith.config import dump_config, load_config, parse_overrides
from tunesmith.errors import ConfigError


@pytest.fixture
def config_file(tmp_path, shared_data):
    path = tmp_path / "run.yaml"
    path.write_text(
        f"model:\n  name: smollm2-135m-instruct\n"
        f"data:\n  train: {shared_data / 'sft' / 'gsm8k_train.jsonl'}\n"
        f"task: sft\nmethod:\n  name: lora\n"
    )
    return path


def test_minimal_config_gets_paper_defaults(config_file):
    config = load_config(config_file)
    assert config.method.name == "lora"
    assert config.method.r == 16 and config.method.alpha == 32  # alpha = 2r
    assert config.method.target_modules == "all-linear"
    assert config.train.lr == pytest.approx(2e-4)  # ~10x full fine-tuning's 2e-5
    assert config.train.scheduler == "cosine" and config.train.warmup > 0


def test_overrides_reach_nested_keys_and_rederive_defaults(config_file):
    config = load_config(config_file, ["train.lr=1e-4", "method.r=8", "data.packing=true"])
    assert config.train.lr == pytest.approx(1e-4)
    assert config.method.r == 8 and config.method.alpha == 16
    assert config.data.packing is True


def test_yes_and_no_stay_words_for_keys_that_take_words(config_file):
    # YAML 1.1 reads yes / no / on / off as booleans: `mixed_precision: no`, as its help writes it, was refused
    config_file.write_text(config_file.read_text().replace("data:\n", "data:\n  header: no\n  packing: yes\n")
                           + "train:\n  mixed_precision: no\n  eval_before: off\n")
    config = load_config(config_file)
    assert config.train.mixed_precision == "no" and config.data.header == "no"
    assert config.data.packing is True and config.train.eval_before is False  # boolean keys still take the words
    overridden = load_config(config_file, ["train.mixed_precision=no", "data.header=yes", "data.packing=no"])
    assert overridden.train.mixed_precision == "no" and overridden.data.header == "yes"
    assert overridden.data.packing is False


def test_full_method_default_lr(config_file):
    assert load_config(config_file, ["method.name=full"]).train.lr == pytest.approx(2e-5)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train.lrr=1e-4"], "train.lrr: unknown key (did you mean 'lr'?)"),
        (["method.rank=8"], "method.rank: unknown key"),
        (["train.lr=-1"], "train.lr: Input should be greater than 0"),
        (["train.batch_size=0"], "train.batch_size: Input should be greater than or equal to 1"),
        (["method.r=0"], "method.r: Input should be greater than or equal to 1"),
        (["train.epochs=many"], "train.epochs: Input should be a valid number"),
        (["method.name=lorra"], "method.name: unknown method 'lorra' (did you mean 'lora'?)"),
        (["task=clasify"], "task: unknown task 'clasify' (did you mean 'classify'?)"),
        (["data.train=/nonexistent/file.jsonl"], "data.train: file not found: /nonexistent/file.jsonl"),
        (["data.packing=true", "task=classify"], "packing applies to sft and pretrain"),
        (["trian.lr=1"], "trian: unknown key (did you mean 'train'?)"),
        (["train.export_shard_size=5 gigs"], "train.export_shard_size: '5 gigs' is not a size"),
    ],
)
def test_bad_values_name_the_key(config_file, overrides, expected):
    with pytest.raises(ConfigError) as caught:
        load_config(config_file, overrides)
    message = str(caught.value)
    assert expected in message
    assert "\n" not in message


def test_method_key_typo_suggests_closest(config_file):
    with pytest.raises(ConfigError, match=r"method.alpah: unknown key \(did you mean 'alpha'\?\)"):
        load_config(config_file, ["method.alpah=8"])


def test_bad_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  name: x\ndata: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken.yaml:\d+: not valid YAML"):
        load_config(path)


def test_override_syntax_error():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_overrides(["train.lr"])


def test_resolved_config_round_trips(config_file, tmp_path):
    config = load_config(config_file, ["method.r=4"])
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(dump_config(config))
    assert load_config(resolved) == config


def test_cli_config_error_is_one_line_exit_2(config_file):
    result = subprocess.run(
        [sys.executable, "-m", "tunesmith.cli", "train", str(config_file), "--set", "train.lrr=1"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "train.lrr: unknown key (did you mean 'lr'?)" in lines[0]


def test_cli_usage_error_is_one_line_exit_2():
    result = subprocess.run([sys.executable, "-m", "tunesmith.cli", "train"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "Missing argument 'config'" in result.stderr
