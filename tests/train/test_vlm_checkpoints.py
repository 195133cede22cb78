"""`hf:<folder>` offline, for every supported family: a tiny model of each (Qwen2-VL, Qwen2.5-VL,
LLaVA-1.5, LLaVA-NeXT, Idefics3, SmolVLM) built from a config, saved with safetensors and its
tokenizer and image processor, loads through `load_vlm` with the same weights and the family's
chat template, trains a step through encode_batch and generates an answer."""

from __future__ import annotations

import json

import pytest
import torch

from rsdist.eval.vlm import generate_answers
from rsdist.models.vlm import FAMILIES, IDEFICS3_SPECIAL, QWEN2_VL_SPECIAL, _TINY_VISION, _image_only_processor_class, _tiny_llama, load_vlm, tiny_tokenizer
from rsdist.train.vlm import encode_batch
from tests.train.test_vlm import ROWS


def tiny_qwen2_5_vl():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from rsdist.models.vlm import QWEN2_VL_TEMPLATE

    tokenizer = tiny_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN2_VL_SPECIAL}
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=2048, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                              vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 112 * 112})
    processor = _image_only_processor_class()(image_processor=image_processor, tokenizer=tokenizer, video_processor=None, chat_template=QWEN2_VL_TEMPLATE)
    return Qwen2_5_VLForConditionalGeneration(config), processor


def tiny_smolvlm():
    """(model, the parts a SmolVLM folder's processor is saved from): SmolVLM's own processor class
    needs num2words and a video processor, neither of which loading it here uses."""
    from types import SimpleNamespace

    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    tokenizer = tiny_tokenizer(IDEFICS3_SPECIAL, eos="<end_of_utterance>", pad="<pad>", bos="<|begin_of_text|>")
    config = SmolVLMConfig(vision_config=dict(model_type="smolvlm_vision", **_TINY_VISION), text_config=_tiny_llama(tokenizer), scale_factor=2,
                           image_token_id=tokenizer.convert_tokens_to_ids("<image>"), pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    image_processor = SmolVLMImageProcessorPil(size={"longest_edge": 32}, max_image_size={"longest_edge": 32}, do_image_splitting=False)
    parts = SimpleNamespace(image_processor=image_processor, tokenizer=tokenizer, video_processor=None, image_seq_len=4)
    return SmolVLMForConditionalGeneration(config), parts


def save_checkpoint(model, processor, folder) -> None:
    """What a downloaded checkpoint folder holds: config + safetensors weights, tokenizer, image
    processor, processor settings (the image-only processors, which have no video processor to
    save, write their parts and settings one by one)."""
    model.save_pretrained(folder)  # safetensors
    if getattr(processor, "video_processor", "none needed") is not None:
        processor.save_pretrained(folder)
        return
    processor.tokenizer.save_pretrained(folder)
    processor.image_processor.save_pretrained(folder)
    if hasattr(processor, "image_seq_len"):
        (folder / "processor_config.json").write_text(json.dumps({"image_seq_len": processor.image_seq_len}))


BUILDERS = {
    "qwen2_vl": lambda: load_vlm("qwen2-vl-tiny"), "qwen2_5_vl": tiny_qwen2_5_vl, "llava": lambda: load_vlm("llava-tiny"),
    "llava_next": lambda: load_vlm("llava-next-tiny"), "idefics3": lambda: load_vlm("idefics3-tiny"), "smolvlm": tiny_smolvlm,
}


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_a_saved_checkpoint_of_every_family_loads_offline_trains_and_generates(family, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, processor = BUILDERS[family]()
    assert model.config.model_type == family
    save_checkpoint(model, processor, tmp_path)
    assert any(p.suffix == ".safetensors" for p in tmp_path.iterdir()) and not any(p.suffix == ".bin" for p in tmp_path.iterdir())
    loaded, loaded_processor = load_vlm(f"hf:{tmp_path}")
    assert loaded.config.model_type == family and loaded_processor.chat_template == FAMILIES[family].template
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    batch = encode_batch(loaded_processor, ROWS, max_pixels=56 * 56)
    assert torch.isfinite(loaded(**batch).loss)
    from PIL import Image

    answer = generate_answers(loaded.eval(), loaded_processor, [Image.new("RGB", (40, 30), (90, 140, 60))], ["Is there water?"], max_new_tokens=2)
    assert len(answer) == 1 and isinstance(answer[0], str)


def test_a_folder_without_safetensors_weights_is_refused(tmp_path):
    model, processor = load_vlm("llava-tiny")
    model.config.save_pretrained(tmp_path)
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"train.vlm.model: .* has no safetensors weights"):
        load_vlm(f"hf:{tmp_path}")
