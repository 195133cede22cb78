"""VLM-internal features inside the features pass: COINCIDE and ScalSelect columns per sample.

`VlmEmbedder` is what a model actor of the features stage holds when `features.vlm` names a model
(see embed.py's `EmbedModel`): the image-text-to-text model and its processor are loaded once per
actor; each batch becomes one chat per sample,

    user:      <image> + `features.vlm_prompt`          (the instruction ScalSelect reads from)
    assistant: the sample's first caption (or its text)

rendered by the processor's own chat template (image tokens expanded), and one early-stopped
forward (`rsdist.features.vlm.vlm_features`) gives `coincide_emb` [2 L H] and/or `scalselect_emb`
[H] per sample. The image is the CPU stage's decoded one (`features.image_size` square); the
processor resizes it to what the model wants.

ScalSelect's user tokens are the prompt's tokens, found as a token sub-sequence after the image
tokens; when a template tokenizes the prompt differently in context (no special token around it),
every real non-image token counts as a user token (logged once per actor).

Models (`features.vlm`): `qwen2-vl-tiny` (random weights and a small trained tokenizer, for tests:
the one of rsdist/models/vlm.py) or `hf:<folder>`, a local checkpoint that
`AutoModelForImageTextToText` and `AutoProcessor` load, of the families training supports
(rsdist.models.vlm.FAMILIES, whose chat template renders the chat). On CUDA the model runs in
bf16.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from rsdist.features.vlm import image_token_id, language_layers, vlm_features

log = logging.getLogger("rsdist")


@dataclass(frozen=True)
class VlmSpec:
    """What the actor needs to know about the VLM features (plain data, shipped to the actors)."""

    model: str
    methods: tuple[str, ...]
    coincide_layers: tuple[int, ...]
    mass: float
    prompt: str

    @property
    def columns(self) -> list[str]:
        return [f"{m}_emb" for m in self.methods]


def load_feature_vlm(name: str, device: str = "cpu", seed: int = 0):
    """(model, processor) for `features.vlm` in eval mode on `device` (bf16 on CUDA), loaded as
    training loads it (rsdist.models.vlm.load_vlm: same families, same chat template)."""
    from rsdist.models.vlm import load_vlm

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model, processor = load_vlm(name, seed, dtype=dtype, field="features.vlm")
    return model.to(device=device, dtype=dtype).eval(), processor


def find_subsequence(ids: Sequence[int], pattern: Sequence[int], start: int = 0) -> int:
    """Index of the first occurrence of `pattern` in `ids` at or after `start`, or -1."""
    n = len(pattern)
    if n == 0:
        return -1
    first = pattern[0]
    for i in range(start, len(ids) - n + 1):
        if ids[i] == first and list(ids[i : i + n]) == list(pattern):
            return i
    return -1


def prompt_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token: int, prompt_variants: Sequence[Sequence[int]]) -> tuple[torch.Tensor, bool]:
    """[B, T] mask of the prompt's tokens (searched after each row's last image token), and whether
    every row had them; rows without a match get every real non-image token instead."""
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    all_found = True
    for i, row in enumerate(input_ids.tolist()):
        images = [j for j, t in enumerate(row) if t == image_token]
        after = images[-1] + 1 if images else 0
        for pattern in prompt_variants:
            at = find_subsequence(row, pattern, after)
            if at >= 0:
                mask[i, at : at + len(pattern)] = True
                break
        else:
            all_found = False
            mask[i] = attention_mask[i].bool() & (input_ids[i] != image_token)
    return mask, all_found


def chat(image, prompt: str, answer: str) -> list[dict]:
    return [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]


class VlmEmbedder:
    """A VLM and its processor, loaded once; a preprocessed batch -> its `*_emb` VLM feature columns."""

    def __init__(self, spec: VlmSpec, device: str = "cpu", seed: int = 0):
        self.spec = spec
        self.device = device
        self.model, self.processor = load_feature_vlm(spec.model, device, seed)
        depth = len(language_layers(self.model))
        layers = spec.coincide_layers if "coincide" in spec.methods else ()
        bad = [l for l in layers if l >= depth]
        if bad:
            raise ValueError(f"features.coincide_layers: {bad} are outside {spec.model}'s {depth} language layers (0..{depth - 1})")
        self.coincide_layers = tuple(layers) or None
        self.image_token = image_token_id(self.model)
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        variants = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in (spec.prompt, " " + spec.prompt)]
        self.prompt_variants = [v for v in variants if v]
        self.dtype = next(self.model.parameters()).dtype
        self._warned = False

    def inputs(self, pixels: np.ndarray, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The processor's batch for uint8 images [B, S, S, 3] and each sample's captions (JSON lists)."""
        from PIL import Image

        # A sample with neither captions nor text gets an empty answer turn, as the encoder path gets an empty text.
        chats = [chat(Image.fromarray(p), self.spec.prompt, (json.loads(t) or [""])[0]) for p, t in zip(pixels, texts)]
        enc = self.processor.apply_chat_template(chats, tokenize=True, return_dict=True, return_tensors="pt", processor_kwargs={"padding": True})
        out = {}
        for k, v in enc.items():
            v = torch.as_tensor(v).to(self.device)
            out[k] = v.to(self.dtype) if v.is_floating_point() else v
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = self.inputs(batch["pixels"], batch["texts"])
        user, found = prompt_mask(inputs["input_ids"], inputs["attention_mask"], self.image_token, self.prompt_variants)
        if not found and not self._warned:
            log.warning("features.vlm: the prompt's tokens were not found in %s's rendered chat; ScalSelect reads from every text token", self.spec.model)
            self._warned = True
        feats = vlm_features(self.model, inputs, user, coincide_layers=self.coincide_layers, scalselect="scalselect" in self.spec.methods, mass=self.spec.mass)
        return {c: feats[c].numpy().astype(np.float32) for c in self.spec.columns}
