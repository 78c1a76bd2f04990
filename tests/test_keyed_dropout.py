"""Keyed dropout (training/keyed_dropout.py): masks from a part's seed and a module's number, the same for the same
pair whatever the thread, dropping p of the elements, unbiased; plain nn.Dropout where no seed is set."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tunesmith.config import ModelConfig
from tunesmith.methods import METHODS
from tunesmith.models import load_model
from tunesmith.training.keyed_dropout import (
    KeyedDropout,
    dropout_seed,
    dropped_count,
    keep_bits,
    keep_mask,
    keyed_dropout_in,
    mix_seed,
    part_seeds,
)
from tunesmith.training.parallel_rows import active_dropout


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_a_mask_drops_p_of_every_lane_and_repeats_for_its_seed(p):
    shape = torch.Size([256, 1000])
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        keep = keep_mask(shape, p, seed=7)
        torch.set_num_threads(2)
        assert torch.equal(keep_mask(shape, p, seed=7), keep)
    finally:
        torch.set_num_threads(saved)
    assert keep.shape == shape and keep.dtype == torch.bool
    assert not torch.equal(keep_mask(shape, p, seed=8), keep)
    assert torch.equal(keep_bits(shape, p, seed=7), -keep.to(torch.int16))  # all ones (-1) where kept
    lanes = keep.flatten().view(-1, 4)  # each 64-bit draw gives four 16-bit lanes: every lane drops p
    sigma = math.sqrt(p * (1 - p) / lanes.shape[0])
    for lane in range(4):
        assert abs(1 - lanes[:, lane].float().mean().item() - p) < 5 * sigma, lane
    # unbiased: the kept elements scaled by 1 / keep rate (p as 1/32768) average to the input
    rescale = 32768 / (32768 - dropped_count(p))
    assert abs(dropped_count(p) / 32768 - p) <= 1 / 65536
    assert abs((keep.float() * rescale).mean().item() - 1) < 5 * sigma * rescale / 2


def test_keyed_dropout_is_nn_dropout_without_a_seed_and_its_own_mask_with_one():
    x = torch.randn(3, 5, 40, requires_grad=True)
    first, second = KeyedDropout(0.25, key=0), KeyedDropout(0.25, key=1)
    torch.manual_seed(1)
    plain = first(x)
    torch.manual_seed(1)
    assert torch.equal(plain, F.dropout(x, 0.25, training=True))
    assert torch.equal(first.eval()(x), x)
    first.train()

    with dropout_seed(11):
        dropped = first(x)
        assert torch.equal(first(x), dropped)  # the same part, the same module: the same mask (a recomputed layer)
        assert not torch.equal(second(x), dropped)
        dropped.sum().backward()
        with dropout_seed(None):  # nested: no seed inside, the outer one back after
            torch.manual_seed(1)
            assert torch.equal(first(x), plain)
        assert torch.equal(first(x), dropped)
    keep, rescale = keep_mask(x.shape, 0.25, mix_seed(11, 0)), 32768 / (32768 - dropped_count(0.25))
    torch.testing.assert_close(dropped, x * keep * rescale, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, keep * rescale, rtol=0, atol=0)
    with dropout_seed(12):
        assert not torch.equal(first(x), dropped)


def test_in_half_precision_and_under_autocast_the_mask_is_made_again_in_the_backward():
    """bf16 inputs, and float32 ones under bf16 autocast (cast first, as the matmul after would): the float32
    mask's kept elements, in bf16, and the same mask in the gradient, with nothing saved for the backward."""
    dropout = KeyedDropout(0.25, key=3)
    keep = keep_mask(torch.Size([4, 50]), 0.25, mix_seed(11, 3))
    saved: list[torch.Tensor] = []
    for x, autocast in ((torch.randn(4, 50, dtype=torch.bfloat16), False), (torch.randn(4, 50), True)):
        x.requires_grad_(True)
        with (dropout_seed(11), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast),
              torch.autograd.graph.saved_tensors_hooks(lambda tensor: saved.append(tensor) or tensor, lambda t: t)):
            dropped, rescale = dropout.drop(x)
        assert saved == []
        assert dropped.dtype == torch.bfloat16 and rescale == 32768 / (32768 - dropped_count(0.25))
        assert torch.equal(dropped, (x.detach() * keep).to(torch.bfloat16))
        with dropout_seed(None):  # the backward needs no seed set: the mask's seed travels with the graph
            (dropped.float() * torch.arange(50.0)).sum().backward()
        assert torch.equal(x.grad, (keep * torch.arange(50.0)).to(torch.bfloat16).to(x.dtype))


def test_part_seeds_come_from_the_process_generator():
    torch.manual_seed(3)
    seeds = part_seeds(2)
    torch.manual_seed(3)
    assert part_seeds(2) == seeds and seeds[0] != seeds[1]


def test_lora_dropouts_are_keyed_and_numbered(tiny_llama_dir):
    lora = METHODS.get("lora")
    model = lora.apply(load_model(ModelConfig(name=str(tiny_llama_dir)), "sft"), lora.settings(r=2, dropout=0.1), "sft")
    keyed = [module for module in model.modules() if isinstance(module, KeyedDropout)]
    linears = [module for module in model.modules() if hasattr(module, "lora_dropout")]
    assert len(keyed) == len(linears) == 14  # 7 linears in each of 2 layers
    assert sorted(module.key for module in keyed) == list(range(14))
    assert keyed_dropout_in(model) and active_dropout(model) is None  # parallel rows may split its rows
    without = lora.apply(load_model(ModelConfig(name=str(tiny_llama_dir)), "sft"), lora.settings(r=2), "sft")
    assert not keyed_dropout_in(without)


def test_lycoris_rank_and_module_dropout_count_as_active_dropout(tiny_llama_dir):
    """LoHa's rank and module dropout draw with torch.rand in the forward: parallel rows would not repeat."""
    loha = METHODS.get("loha")
    for setting in ("rank_dropout", "module_dropout"):
        model = loha.apply(load_model(ModelConfig(name=str(tiny_llama_dir)), "sft"),
                           loha.settings(r=2, **{setting: 0.1}), "sft")
        assert f"{setting}=0.1" in active_dropout(model)
    plain = loha.apply(load_model(ModelConfig(name=str(tiny_llama_dir)), "sft"), loha.settings(r=2), "sft")
    assert active_dropout(plain) is None
