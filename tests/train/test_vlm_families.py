"""LLaVA-1.5, LLaVA-NeXT and Idefics3 / SmolVLM: tiny random models built from configs (no hub),
trained through the same encode_batch / apply_lora path as Qwen2-VL."""

from __future__ import annotations

import pytest
import torch

from rsdist.train.vlm import VlmTrainConfig, apply_lora, encode_batch
from rsdist.models.vlm import end_token_id, family_of, load_vlm
from tests.train.test_vlm import ROWS, two_step_losses

FAMILY_MODELS = ["llava-tiny", "llava-next-tiny", "idefics3-tiny"]
ANSWERS = [["an airport", "yes"], ["3"]]


@pytest.fixture(scope="module", params=FAMILY_MODELS)
def tiny(request):
    model, processor = load_vlm(request.param, seed=0)
    return request.param, model, processor


def expected_labels(model, tokenizer, answers: list[str]) -> list[int]:
    """The assistant tokens by hand: each turn's prefix + answer ids, then the family's end-of-turn token."""
    family = family_of(model)
    out = []
    for a in answers:
        out += tokenizer(family.answer_prefix + a, add_special_tokens=False)["input_ids"] + [end_token_id(family, tokenizer)]
    return out


def test_labels_are_exactly_the_assistant_tokens(tiny):
    name, model, processor = tiny
    batch = encode_batch(processor, ROWS, max_pixels=56 * 56)
    tok = processor.tokenizer
    for i, answers in enumerate(ANSWERS):
        ids, labels = batch["input_ids"][i], batch["labels"][i]
        assert labels[labels != -100].tolist() == expected_labels(model, tok, answers), name
        assert torch.equal(labels[labels != -100], ids[labels != -100])
    image_token = model.config.image_token_id
    assert (batch["input_ids"][0] == image_token).sum() > 0  # the image row carries image tokens ...
    assert (batch["input_ids"][1] == image_token).sum() == 0  # ... the text-only row none
    assert (batch["labels"][batch["input_ids"] == image_token] == -100).all()
    pad = batch["attention_mask"] == 0
    assert pad[1].any() and (batch["labels"][pad] == -100).all()
    user_text = tok("What is in the image?", add_special_tokens=False)["input_ids"]
    kept = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert not any(kept[j:j + len(user_text)] == user_text for j in range(len(kept)))  # the user turn is not supervised


def test_text_only_batches_and_mixed_batches_run(tiny):
    _, model, processor = tiny
    text_only = [ROWS[1], {**ROWS[1], "sample_id": "b2", "conversations": [{"from": "human", "value": "Is it a river?"}, {"from": "gpt", "value": "no"}]}]
    for rows in (text_only, ROWS):
        batch = encode_batch(processor, rows, max_pixels=56 * 56)
        with torch.no_grad():
            loss = model(**batch).loss
        assert torch.isfinite(loss)
    assert "pixel_values" not in encode_batch(processor, text_only, max_pixels=56 * 56)


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_one_step_lowers_the_loss_on_a_fixed_batch(name):
    base, processor = load_vlm(name, seed=1)
    model = apply_lora(base, VlmTrainConfig(model=name, vision="lora", projector="trainable", lora_r=8, lora_alpha=16, lora_dropout=0.0))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    parts = family_of(model)
    assert any(n.startswith("base_model.model." + parts.vision) and "lora_" in n for n in trainable)
    assert any(parts.projector.rsplit(".", 1)[-1] in n and "modules_to_save" in n for n in trainable)
    losses = two_step_losses(model, encode_batch(processor, ROWS, max_pixels=56 * 56))
    assert losses[1] < losses[0]


def test_a_local_checkpoint_loads_with_its_family_template_for_training_and_features(tmp_path):
    """`hf:<folder>`: the checkpoint's own weights, the family's chat template, and for the features
    pass the same model in eval mode; a folder of an unsupported family is a one-line error naming
    the setting it came from."""
    from transformers import LlamaConfig

    from rsdist.features.vlm_embed import load_feature_vlm
    from rsdist.models.vlm import FAMILIES

    model, processor = load_vlm("llava-tiny", seed=4)
    processor.chat_template = "{{ messages }}"  # the checkpoint's own template, which loading replaces
    model.save_pretrained(tmp_path / "llava")
    processor.save_pretrained(tmp_path / "llava")
    folder = f"hf:{tmp_path / 'llava'}"
    for loaded, loaded_processor in (load_vlm(folder), load_feature_vlm(folder)):
        assert loaded_processor.chat_template == FAMILIES["llava"].template
        for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
            assert torch.equal(a, b), name
    assert not load_feature_vlm(folder)[0].training
    LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match=r"features.vlm: .*llama is a 'llama' model; supported: idefics3, llava"):
        load_feature_vlm(f"hf:{tmp_path / 'llama'}")
    with pytest.raises(FileNotFoundError, match="train.vlm.model: hf:/nowhere is not a local checkpoint folder"):
        load_vlm("hf:/nowhere")
