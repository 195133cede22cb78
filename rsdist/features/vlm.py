"""VLM-internal features for COINCIDE and ScalSelect, from one early-stopped forward with hooks.

Input: a Hugging Face image-text-to-text model (Qwen2-VL / Qwen2.5-VL, LLaVA-1.5 / LLaVA-NeXT,
Idefics3 / SmolVLM) and one batch of its processor's output (`input_ids` with the image tokens
expanded, `attention_mask`, pixel inputs), plus `user_mask` [B, T] marking the instruction (user)
tokens. Output (`vlm_features`), float32 on the CPU:
- `coincide_emb` [B, 2 L H]: per chosen layer l, the attention block's output (`o_proj`) averaged
  over image-token positions (v_l) and over the other real tokens (t_l);
  u = concat_l[normalize(tanh(v_l)), normalize(tanh(t_l))] / sqrt(2 L), so ||u|| = 1.
- `scalselect_emb` [B, H]: layer 0's attention from the user tokens to the vision tokens, averaged
  over heads and rows and normalised; the smallest set of vision tokens holding `mass` of it; the
  mean of layer 0's output hidden states (HF's hidden_states[1]) at those tokens.
Resources: one forward of the vision tower and of the language model up to the last layer needed
(max of the COINCIDE layers, 0 for ScalSelect alone): a `_StopForward` raised from that layer's
hook ends the forward there. No layer's attention map is ever requested from the model: layer 0's
is recomputed, for the user rows only, from its hooked q/k projections and rotary embedding.

Entry point: `vlm_features(model, inputs, user_mask, ...)`; `tiny_vlm(family)` builds a random model
from each family's config (tests, benchmarks). The features stage calls it from its model actors
when `features.vlm` names a model (rsdist/features/vlm_embed.py: processor, chat and user tokens).
"""

from __future__ import annotations

import math
import sys
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

COINCIDE_LAYERS = (3, 7, 11, 15, 19)
FAMILIES = ("qwen2_vl", "llava", "idefics3")


class _StopForward(Exception):
    """Raised by the hook on the last layer needed, so the rest of the language model never runs."""


def language_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of the model's language model, whichever family it is."""
    inner = getattr(model, "model", model)
    for name in ("language_model", "text_model"):
        lm = getattr(inner, name, None)
        if lm is not None:
            lm = getattr(lm, "model", lm)  # a *ForCausalLM wraps its decoder in .model
            if isinstance(getattr(lm, "layers", None), nn.ModuleList):
                return lm.layers
    raise TypeError(f"vlm: {type(model).__name__} has no language_model/text_model with .layers (families: {', '.join(FAMILIES)})")


def image_token_id(model: nn.Module) -> int:
    cfg = model.config
    token = getattr(cfg, "image_token_id", None)
    if token is None:
        token = getattr(cfg, "image_token_index", None)
    if token is None:
        raise TypeError(f"vlm: {type(model).__name__}'s config names no image_token_id")
    return int(token)


def _output_tensor(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class _Capture:
    """Forward hooks that record what the features need and stop the forward after `stop_layer`."""

    def __init__(self, layers: nn.ModuleList, coincide_layers: Sequence[int], scalselect: bool):
        self.o_proj: dict[int, torch.Tensor] = {}
        self.layer0: dict[str, object] = {}
        self.handles = []
        needed = list(coincide_layers) + ([0] if scalselect else [])
        self.stop_layer = max(needed)
        for l in coincide_layers:
            self.handles.append(layers[l].self_attn.o_proj.register_forward_hook(self._keep_o_proj(l)))
        if scalselect:
            attn = layers[0].self_attn
            self.layer0["module"] = attn
            self.handles.append(attn.register_forward_pre_hook(self._keep_attention_inputs, with_kwargs=True))
            self.handles.append(attn.q_proj.register_forward_hook(self._keep("q")))
            self.handles.append(attn.k_proj.register_forward_hook(self._keep("k")))
            self.handles.append(layers[0].register_forward_hook(self._keep_layer0_output))
        self.handles.append(layers[self.stop_layer].register_forward_hook(self._stop))

    def _keep_o_proj(self, l: int):
        def hook(module, args, output):
            self.o_proj[l] = output.detach()
        return hook

    def _keep(self, key: str):
        def hook(module, args, output):
            self.layer0[key] = output.detach()
        return hook

    def _keep_attention_inputs(self, module, args, kwargs):
        self.layer0["position_embeddings"] = kwargs.get("position_embeddings")

    def _keep_layer0_output(self, module, args, output):
        self.layer0["hidden"] = _output_tensor(output).detach()

    def _stop(self, module, args, output):
        raise _StopForward

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x [B, T, H] over the positions where mask [B, T] is set (zeros where none is)."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


def coincide_from_o_proj(o_proj: dict[int, torch.Tensor], image_mask: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    """COINCIDE's u from the captured o_proj outputs: [B, 2 L H], unit norm per row."""
    parts = []
    for l in sorted(o_proj):
        out = o_proj[l].float()
        parts.append(F.normalize(torch.tanh(_masked_mean(out, image_mask)), dim=-1))
        parts.append(F.normalize(torch.tanh(_masked_mean(out, text_mask)), dim=-1))
    return torch.cat(parts, dim=-1) / math.sqrt(len(parts))


def layer0_user_to_vision_attention(layer0: dict, attention_mask: torch.Tensor, user_mask: torch.Tensor, vision_mask: torch.Tensor) -> list[torch.Tensor]:
    """Per sample, layer 0's attention from the user rows to the vision tokens, mean over heads and
    rows: a list of [V_b] tensors. Recomputed from q/k (with the family's rotary embedding, causal
    and padding masks) for the user rows only."""
    attn = layer0["module"]
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    head_dim = attn.head_dim
    q, k = layer0["q"].float(), layer0["k"].float()
    b, t, _ = q.shape
    q = q.view(b, t, -1, head_dim).transpose(1, 2)
    k = k.view(b, t, -1, head_dim).transpose(1, 2)
    cos, sin = layer0["position_embeddings"]
    q, k = rope(q, k, cos.float(), sin.float())
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scaling = getattr(attn, "scaling", head_dim**-0.5)
    out = []
    positions = torch.arange(t, device=q.device)
    for i in range(b):
        rows = user_mask[i].nonzero().squeeze(1)
        scores = torch.einsum("hrd,htd->hrt", q[i][:, rows], k[i]) * scaling
        allowed = (positions[None, :] <= rows[:, None]) & attention_mask[i].bool()[None, :]
        probs = scores.masked_fill(~allowed[None], float("-inf")).softmax(dim=-1)
        out.append(probs[:, :, vision_mask[i]].mean(dim=(0, 1)))
    return out


def top_mass_tokens(weights: torch.Tensor, mass: float) -> torch.Tensor:
    """Indices of the smallest set of entries (largest first) holding `mass` of the normalised weights."""
    total = weights.sum()
    p = weights / total if total > 0 else torch.full_like(weights, 1.0 / len(weights))
    order = torch.argsort(p, descending=True)
    below = int((torch.cumsum(p[order], 0) < mass).sum())
    return order[: min(len(p), below + 1)]


def scalselect_from_layer0(layer0: dict, attention_mask: torch.Tensor, user_mask: torch.Tensor, vision_mask: torch.Tensor, mass: float) -> tuple[torch.Tensor, list[int]]:
    """ScalSelect's r [B, H] and, per sample, how many vision tokens were kept."""
    weights = layer0_user_to_vision_attention(layer0, attention_mask, user_mask, vision_mask)
    hidden = layer0["hidden"].float()
    reps, kept = [], []
    for i, w in enumerate(weights):
        vision_positions = vision_mask[i].nonzero().squeeze(1)
        chosen = vision_positions[top_mass_tokens(w, mass)]
        reps.append(hidden[i, chosen].mean(0))
        kept.append(len(chosen))
    return torch.stack(reps), kept


def vlm_features(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    user_mask: torch.Tensor | None = None,
    coincide_layers: Sequence[int] | None = COINCIDE_LAYERS,
    scalselect: bool = True,
    mass: float = 0.9,
) -> dict[str, object]:
    """One early-stopped forward -> {'coincide_emb': [B, 2LH], 'scalselect_emb': [B, H], 'scalselect_tokens': [B]}.

    `inputs` are the model's forward kwargs (input_ids with expanded image tokens, attention_mask,
    pixel inputs). `user_mask` [B, T] marks the instruction tokens ScalSelect reads attention from;
    by default all real non-image tokens. COINCIDE layers beyond the model's depth are an error.
    """
    layers = language_layers(model)
    coincide_layers = sorted(set(coincide_layers or ()))
    for l in coincide_layers:
        if not 0 <= l < len(layers):
            raise ValueError(f"vlm: coincide layer {l} is outside the model's {len(layers)} language layers")
    if not coincide_layers and not scalselect:
        raise ValueError("vlm: ask for coincide_layers, scalselect or both")
    input_ids = inputs["input_ids"]
    attention_mask = inputs.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    image_mask = input_ids == image_token_id(model)
    text_mask = attention_mask.bool() & ~image_mask
    if user_mask is None:
        user_mask = text_mask
    user_mask = user_mask.bool() & attention_mask.bool()
    for i in range(len(input_ids)):
        if not image_mask[i].any():
            raise ValueError(f"vlm: sample {i} of the batch has no image tokens")
        if scalselect and not user_mask[i].any():
            raise ValueError(f"vlm: sample {i} of the batch has no user tokens")

    capture = _Capture(layers, coincide_layers, scalselect)
    try:
        with torch.inference_mode():
            model(**inputs, use_cache=False)
    except _StopForward:
        pass
    finally:
        capture.remove()
    out: dict[str, object] = {}
    if coincide_layers:
        out["coincide_emb"] = coincide_from_o_proj(capture.o_proj, image_mask, text_mask).cpu()
    if scalselect:
        rep, kept = scalselect_from_layer0(capture.layer0, attention_mask, user_mask, image_mask, mass)
        out["scalselect_emb"] = rep.cpu()
        out["scalselect_tokens"] = torch.tensor(kept)
    return out


# -- tiny random models from each family's config (tests and benchmarks; no hub) -----------------
def tiny_vlm(family: str, layers: int = 4, seed: int = 0) -> nn.Module:
    """A random image-text-to-text model of `family` with a 32-wide, `layers`-deep language model."""
    import transformers

    torch.manual_seed(seed)
    text = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2)
    if family == "qwen2_vl":
        cfg = transformers.Qwen2VLConfig(
            text_config=dict(text, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}),
            vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
            image_token_id=250, video_token_id=251, vision_start_token_id=252, vision_end_token_id=253,
        )
        model = transformers.Qwen2VLForConditionalGeneration(cfg)
    elif family == "llava":
        cfg = transformers.LlavaConfig(
            vision_config=transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8),
            text_config=transformers.LlamaConfig(**text),
            image_token_index=250, projector_hidden_act="gelu", vision_feature_layer=-1, image_seq_length=16,
        )
        model = transformers.LlavaForConditionalGeneration(cfg)
    elif family == "idefics3":
        cfg = transformers.Idefics3Config(
            vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8),
            text_config=dict(model_type="llama", **text),
            image_token_id=250, scale_factor=2, pad_token_id=0,  # 16 patches, pixel-shuffled 2 x 2 -> 4 image tokens
        )
        model = transformers.Idefics3ForConditionalGeneration(cfg)
    else:
        raise ValueError(f"vlm: tiny family {family!r} is not one of: {', '.join(FAMILIES)}")
    return model.eval()
