"""One optimizer step of VLM LoRA: gradient accumulation and gradient checkpointing change memory
and scheduling, never the update (tiny random models, no Ray)."""

from __future__ import annotations

import pytest
import torch

from rsdist.train.vlm import VlmTrainConfig, accumulate_gradients, apply_lora, enable_gradient_checkpointing, encode_batch, supervised_tokens
from rsdist.models.vlm import load_vlm
from tests.train.test_vlm import ROWS, png

# Four rows with answers of different lengths, one text-only: micro-batches differ in padding and token counts.
FOUR = ROWS + [
    {"sample_id": "c", "image": png(64, 48, seed=2), "conversations": [{"from": "human", "value": "<image>\nDescribe the image."},
                                                                     {"from": "gpt", "value": "many planes are parked near the terminal of an airport"}]},
    {"sample_id": "d", "image": png(48, 64, seed=3), "conversations": [{"from": "human", "value": "<image>\nIs there a road?"}, {"from": "gpt", "value": "no"}]},
]


def lora_model(name: str, vision: str = "frozen"):
    base, processor = load_vlm(name, seed=3)
    torch.manual_seed(3)
    return apply_lora(base, VlmTrainConfig(model=name, vision=vision, lora_dropout=0.0)), processor


def gradients(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("name", ["qwen2-vl-tiny", "llava-tiny"])
def test_accumulated_micro_batches_give_the_gradients_of_one_batch(name):
    model, processor = lora_model(name)
    encode = lambda rows: encode_batch(processor, rows, max_pixels=56 * 56)  # noqa: E731
    halves = [encode(FOUR[:2]), encode(FOUR[2:])]
    assert supervised_tokens(halves[0]) != supervised_tokens(halves[1])  # a plain mean of micro-batch means would differ
    loss_accum = accumulate_gradients(model, halves)
    accumulated = gradients(model)
    model.zero_grad(set_to_none=True)
    loss_one = accumulate_gradients(model, [encode(FOUR)])
    one = gradients(model)
    assert loss_accum == pytest.approx(loss_one, rel=1e-5)
    assert accumulated.keys() == one.keys() and any("lora_B" in n for n in one)
    for n in one:
        torch.testing.assert_close(accumulated[n], one[n], rtol=1e-4, atol=1e-6, msg=n)


def test_a_step_without_supervised_tokens_is_refused():
    model, processor = lora_model("qwen2-vl-tiny")
    batch = encode_batch(processor, ROWS[1:], max_pixels=56 * 56)
    batch["labels"][:] = -100
    with pytest.raises(ValueError, match="train.vlm.max_tokens"):
        accumulate_gradients(model, [batch])


@pytest.mark.parametrize("name", ["qwen2-vl-tiny", "idefics3-tiny"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(name):
    model, processor = lora_model(name, vision="lora")
    batch = encode_batch(processor, FOUR, max_pixels=56 * 56)
    model.train()
    plain_loss = accumulate_gradients(model, [batch])
    plain = gradients(model)
    model.zero_grad(set_to_none=True)
    enable_gradient_checkpointing(model)
    assert model.is_activation_checkpointing
    checkpointed_loss = accumulate_gradients(model, [batch])
    checkpointed = gradients(model)
    assert checkpointed_loss == pytest.approx(plain_loss, rel=1e-6)
    assert checkpointed.keys() == plain.keys()
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], rtol=1e-4, atol=1e-6, msg=n)


def test_strategy_is_ddp_or_fsdp():
    from rsdist.config import ConfigError

    assert VlmTrainConfig().strategy == "ddp"
    with pytest.raises(ConfigError, match=r"train.vlm.strategy: 'zero3' is not one of: ddp, fsdp"):
        VlmTrainConfig(strategy="zero3")
