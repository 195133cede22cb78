"""VLM-internal features on tiny random Qwen2-VL, LLaVA and Idefics3 (SmolVLM) models built from their configs."""

from __future__ import annotations

import functools

import pytest
import torch

from rsdist.features.vlm import FAMILIES, language_layers, tiny_vlm, top_mass_tokens, vlm_features

@functools.lru_cache(maxsize=None)
def _model(family: str, layers: int = 4):
    """One random model per family and depth for the whole module (building them is the slow part)."""
    return tiny_vlm(family, layers=layers)


USER = [10, 11, 12, 13, 14]
ANSWER = [20, 21, 22]


def _inputs(family: str, texts: list[list[int]], seed: int = 0) -> tuple[dict, torch.Tensor]:
    """A batch of [bos, image tokens..., user tokens, answer tokens] and its user-token mask."""
    g = torch.Generator().manual_seed(seed)
    b = len(texts)
    if family == "qwen2_vl":
        image = [252] + [250] * 4 + [253]  # a 4 x 4 patch grid merged 2 x 2 -> 4 tokens
        extra = {"pixel_values": torch.randn(16 * b, 3 * 2 * 14 * 14, generator=g), "image_grid_thw": torch.tensor([[1, 4, 4]] * b)}
    elif family == "idefics3":
        image = [251] + [250] * 4 + [251]  # <fake_token_around_image>, 16 patches shuffled 2 x 2 -> 4 tokens
        extra = {"pixel_values": torch.randn(b, 1, 3, 32, 32, generator=g)}
    else:
        image = [250] * 16  # 32 px / 8 px patches
        extra = {"pixel_values": torch.randn(b, 3, 32, 32, generator=g)}
    rows = [[1] + image + t for t in texts]
    ids = torch.tensor(rows)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **extra}
    if family == "qwen2_vl":
        inputs["mm_token_type_ids"] = (ids == 250).int()
    user = torch.zeros_like(ids, dtype=torch.bool)
    user[:, 1 + len(image) : 1 + len(image) + len(USER)] = True
    return inputs, user


@pytest.mark.parametrize("family", FAMILIES)
def test_shapes_norms_and_determinism(family):
    model = _model(family)
    inputs, user = _inputs(family, [USER + ANSWER, USER + [23, 24, 25]])
    out = vlm_features(model, inputs, user, coincide_layers=(1, 3))
    assert out["coincide_emb"].shape == (2, 2 * 2 * 32)
    torch.testing.assert_close(out["coincide_emb"].norm(dim=-1), torch.ones(2))
    assert out["scalselect_emb"].shape == (2, 32) and torch.isfinite(out["scalselect_emb"]).all()
    n_vision = int((inputs["input_ids"][0] == 250).sum())
    assert all(1 <= k <= n_vision for k in out["scalselect_tokens"].tolist())
    again = vlm_features(model, inputs, user, coincide_layers=(1, 3))
    torch.testing.assert_close(again["coincide_emb"], out["coincide_emb"])
    torch.testing.assert_close(again["scalselect_emb"], out["scalselect_emb"])
    first = {k: v[: len(v) // 2] for k, v in inputs.items()}  # sample 0 alone (Qwen2-VL: its 16 patch rows)
    single = vlm_features(model, first, user[:1], coincide_layers=(1, 3))
    torch.testing.assert_close(single["coincide_emb"][0], out["coincide_emb"][0], rtol=1e-4, atol=1e-5)  # batching does not matter


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_stops_after_the_last_layer_needed(family):
    model = _model(family)
    layers = language_layers(model)
    calls = [0] * len(layers)
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1)) for i, layer in enumerate(layers)]
    inputs, user = _inputs(family, [USER + ANSWER])
    vlm_features(model, inputs, user, coincide_layers=None, scalselect=True)
    assert calls == [1, 0, 0, 0]  # ScalSelect alone: only layer 0 runs
    vlm_features(model, inputs, user, coincide_layers=(2,))
    assert calls == [2, 1, 1, 0]
    for h in handles:
        h.remove()
    assert all(not layer._forward_hooks for layer in layers)  # vlm_features left no hooks behind


@pytest.mark.parametrize("family", FAMILIES)
def test_image_and_text_positions(family):
    """Image tokens come before the text, so under causal attention the image half of every COINCIDE
    layer cannot depend on the text and the text half must; ScalSelect's representation is built
    from image positions only, whose layer-0 states do not depend on the text either."""
    model = _model(family)
    a, user = _inputs(family, [USER + ANSWER])
    b, _ = _inputs(family, [[30, 31, 32, 33, 34, 35, 36, 37]])
    fa = vlm_features(model, a, user, coincide_layers=(0, 2))
    fb = vlm_features(model, b, user, coincide_layers=(0, 2))
    halves_a, halves_b = fa["coincide_emb"].view(4, 32), fb["coincide_emb"].view(4, 32)  # v0, t0, v2, t2
    torch.testing.assert_close(halves_a[[0, 2]], halves_b[[0, 2]])
    assert not torch.allclose(halves_a[[1, 3]], halves_b[[1, 3]])


@pytest.mark.parametrize("family", FAMILIES)
def test_layer0_attention_matches_the_models_own(family):
    """The recomputed layer-0 attention equals the eager attention map the model itself returns
    (asked for here only as the reference), and ScalSelect's states equal hidden_states[1]."""
    from rsdist.features import vlm

    model = tiny_vlm(family, layers=2)
    model.config._attn_implementation = "eager"
    for sub in (model.config.text_config,):
        sub._attn_implementation = "eager"
    inputs, user = _inputs(family, [USER + ANSWER, USER + [23, 24, 25]])
    with torch.inference_mode():
        ref = model(**inputs, output_attentions=True, output_hidden_states=True)
    vision = inputs["input_ids"] == 250
    layers = language_layers(model)
    capture = vlm._Capture(layers, [], scalselect=True)
    try:
        with torch.inference_mode():
            model(**inputs, use_cache=False)
    except vlm._StopForward:
        pass
    finally:
        capture.remove()
    mine = vlm.layer0_user_to_vision_attention(capture.layer0, inputs["attention_mask"], user, vision)
    for i in range(2):
        expected = ref.attentions[0][i][:, user[i]][:, :, vision[i]].mean(dim=(0, 1))
        torch.testing.assert_close(mine[i], expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(capture.layer0["hidden"], ref.hidden_states[1])


def test_top_mass_keeps_the_smallest_set():
    w = torch.tensor([0.05, 0.6, 0.25, 0.1])
    assert top_mass_tokens(w, 0.8).tolist() == [1, 2]
    assert top_mass_tokens(w, 0.9).tolist() == [1, 2, 3]
    assert top_mass_tokens(w, 0.5).tolist() == [1]
    assert top_mass_tokens(torch.zeros(3), 0.9).numel() == 3  # no mass: uniform, so all of them


def test_layers_outside_the_model_are_named():
    model = _model("llava", 2)
    inputs, user = _inputs("llava", [USER + ANSWER])
    with pytest.raises(ValueError, match="coincide layer 3 is outside the model's 2 language layers"):
        vlm_features(model, inputs, user, coincide_layers=(3,))


@pytest.mark.parametrize("family", FAMILIES)
def test_coincide_equals_a_reference_from_hidden_states_and_attentions(family):
    """COINCIDE's vector rebuilt from the model's own eager attention maps and hidden states (asked
    for here only as the reference): o_proj(attn_l @ v_proj(norm(hidden_states[l]))), masked means,
    tanh, normalise, concatenate."""
    import math

    import torch.nn.functional as F

    model = tiny_vlm(family, layers=3)
    model.config._attn_implementation = "eager"
    model.config.text_config._attn_implementation = "eager"
    inputs, user = _inputs(family, [USER + ANSWER, USER + [23, 24, 25]])
    with torch.inference_mode():
        ref = model(**inputs, output_attentions=True, output_hidden_states=True)
        image = inputs["input_ids"] == 250
        text = inputs["attention_mask"].bool() & ~image
        parts = []
        for l in (0, 2):
            layer = language_layers(model)[l]
            attn = layer.self_attn
            v = attn.v_proj(layer.input_layernorm(ref.hidden_states[l]))
            b, t, _ = v.shape
            v = v.view(b, t, -1, attn.head_dim).transpose(1, 2)
            weights = ref.attentions[l]
            v = v.repeat_interleave(weights.shape[1] // v.shape[1], dim=1)
            o = attn.o_proj((weights @ v).transpose(1, 2).reshape(b, t, -1))
            for mask in (image, text):
                m = mask.unsqueeze(-1).float()
                parts.append(F.normalize(torch.tanh((o * m).sum(1) / m.sum(1)), dim=-1))
        expected = torch.cat(parts, dim=-1) / math.sqrt(len(parts))
    out = vlm_features(model, inputs, user, coincide_layers=(0, 2), scalselect=False)
    torch.testing.assert_close(out["coincide_emb"], expected, rtol=1e-4, atol=1e-5)
