"""HarMA (arXiv 2404.18253): gated adapters on the MLP outputs of a frozen dual encoder, and its loss.

Adapter, on the output h [B, T, d] of each block's MLP (T = 1 for pooled features):
    x = GELU(Linear d->hidden (h));  y = MHA(x)
    y = y + mini(y)  (optional shared mini-adapter: Linear hidden->mini, MHA(mini), gated, Linear
                      mini->hidden zero-initialised)
    z = MHA(y)   (the same attention again);  m = s(g2) z + (1 - s(g2)) x
    A(h) = h + Linear hidden->d (m)   (zero-initialised)
    h <- s(g) A(h) + (1 - s(g)) h,    s the sigmoid, gates initialised to 0.6.
The zero-initialised output projections make every adapter the identity at initialisation, so
training starts from the pretrained model.

Where adapters go in rsdist's dual encoders: in every transformer block of the text tower (after
the MLP's output projection, with the padding mask honoured), and on the image-tower features
before the image head. The image tower itself stays frozen and untouched so that training can keep
reusing the features stage's stored `image_emb` (for a ViT tower the per-block placement applies
the same way; the composite's image tower is a CNN). Text towers: BERT-style (composite, tiny) and
HF CLIP / SigLIP (`clip-tiny`, `siglip-tiny`, `hf:<folder>`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ADAPTER_FILE = "harma.pt"


def _gate(init: float) -> nn.Parameter:
    # The gate is a logit; 0.6 as in the reference code (s(0.6) ~ 0.65 on the adapter branch).
    return nn.Parameter(torch.tensor(float(init)))


class MiniAdapter(nn.Module):
    """Shared mini-adapter: hidden -> mini, attention, gated, mini -> hidden (zero-init)."""

    def __init__(self, hidden: int = 128, mini: int = 64, heads: int = 8, gate_init: float = 0.6):
        super().__init__()
        self.down = nn.Linear(hidden, mini)
        self.attn = nn.MultiheadAttention(mini, heads, batch_first=True)
        self.gate = _gate(gate_init)
        self.up = nn.Linear(mini, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, y: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        m = self.down(y)
        a, _ = self.attn(m, m, m, key_padding_mask=pad, need_weights=False)
        g = torch.sigmoid(self.gate)
        return self.up(g * a + (1 - g) * m)


class HarmaAdapter(nn.Module):
    """One gated adapter for features of width `dim` (see the module docstring for the formula)."""

    def __init__(self, dim: int, hidden: int = 128, heads: int = 8, gate_init: float = 0.6, mini: MiniAdapter | None = None):
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.mix_gate = _gate(gate_init)
        self.gate = _gate(gate_init)
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.mini = mini  # shared between adapters when given; registered once per owner
        self.pad: torch.Tensor | None = None  # key padding mask [B, T], True = padding; set per forward

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        pooled = h.dim() == 2
        seq = h.unsqueeze(1) if pooled else h
        pad = None if pooled else self.pad
        x = F.gelu(self.down(seq))
        y, _ = self.attn(x, x, x, key_padding_mask=pad, need_weights=False)
        if self.mini is not None:
            y = y + self.mini(y, pad)
        z, _ = self.attn(y, y, y, key_padding_mask=pad, need_weights=False)
        g2 = torch.sigmoid(self.mix_gate)
        adapted = seq + self.up(g2 * z + (1 - g2) * x)
        g = torch.sigmoid(self.gate)
        out = g * adapted + (1 - g) * seq
        return out.squeeze(1) if pooled else out


class AdaptedLinear(nn.Module):
    """A frozen Linear followed by an adapter on its output."""

    def __init__(self, linear: nn.Linear, adapter: HarmaAdapter):
        super().__init__()
        self.linear = linear
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.linear(x))


class HarmaAdapters(nn.Module):
    """All adapters of one dual encoder, kept in one module so they save and load as one state dict."""

    def __init__(self, text_dim: int, image_dim: int, text_layers: int, hidden: int = 128, heads: int = 8, mini_dim: int = 64, gate_init: float = 0.6):
        super().__init__()
        self.mini = MiniAdapter(hidden, mini_dim, heads, gate_init) if mini_dim else None
        self.text = nn.ModuleList(HarmaAdapter(text_dim, hidden, heads, gate_init, self.mini) for _ in range(text_layers))
        self.image = HarmaAdapter(image_dim, hidden, heads, gate_init, self.mini)


def text_blocks(text_tower: nn.Module) -> tuple[nn.Module, list[nn.Module], str]:
    """(module whose forward receives attention_mask, the transformer blocks, path of each block's
    MLP output Linear) for a BERT-style tower or an HF CLIP / SigLIP model."""
    layers = getattr(getattr(text_tower, "encoder", None), "layer", None)
    if layers is not None:  # BERT / MiniLM: layer.output.dense
        return text_tower, list(layers), "output.dense"
    text_model = getattr(text_tower, "text_model", None)
    layers = getattr(getattr(text_model, "encoder", None), "layers", None)
    if layers is not None:  # CLIP / SigLIP: text_model.encoder.layers[i].mlp.fc2
        return text_model, list(layers), "mlp.fc2"
    raise ValueError("train.method: 'harma' needs a BERT-style text tower (encoder.layer[i].output.dense) or an HF CLIP/SigLIP model (text_model.encoder.layers[i].mlp.fc2)")


def _replace(block: nn.Module, path: str, make) -> nn.Module:
    parent_path, _, name = path.rpartition(".")
    parent = block.get_submodule(parent_path) if parent_path else block
    old = getattr(parent, name)
    setattr(parent, name, make(old))
    return old


def attach_harma(encoder, hidden: int = 128, heads: int = 8, mini_dim: int = 64, gate_init: float = 0.6) -> HarmaAdapters:
    """Freeze `encoder`, insert adapters (text blocks + image features), unfreeze adapters, heads and
    logit_scale. Returns the adapters module (also set as `encoder.harma`)."""
    for p in encoder.parameters():
        p.requires_grad_(False)
    masked, layers, path = text_blocks(encoder.text_tower)
    width = layers[0].get_submodule(path).out_features
    adapters = HarmaAdapters(width, encoder.image_dim, len(layers), hidden, heads, mini_dim, gate_init)
    for layer, adapter in zip(layers, adapters.text):
        _replace(layer, path, lambda linear, a=adapter: AdaptedLinear(linear, a))

    def set_padding(_module, args, kwargs):
        mask = kwargs.get("attention_mask")
        for adapter in adapters.text:
            adapter.pad = None if mask is None else mask == 0

    masked.register_forward_pre_hook(set_padding, with_kwargs=True)
    image_head = encoder.image_head
    encoder.image_head = nn.Sequential(adapters.image, image_head)
    encoder.harma = adapters
    for module in (adapters, image_head, encoder.text_head):
        for p in module.parameters():
            p.requires_grad_(True)
    encoder.logit_scale.requires_grad_(True)
    return adapters


def harma_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, image_ids: torch.Tensor | None = None, margin: float = 0.2) -> torch.Tensor:
    """InfoNCE (rows of the same image are all positives) + the weighted triplet loss.

    Triplet: cost = [margin + s_ij - s_ii]+ over negatives in both directions, each term weighted
    by (1 - exp(-cost))^2, summed per anchor, averaged over anchors, the two directions halved.
    """
    n = image.shape[0]
    ids = torch.arange(n, device=image.device) if image_ids is None else image_ids
    positive = (ids[:, None] == ids[None, :]).to(image.dtype)
    sim = image @ text.t()
    logits = logit_scale.exp() * sim
    target = positive / positive.sum(dim=1, keepdim=True)
    nce = 0.5 * (torch.sum(-target * F.log_softmax(logits, dim=1), dim=1).mean() + torch.sum(-target * F.log_softmax(logits.t(), dim=1), dim=1).mean())
    diag = sim.diagonal()
    negative = 1 - positive
    cost_text = (margin + sim - diag[:, None]).clamp(min=0) * negative  # image i vs wrong text j
    cost_image = (margin + sim - diag[None, :]).clamp(min=0) * negative  # text j vs wrong image i
    weighted = lambda c: ((1 - torch.exp(-c)) ** 2 * c)  # noqa: E731
    triplet = 0.5 * (weighted(cost_text).sum(dim=1).mean() + weighted(cost_image).sum(dim=0).mean())
    return nce + triplet
