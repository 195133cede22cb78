"""Image-text-to-text models and processors for VLM instruction tuning, by name.

Tiny random models (for tests; built from small configs, tokenizers trained here, no hub):
- `qwen2-vl-tiny`: Qwen2-VL (vision depth 1, LM 2 layers of width 64);
- `llava-tiny`: LLaVA-1.5 (CLIP vision tower 32 px / patch 8, MLP projector, Llama LM);
- `llava-next-tiny`: LLaVA-NeXT (the same towers, any-resolution tiles from a small pinpoint grid);
- `idefics3-tiny`: Idefics3 / SmolVLM (SigLIP-style vision 32 px / patch 8, pixel-shuffle connector,
  Llama LM; no image splitting).
`hf:<folder>`: any local checkpoint `AutoModelForImageTextToText` and `AutoProcessor` load whose
family is in FAMILIES (qwen2_vl, qwen2_5_vl, llava, llava_next, idefics3, smolvlm).

Each family's own chat template is replaced by its training template below: the same layout as
the family's (Qwen's <|im_start|> turns, LLaVA-1.5's Vicuna "USER: ... ASSISTANT:", Idefics3's
"User: ...<end_of_utterance>"), with every assistant turn inside `{% generation %}` so that the
processor's `return_assistant_tokens_mask` gives the label mask. The supervised tokens of a turn
are `answer_prefix + answer` and the family's `end_token`; the generation prompt
(`add_generation_prompt=True`) ends right before `answer_prefix`, so generation at evaluation
continues exactly where training supervision starts.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass

import torch

# Qwen2-VL: system prompt, <|im_start|>role ... <|im_end|>, images as <|vision_start|><|image_pad|><|vision_end|>.
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

# LLaVA-1.5 / LLaVA-NeXT (Vicuna v1): "<s>SYSTEM USER: <image>\nQ ASSISTANT: A</s>USER: Q2 ASSISTANT: A2</s>".
LLAVA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the human's questions.")
LLAVA_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}" + LLAVA_SYSTEM + " {% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "ASSISTANT:{% generation %} {% for content in message['content'] %}{{ content['text'] }}{% endfor %}{{ eos_token }}{% endgeneration %}"
    "{% else %}"
    "{% if message['role'] == 'user' %}USER: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<image>\n{% else %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %} "
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# Idefics3 / SmolVLM: "<bos>User:<image>Q<end_of_utterance>\nAssistant: A<end_of_utterance>\n".
IDEFICS3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}:"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %} {% for content in message['content'] %}{{ content['text'] }}{% endfor %}<end_of_utterance>{% endgeneration %}{{ '\\n' }}"
    "{% else %}"
    "{% if message['content'] is string %} {{ message['content'] }}{% else %}"
    "{% if message['content'][0]['type'] != 'image' %} {% endif %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<image>{% else %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


@dataclass(frozen=True)
class Family:
    """How one model family is trained: its template, what each assistant turn supervises, and
    where its parts live (module paths) with the Linear names LoRA may target in the vision blocks."""

    template: str
    answer_prefix: str  # text the template puts before the answer inside the generation block
    end_token: str  # closes every assistant turn (supervised); "eos" = the tokenizer's eos token
    vision: str
    projector: str
    lm: str
    vision_linears: tuple[str, ...]


_CLIP_LINEARS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
FAMILIES = {
    "qwen2_vl": Family(QWEN2_VL_TEMPLATE, "", "<|im_end|>", "model.visual.blocks", "model.visual.merger", "model.language_model", ("qkv", "proj", "fc1", "fc2")),
    "qwen2_5_vl": Family(QWEN2_VL_TEMPLATE, "", "<|im_end|>", "model.visual.blocks", "model.visual.merger", "model.language_model",
                         ("qkv", "proj", "gate_proj", "up_proj", "down_proj")),
    "llava": Family(LLAVA_TEMPLATE, " ", "eos", "model.vision_tower.encoder.layers", "model.multi_modal_projector", "model.language_model", _CLIP_LINEARS),
    "llava_next": Family(LLAVA_TEMPLATE, " ", "eos", "model.vision_tower.encoder.layers", "model.multi_modal_projector", "model.language_model", _CLIP_LINEARS),
    "idefics3": Family(IDEFICS3_TEMPLATE, " ", "<end_of_utterance>", "model.vision_model.encoder.layers", "model.connector", "model.text_model", _CLIP_LINEARS),
    "smolvlm": Family(IDEFICS3_TEMPLATE, " ", "<end_of_utterance>", "model.vision_model.encoder.layers", "model.connector", "model.text_model", _CLIP_LINEARS),
}
TINY = ("qwen2-vl-tiny", "llava-tiny", "llava-next-tiny", "idefics3-tiny")


def family_of(model) -> Family:
    """The Family of a (peft-wrapped or plain) model, or a one-line error naming the supported ones."""
    name = model.config.model_type
    if name not in FAMILIES:
        raise ValueError(f"train.vlm.model: {name!r} models are not supported; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def end_token_id(family: Family, tokenizer) -> int:
    """Token id that closes an assistant turn in this family's template."""
    return tokenizer.eos_token_id if family.end_token == "eos" else tokenizer.convert_tokens_to_ids(family.end_token)


_CORPUS = [
    "You are a helpful assistant.",
    "A chat between a curious human and an artificial intelligence assistant. USER: ASSISTANT: User: Assistant:",
    "Classify the image from the following classes. Answer in one word or a short phrase.",
    "Answer the question using a single word or phrase.",
    "Describe the image in detail. What is in the image? How many buildings are there?",
    "airport, bare land, baseball field, beach, bridge, center, church, commercial, dense residential, desert, farmland,",
    "forest, industrial, meadow, medium residential, mountain, park, parking, playground, pond, port, railway station,",
    "resort, river, school, sparse residential, square, stadium, storage tanks, viaduct. yes no 0 1 2 3 4 5 6 7 8 9",
    "many planes are parked near the terminal of an airport. a river runs through green trees and fields.",
    "Is there a road? Are there more houses than trees? The image shows a dense residential area with roads.",
]

QWEN2_VL_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
LLAVA_SPECIAL = ["<pad>", "<s>", "</s>", "<image>"]
IDEFICS3_SPECIAL = (["<pad>", "<|begin_of_text|>", "<|end_of_text|>", "<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
                    + [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)])


def tiny_tokenizer(special: list[str] = QWEN2_VL_SPECIAL, eos: str = "<|im_end|>", pad: str = "<|endoftext|>", bos: str | None = None, vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on a fixed corpus, with the given special tokens (Qwen2-VL's by default)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size + len(special), special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer)
    named = {"eos_token": eos, "pad_token": pad, **({"bos_token": bos} if bos else {})}
    extra = [t for t in special if t not in named.values()]
    return PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="right", additional_special_tokens=extra, **named)


def _tiny_llama(tokenizer) -> dict:
    """Text config of a 2-layer Llama of width 64 over `tokenizer`'s vocabulary."""
    return dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)


_TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)


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


def tiny_llava(seed: int = 0, next_version: bool = False):
    """(model, processor) of a random LLaVA-1.5 (or LLaVA-NeXT with `next_version`) for CPU tests:
    a 32 px CLIP vision tower with patch 8 (16 image tokens per 32 px crop), a 2-layer Llama."""
    from transformers import (LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor,
                              LlavaProcessor)
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tokenizer = tiny_tokenizer(LLAVA_SPECIAL, eos="</s>", pad="<pad>", bos="<s>")
    common = dict(vision_config=dict(model_type="clip_vision_model", **_TINY_VISION), text_config=_tiny_llama(tokenizer),
                  image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default", vision_feature_layer=-1)
    sizes = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    torch.manual_seed(seed)
    if next_version:
        pinpoints = [[32, 64], [64, 32], [64, 64]]
        model = LlavaNextForConditionalGeneration(LlavaNextConfig(**common, image_grid_pinpoints=pinpoints))
        image_processor = LlavaNextImageProcessorPil(**sizes, image_grid_pinpoints=pinpoints)
        cls = LlavaNextProcessor
    else:
        model = LlavaForConditionalGeneration(LlavaConfig(**common))
        image_processor = LlavaImageProcessorPil(**sizes)
        cls = LlavaProcessor
    processor = cls(image_processor=image_processor, tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
                    num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE)
    return model, processor


def tiny_idefics3(seed: int = 0):
    """(model, processor) of a random Idefics3 / SmolVLM for CPU tests: 32 px vision with patch 8,
    pixel-shuffle scale 2 (4 image tokens per image), no image splitting, a 2-layer Llama."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tokenizer = tiny_tokenizer(IDEFICS3_SPECIAL, eos="<end_of_utterance>", pad="<pad>", bos="<|begin_of_text|>")
    config = Idefics3Config(vision_config=dict(model_type="idefics3_vision", **_TINY_VISION), text_config=_tiny_llama(tokenizer), scale_factor=2,
                            image_token_id=tokenizer.convert_tokens_to_ids("<image>"), pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config)
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 32}, max_image_size={"longest_edge": 32}, do_image_splitting=False)
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4, chat_template=IDEFICS3_TEMPLATE)
    return model, processor


def load_vlm(name: str, seed: int = 0, dtype=None, field: str = "train.vlm.model"):
    """(model, processor) by name: one of TINY or `hf:<folder>` (a local checkpoint of a family in
    FAMILIES, loaded in `dtype`, default the checkpoint's, with the family's chat template). `field`
    is the setting errors name (the features pass loads its model here too)."""
    builders = {"qwen2-vl-tiny": tiny_qwen2_vl, "llava-tiny": tiny_llava, "llava-next-tiny": lambda seed: tiny_llava(seed, next_version=True),
                "idefics3-tiny": tiny_idefics3}
    if name in builders:
        return builders[name](seed)
    if name.startswith("hf:"):
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        path = name[3:]
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{field}: {name} is not a local checkpoint folder")
        family = AutoConfig.from_pretrained(path).model_type
        if family not in FAMILIES:
            raise ValueError(f"{field}: {path} is a {family!r} model; supported: {', '.join(sorted(FAMILIES))}")
        model = AutoModelForImageTextToText.from_pretrained(path, **({} if dtype is None else {"dtype": dtype}))
        processor = AutoProcessor.from_pretrained(path)
        processor.chat_template = FAMILIES[family].template
        return model, processor
    raise ValueError(f"{field}: {name!r} is not one of: {', '.join(TINY)}, hf:<folder>")


def fit_pixel_budget(image, max_pixels: int, min_pixels: int = 0):
    """`image` (PIL) resized, aspect kept, so that min_pixels <= width * height <= max_pixels."""
    w, h = image.size
    area = w * h
    if min_pixels <= area <= max_pixels:
        return image
    scale = math.sqrt((max_pixels if area > max_pixels else min_pixels) / area)
    size = (max(1, int(w * scale)), max(1, int(h * scale)))
    if area > max_pixels:  # rounding must not push the area back over the budget
        while size[0] * size[1] > max_pixels:
            size = (max(1, size[0] - 1), size[1]) if size[0] >= size[1] else (size[0], max(1, size[1] - 1))
    return image.resize(size)


def decode_image(row: dict, max_pixels: int, min_pixels: int):
    """The row's image as RGB PIL within the pixel budget, or None for a text-only row."""
    data = row.get("image")
    if not data:
        return None
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data)).convert("RGB")
    except Exception as e:
        raise ValueError(f"sample {row.get('sample_id')}: image cannot be decoded ({e})") from e
    return fit_pixel_budget(image, max_pixels, min_pixels)
