"""VLM instruction batches and LoRA on a tiny random Qwen2-VL built from a config (no hub)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from rsdist.config import ConfigError
from rsdist.models.vlm import fit_pixel_budget
from rsdist.train.vlm import VlmTrainConfig, apply_lora, encode_batch, parameter_counts, to_messages
from rsdist.models.vlm import tiny_qwen2_vl


def png(w: int, h: int, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype("uint8")).save(buf, "PNG")
    return buf.getvalue()


ROWS = [
    {"sample_id": "a", "image": png(100, 80), "conversations": [
        {"from": "human", "value": "<image>\nWhat is in the image?"}, {"from": "gpt", "value": "an airport"},
        {"from": "human", "value": "Is there a road?"}, {"from": "gpt", "value": "yes"}]},
    {"sample_id": "b", "image": b"", "conversations": [{"from": "human", "value": "How many?"}, {"from": "gpt", "value": "3"}]},
]


@pytest.fixture(scope="module")
def tiny():
    return tiny_qwen2_vl(seed=0)


def expected_labels(tokenizer, answers: list[str]) -> list[int]:
    """The assistant tokens by hand: each answer's ids followed by <|im_end|>, in order."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    out = []
    for a in answers:
        out += tokenizer(a, add_special_tokens=False)["input_ids"] + [end]
    return out


def test_labels_are_exactly_the_assistant_tokens(tiny):
    _, processor = tiny
    batch = encode_batch(processor, ROWS, max_pixels=56 * 56)
    tok = processor.tokenizer
    for i, answers in enumerate([["an airport", "yes"], ["3"]]):
        ids, labels = batch["input_ids"][i], batch["labels"][i]
        kept = labels[labels != -100].tolist()
        assert kept == expected_labels(tok, answers)
        assert torch.equal(labels[labels != -100], ids[labels != -100])  # kept labels are the ids themselves
    image_token = processor.image_token_id
    assert (batch["input_ids"][0] == image_token).sum() > 0
    assert (batch["labels"][batch["input_ids"] == image_token] == -100).all()
    pad = batch["attention_mask"] == 0
    assert pad[1].any() and (batch["labels"][pad] == -100).all()  # the text-only row is padded and unsupervised there
    assert batch["image_grid_thw"].shape[0] == 1  # one image in the batch: the text-only row has none


def test_image_goes_first_when_there_is_no_placeholder():
    row = {"sample_id": "c", "conversations": [{"from": "human", "value": "Describe it."}, {"from": "gpt", "value": "trees"}]}
    messages = to_messages(row, image="IMG")
    assert messages[0]["content"][0] == {"type": "image", "image": "IMG"}
    with pytest.raises(ValueError, match="sample c: turn 0 has role 'robot'"):
        to_messages({"sample_id": "c", "conversations": [{"from": "robot", "value": "x"}]})


def test_pixel_budget_keeps_aspect_and_bounds():
    big = fit_pixel_budget(Image.new("RGB", (400, 200)), max_pixels=20000)
    assert big.size[0] * big.size[1] <= 20000 and abs(big.size[0] / big.size[1] - 2) < 0.05
    small = fit_pixel_budget(Image.new("RGB", (10, 10)), max_pixels=20000, min_pixels=900)
    assert small.size[0] * small.size[1] >= 900 - 60
    same = Image.new("RGB", (50, 50))
    assert fit_pixel_budget(same, 20000, 100) is same


def test_lora_parts_follow_the_config():
    frozen, _ = tiny_qwen2_vl()
    model = apply_lora(frozen, VlmTrainConfig(vision="frozen", projector="frozen"))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n and "language_model" in n for n in names)
    full, _ = tiny_qwen2_vl()
    model = apply_lora(full, VlmTrainConfig(vision="lora", projector="trainable"))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("visual.blocks" in n and "lora_" in n for n in names)
    assert any("merger" in n and "modules_to_save" in n for n in names)
    counts = parameter_counts(model)
    assert 0 < counts["trainable_params"] < counts["total_params"]
    with pytest.raises(ConfigError, match="train.vlm.vision: 'train' is not one of: frozen, lora"):
        VlmTrainConfig(vision="train")


def two_step_losses(model, batch) -> list[float]:
    """The loss before and after one AdamW step (lr 1e-2) on the same batch."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(2):
        loss = model(**batch).loss
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses


def test_one_step_lowers_the_loss_on_a_fixed_batch(tiny):
    base, processor = tiny_qwen2_vl(seed=1)
    model = apply_lora(base, VlmTrainConfig(lora_r=8, lora_alpha=16, lora_dropout=0.0))
    losses = two_step_losses(model, encode_batch(processor, ROWS, max_pixels=56 * 56))
    assert losses[1] < losses[0]
