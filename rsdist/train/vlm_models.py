"""Image-text-to-text models and processors for VLM instruction tuning, by name.

- `qwen2-vl-tiny`: a random Qwen2-VL built from a small config (vision depth 1, LM 2 layers of
  width 64) with a byte-level BPE tokenizer trained here on a fixed corpus, for tests (no hub).
- `hf:<folder>`: any local checkpoint `AutoModelForImageTextToText` and `AutoProcessor` load
  (Qwen2-VL / Qwen2.5-VL first); its own chat template is replaced by the family's training
  template below, which marks assistant turns with `{% generation %}` so that the processor's
  `return_assistant_tokens_mask` yields the label mask.

The training templates render the canonical `conversations` column after `to_messages` turned it
into chat messages; the assistant's content and its end-of-turn token are the only supervised
tokens.
"""

from __future__ import annotations

import os

import torch

# Qwen2-VL's chat template (system prompt, <|im_start|>role ... <|im_end|>, images as
# <|vision_start|><|image_pad|><|vision_end|>) with the assistant's content and <|im_end|> marked.
QWEN2_VL_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{% for content in message['content'] %}{{ content['text'] }}{% endfor %}<|im_end|>{% endgeneration %}{{ '\\n' }}"
    "{% else %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

QWEN2_VL_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]

# Where each family keeps its parts (module paths in the HF model): the vision blocks, the
# projector, the language model; and the Linear names LoRA may target in each.
PARTS = {
    "qwen2_vl": {"vision": "model.visual.blocks", "projector": "model.visual.merger", "lm": "model.language_model",
                 "vision_linears": ("qkv", "proj", "fc1", "fc2")},
}
PARTS["qwen2_5_vl"] = {**PARTS["qwen2_vl"], "vision_linears": ("qkv", "proj", "gate_proj", "up_proj", "down_proj")}

TEMPLATES = {"qwen2_vl": QWEN2_VL_TEMPLATE, "qwen2_5_vl": QWEN2_VL_TEMPLATE}

_CORPUS = [
    "You are a helpful assistant.",
    "Classify the image from the following classes. Answer in one word or a short phrase.",
    "Answer the question using a single word or phrase.",
    "Describe the image in detail. What is in the image? How many buildings are there?",
    "airport, bare land, baseball field, beach, bridge, center, church, commercial, dense residential, desert, farmland,",
    "forest, industrial, meadow, medium residential, mountain, park, parking, playground, pond, port, railway station,",
    "resort, river, school, sparse residential, square, stadium, storage tanks, viaduct. yes no 0 1 2 3 4 5 6 7 8 9",
    "many planes are parked near the terminal of an airport. a river runs through green trees and fields.",
    "Is there a road? Are there more houses than trees? The image shows a dense residential area with roads.",
]


def tiny_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on a fixed corpus, with Qwen2-VL's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=QWEN2_VL_SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="right", additional_special_tokens=QWEN2_VL_SPECIAL[1:])


def _image_only_processor_class():
    """Qwen2VLProcessor that accepts no video processor (its video processor needs torchvision,
    which an image-only CPU install lacks); images and text behave exactly as in the parent."""
    from transformers import Qwen2VLProcessor

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument is None and argument_name == "video_processor":
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return ImageOnlyQwen2VLProcessor


def tiny_qwen2_vl(seed: int = 0):
    """(model, processor) of a random Qwen2-VL small enough for CPU tests."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = tiny_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN2_VL_SPECIAL}
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=2048, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                           vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 112 * 112})
    processor = _image_only_processor_class()(image_processor=image_processor, tokenizer=tokenizer, video_processor=None, chat_template=QWEN2_VL_TEMPLATE)
    return model, processor


def load_vlm(name: str, seed: int = 0):
    """(model, processor) by name: `qwen2-vl-tiny` or `hf:<folder>` (a local checkpoint)."""
    if name == "qwen2-vl-tiny":
        return tiny_qwen2_vl(seed)
    if name.startswith("hf:"):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        path = name[3:]
        if not os.path.isdir(path):
            raise FileNotFoundError(f"train.vlm.model: {name} is not a local checkpoint folder")
        model = AutoModelForImageTextToText.from_pretrained(path)
        processor = AutoProcessor.from_pretrained(path)
        family = model.config.model_type
        if family not in TEMPLATES:
            raise ValueError(f"train.vlm.model: {path} is a {family!r} model; supported: {', '.join(sorted(TEMPLATES))}")
        processor.chat_template = TEMPLATES[family]
        return model, processor
    raise ValueError(f"train.vlm.model: {name!r} is not one of: qwen2-vl-tiny, hf:<folder>")
