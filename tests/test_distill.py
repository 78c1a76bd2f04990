"""distill: each divergence equals its formula, alpha = 1 is exactly sft, distilling brings the student
closer to the teacher on held-out data, and a teacher with another tokenizer is refused in one line."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import LogitRows, chat_records, run_config, write_jsonl

from tunesmith.config import build_config
from tunesmith.data import prepare_data
from tunesmith.data.collate import collate_padded
from tunesmith.errors import ConfigError
from tunesmith.methods import METHODS
from tunesmith.models import load_model, load_tokenizer
from tunesmith.objectives.causal_lm import CausalLMSettings, causal_lm_loss
from tunesmith.objectives.distill import DIVERGENCES, DistillSettings, distill_loss, teacher_logits
from tunesmith.training import train


@pytest.fixture(scope="module")
def foreign_teacher_dir(tmp_path_factory, tiny_llama_dir):
    """A teacher whose tokenizer has one more token (and one more embedding row)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.add_tokens(["<teacher_only>"])
    model.resize_token_embeddings(len(tokenizer))
    folder = tmp_path_factory.mktemp("foreign_teacher")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distill_data")
    records = chat_records(48)
    return write_jsonl(folder / "train.jsonl", records[:40]), write_jsonl(folder / "eval.jsonl", records[40:])


def _distill_config(student_dir, teacher, data_files, output_dir, objective=None, **sections):
    train_file, eval_file = data_files
    return run_config(
        student_dir, train_file, output_dir, task="distill", objective={"teacher": str(teacher), **(objective or {})},
        data={"eval": str(eval_file)}, **sections,
    )


# --- the divergences, on hand tensors --------------------------------------------------------------------------


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_each_divergence_equals_its_formula(beta):
    teacher = [[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]]
    student = [[0.1, 0.3, 0.6], [0.3, 0.3, 0.4]]
    settings = DistillSettings(teacher="unused", divergence="jsd", beta=beta)
    log_s = torch.tensor(student, dtype=torch.float64).log()
    log_t = torch.tensor(teacher, dtype=torch.float64).log()
    for row, (t, s) in enumerate(zip(teacher, student, strict=True)):
        m = [beta * ti + (1 - beta) * si for ti, si in zip(t, s, strict=True)]
        expected = {
            "forward_kl": _kl(t, s),
            "reverse_kl": _kl(s, t),
            "jsd": beta * _kl(t, m) + (1 - beta) * _kl(s, m),
        }
        for name, value in expected.items():
            got = DIVERGENCES.get(name)(log_s, log_t, settings)[row].item()
            assert got == pytest.approx(value, rel=1e-5), name
    # forward KL is torch.distributions' KL(teacher || student)
    reference = torch.distributions.kl_divergence(
        torch.distributions.Categorical(probs=torch.tensor(teacher, dtype=torch.float64)),
        torch.distributions.Categorical(probs=torch.tensor(student, dtype=torch.float64)),
    )
    torch.testing.assert_close(DIVERGENCES.get("forward_kl")(log_s, log_t, settings), reference)


def test_settings_are_checked_with_the_key_in_the_message(tiny_llama_dir, data_files, tmp_path):
    with pytest.raises(ConfigError, match=r"objective.divergence: unknown divergence 'jsdd' \(did you mean 'jsd'"):
        _distill_config(tiny_llama_dir, tiny_llama_dir, data_files, tmp_path, {"divergence": "jsdd"})
    with pytest.raises(ConfigError, match="beta applies to divergence: jsd only"):
        _distill_config(tiny_llama_dir, tiny_llama_dir, data_files, tmp_path, {"beta": 0.3})
    with pytest.raises(ConfigError, match="objective.teacher: required but missing"):
        run_config(tiny_llama_dir, data_files[0], tmp_path, task="distill")
    # a resolved config (every default written out, as in a run's config.yaml) validates again
    config = _distill_config(tiny_llama_dir, tiny_llama_dir, data_files, tmp_path, {"divergence": "reverse_kl"})
    assert build_config(config.model_dump(mode="json")) == config


# --- the loss ---------------------------------------------------------------------------------------------------


def test_alpha_one_is_exactly_the_sft_loss(tiny_llama_dir, teacher_dir, data_files, tmp_path):
    config = _distill_config(tiny_llama_dir, teacher_dir, data_files, tmp_path, {"alpha": 1.0})
    tokenizer = load_tokenizer(config.model)
    examples = prepare_data(config, tokenizer).train[:6]
    model = load_model(config.model, "distill")
    batch = collate_padded(examples, tokenizer.pad_token_id)
    batch = {**batch, **teacher_logits(None, batch, config.objective)}
    distilled = distill_loss(model, batch, config.objective)
    sft = causal_lm_loss(model, batch, CausalLMSettings())
    assert torch.equal(distilled.loss_sum, sft.loss_sum)
    assert distilled.num_loss_tokens == sft.num_loss_tokens
    # ... and alpha < 1 is not: the teacher's distributions differ from the student's
    mixed = distill_loss(model, batch, config.objective.model_copy(update={"alpha": 0.5}))
    assert not torch.equal(mixed.loss_sum, sft.loss_sum)


@pytest.mark.parametrize("objective", [
    {"divergence": "forward_kl", "alpha": 0.3, "temperature": 2.0},
    {"divergence": "reverse_kl"},
    {"divergence": "jsd", "beta": 0.3, "teacher_top_k": 8, "alpha": 0.5},
])
def test_chunked_terms_equal_the_whole_batch_in_value_and_gradient(
    tiny_llama_dir, teacher_dir, data_files, tmp_path, objective
):
    """Loss positions in chunks of 7 (the last one shorter) give the loss, every term and every parameter's
    gradient of the whole batch at once; the whole (N, V) logits never exist, the student's nor the teacher's
    (no output-head matmul covers more than 7 positions), and each chunk's gradients are made in the forward
    pass: no head matmul runs in the backward pass."""
    config = _distill_config(tiny_llama_dir, teacher_dir, data_files, tmp_path, objective)
    tokenizer = load_tokenizer(config.model)
    batch = collate_padded(prepare_data(config, tokenizer).train[:6], tokenizer.pad_token_id)
    batch = {**batch, **teacher_logits(None, batch, config.objective)}
    model = load_model(config.model, "distill")
    vocab = model.config.vocab_size
    results = []
    for chunk in (None, 7):
        model.zero_grad()
        with LogitRows(vocab) as rows:
            output = distill_loss(model, batch, config.objective.model_copy(update={"loss_chunk_tokens": chunk}))
        with LogitRows(vocab) as backward_rows:
            output.loss_sum.backward()
        gradients = [parameter.grad.clone() for parameter in model.parameters()]
        results.append((output.loss_sum.detach(), output.metrics, gradients, rows.most, backward_rows.most))
    (whole_loss, whole_terms, whole_grads, whole_rows, _), (loss, terms, grads, chunk_rows, backward_rows) = results
    assert batch["num_loss_tokens"] > 3 * 7 and whole_rows == batch["num_loss_tokens"] and 0 < chunk_rows <= 7
    assert backward_rows == 0
    torch.testing.assert_close(loss, whole_loss, rtol=1e-5, atol=1e-6)
    for name, value in whole_terms.items():
        torch.testing.assert_close(terms[name], value, rtol=1e-5, atol=1e-6)
    for chunked, whole in zip(grads, whole_grads, strict=True):
        torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-6)


def test_a_lora_students_head_adapter_gets_its_gradients_from_the_chunks(
    tiny_llama_dir, teacher_dir, data_files, tmp_path
):
    """A wrapped head (LoRA on lm_head, frozen hidden states of a frozen base before it): the chunks' gradients
    reach the head's adapter weights as autograd through the whole batch gives them."""
    config = _distill_config(
        tiny_llama_dir, teacher_dir, data_files, tmp_path, {"temperature": 2.0, "alpha": 0.4},
        method={"name": "lora", "r": 4, "target_modules": ["lm_head", "q_proj"]},
    )
    tokenizer = load_tokenizer(config.model)
    batch = collate_padded(prepare_data(config, tokenizer).train[:6], tokenizer.pad_token_id)
    batch = {**batch, **teacher_logits(None, batch, config.objective)}
    model = METHODS.get("lora").apply(load_model(config.model, "distill"), config.method, "distill")
    for parameter in model.parameters():
        if parameter.requires_grad:
            torch.nn.init.normal_(parameter, std=0.02)  # LoRA's B starts at zero: its A would get no gradient
    results = []
    for chunk in (None, 7):
        model.zero_grad()
        output = distill_loss(model, batch, config.objective.model_copy(update={"loss_chunk_tokens": chunk}))
        output.loss_sum.backward()
        results.append((output.loss_sum.detach(), {name: parameter.grad.clone() for name, parameter
                                                   in model.named_parameters() if parameter.requires_grad}))
    (whole_loss, whole_grads), (loss, grads) = results
    torch.testing.assert_close(loss, whole_loss, rtol=1e-5, atol=1e-6)
    assert any("lm_head" in name for name in grads) and grads.keys() == whole_grads.keys()
    for name, gradient in grads.items():
        assert gradient.abs().sum() > 0, name
        torch.testing.assert_close(gradient, whole_grads[name], rtol=1e-4, atol=1e-6)


def test_a_bf16_teacher_keeps_bf16_states_and_the_loss_of_its_whole_logits(
    tiny_llama_dir, bf16_llama_dir, data_files, tmp_path
):
    """On the fly, a bf16 teacher's hidden states are held in bf16 for the batch, and the loss and its gradients
    from its logits made chunk by chunk are those of its whole logits upcast to float32."""
    config = _distill_config(tiny_llama_dir, bf16_llama_dir, data_files, tmp_path,
                             {"temperature": 2.0, "loss_chunk_tokens": 7})
    tokenizer = load_tokenizer(config.model)
    batch = collate_padded(prepare_data(config, tokenizer).train[:6], tokenizer.pad_token_id)
    teacher = load_model(config.model.model_copy(update={"name": str(bf16_llama_dir), "dtype": "bfloat16"}),
                         "distill")
    states = teacher_logits(teacher, batch, config.objective)["teacher_states"]
    assert states.hidden.dtype == torch.bfloat16 and states.hidden.shape[0] == batch["num_loss_tokens"]
    model = load_model(config.model, "distill")
    results = []
    for teacher_side in ({"teacher_states": states}, {"teacher_logits": states.logits().float()}):
        model.zero_grad()
        output = distill_loss(model, {**batch, **teacher_side}, config.objective)
        output.loss_sum.backward()
        results.append((output.loss_sum.detach(), [parameter.grad.clone() for parameter in model.parameters()]))
    assert torch.equal(results[0][0], results[1][0])
    for chunked, whole in zip(results[0][1], results[1][1], strict=True):
        assert torch.equal(chunked, whole)


def test_distilling_lowers_the_kl_to_the_teacher_on_held_out_data(tiny_llama_dir, teacher_dir, data_files, tmp_path):
    config = _distill_config(
        tiny_llama_dir, teacher_dir, data_files, tmp_path / "run",
        train={"max_steps": 12, "lr": 3e-3, "eval_before": True},
    )
    result = train(config)
    before, after = result.summary["eval_before"], result.summary["eval"]
    assert after["teacher_kl"] < 0.7 * before["teacher_kl"]
    assert (result.run_dir / "model" / "model.safetensors").is_file()


def test_jsd_with_top_k_teacher_and_lora_student(tiny_llama_dir, teacher_dir, data_files, tmp_path):
    """The top-k path, temperature, a peft student (its reference is the base with adapters disabled)."""
    config = _distill_config(
        tiny_llama_dir, teacher_dir, data_files, tmp_path / "run",
        {"divergence": "jsd", "beta": 0.5, "teacher_top_k": 16, "temperature": 2.0, "alpha": 0.2},
        method={"name": "lora", "r": 8}, train={"max_steps": 8, "lr": 1e-2, "eval_before": True},
    )
    result = train(config)
    before, after = result.summary["eval_before"], result.summary["eval"]
    assert after["divergence"] < before["divergence"]
    assert (result.run_dir / "adapter").is_dir()


def test_teacher_with_another_tokenizer_is_refused(tiny_llama_dir, foreign_teacher_dir, data_files, tmp_path):
    config = _distill_config(tiny_llama_dir, foreign_teacher_dir, data_files, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"^objective.teacher: .* uses another tokenizer than the student"):
        train(config)
