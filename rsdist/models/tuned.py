"""The trainable dual encoder, by `train.method`: 'lora' (peft LoRA on the text tower), 'harma'
(HarMA gated adapters, rsdist/train/harma.py) or 'heads' (both towers frozen: a linear probe);
trainable heads and temperature; the rest frozen.

Also saving and loading what training produces (a checkpoint folder):
- `text_adapter/`: the peft LoRA adapter of the text tower (`save_pretrained`), method 'lora',
- `harma.pt`: the HarMA adapters' settings and state dict, method 'harma',
- `heads.pt`: both projection heads and logit_scale (plus, in epoch checkpoints, optimizer state);
  a checkpoint with neither adapter is method 'heads'.
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from rsdist.models.dual import DualEncoder
from rsdist.models.encoders import build_encoder
from rsdist.models.harma import ADAPTER_FILE as HARMA_FILE, attach_harma

ADAPTER_DIR = "text_adapter"
HEADS_FILE = "heads.pt"
HARMA_SETTINGS = ("harma_hidden", "harma_heads", "harma_mini_dim", "harma_gate_init")


class ContrastivePair(nn.Module):
    """Cached image-tower features + tokenized captions -> normalised embeddings and the scale.

    A module with a forward so DDP can wrap it (DualEncoder has none); the image tower is not
    called here because training reuses the stored tower features.
    """

    def __init__(self, encoder: DualEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, image_features: torch.Tensor, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, text_features: torch.Tensor | None = None):
        """Text comes as tokens (run through the text tower) or, with a frozen tower, as its stored features."""
        image = self.encoder.project_image(image_features)
        if text_features is None:
            text_features = self.encoder.encode_text_features(input_ids, attention_mask)
        return image, self.encoder.project_text(text_features), self.encoder.logit_scale


def lora_config(r: int, alpha: int, dropout: float, targets: list[str] | str, modules_to_save: list[str] | None = None):
    """peft's LoraConfig: `targets` module names, or one regex over the full module paths."""
    from peft import LoraConfig

    targets = targets if isinstance(targets, str) else list(targets)
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, modules_to_save=modules_to_save, bias="none")


def make_trainable(encoder: DualEncoder, r: int, alpha: int, dropout: float, targets: list[str]) -> DualEncoder:
    """Freeze everything, put LoRA on the text tower's `targets`, unfreeze heads and logit_scale."""
    from peft import get_peft_model

    for p in encoder.parameters():
        p.requires_grad_(False)
    missing = [t for t in targets if not any(name.split(".")[-1] == t for name, _ in encoder.text_tower.named_modules())]
    if missing:
        raise ValueError(f"train.lora_targets: {', '.join(missing)} not found among the text tower's modules")
    encoder.text_tower = get_peft_model(encoder.text_tower, lora_config(r, alpha, dropout, targets))
    for module in (encoder.image_head, encoder.text_head):
        for p in module.parameters():
            p.requires_grad_(True)
    encoder.logit_scale.requires_grad_(True)
    return encoder


def make_heads_only(encoder: DualEncoder) -> DualEncoder:
    """Freeze both towers; only the projection heads and logit_scale learn (a linear probe)."""
    for p in encoder.parameters():
        p.requires_grad_(False)
    for module in (encoder.image_head, encoder.text_head):
        for p in module.parameters():
            p.requires_grad_(True)
    encoder.logit_scale.requires_grad_(True)
    return encoder


def make_tunable(encoder: DualEncoder, settings: dict) -> DualEncoder:
    """Apply `settings["method"]` ('lora', 'harma' or 'heads'; TrainConfig fields as a dict) to `encoder`."""
    method = settings.get("method", "lora")
    if method == "heads":
        return make_heads_only(encoder)
    if method == "harma":
        harma = {k: settings[k] for k in HARMA_SETTINGS}
        attach_harma(encoder, hidden=harma["harma_hidden"], heads=harma["harma_heads"], mini_dim=harma["harma_mini_dim"], gate_init=harma["harma_gate_init"])
        encoder.harma_settings = harma
        return encoder
    if method != "lora":
        raise ValueError(f"train.method: {method!r} is not one of: lora, harma, heads")
    return make_trainable(encoder, settings["lora_r"], settings["lora_alpha"], settings["lora_dropout"], settings["lora_targets"])


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return trainable, total


def clamp_logit_scale(encoder: DualEncoder, max_scale: float) -> None:
    """Keep exp(logit_scale) within [1, max_scale], as CLIP does, so the loss cannot blow up."""
    with torch.no_grad():
        encoder.logit_scale.clamp_(0.0, math.log(max_scale))


def save_trained(encoder: DualEncoder, folder: str, extra: dict | None = None) -> None:
    """Write the adapter (LoRA or HarMA) and heads (plus `extra`, e.g. optimizer state) into a local folder."""
    os.makedirs(folder, exist_ok=True)
    if getattr(encoder, "harma", None) is not None:
        torch.save({"settings": encoder.harma_settings, "state": encoder.harma.state_dict()}, os.path.join(folder, HARMA_FILE))
    elif hasattr(encoder.text_tower, "peft_config"):
        encoder.text_tower.save_pretrained(os.path.join(folder, ADAPTER_DIR))
    torch.save({"heads": encoder.head_state(), **(extra or {})}, os.path.join(folder, HEADS_FILE))


def load_heads_file(folder: str) -> dict:
    return torch.load(os.path.join(folder, HEADS_FILE), map_location="cpu", weights_only=False)


def checkpoint_method(folder: str) -> str:
    """'harma' or 'lora' by the adapter the checkpoint folder holds; 'heads' when it holds none."""
    if os.path.exists(os.path.join(folder, HARMA_FILE)):
        return "harma"
    return "lora" if os.path.isdir(os.path.join(folder, ADAPTER_DIR)) else "heads"


def load_adapter_weights(encoder: DualEncoder, folder: str) -> None:
    """Load the adapter weights of `folder` into an encoder already made tunable the same way."""
    method = checkpoint_method(folder)
    if method == "heads":
        return
    if method == "harma":
        encoder.harma.load_state_dict(torch.load(os.path.join(folder, HARMA_FILE), map_location="cpu", weights_only=False)["state"])
        return
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    set_peft_model_state_dict(encoder.text_tower, load_peft_weights(os.path.join(folder, ADAPTER_DIR), device="cpu"))


def load_trained(encoder_name: str, embed_dim: int, folder: str | None, seed: int = 0) -> DualEncoder:
    """An encoder with the adapter (LoRA or HarMA) and heads of checkpoint `folder`; None gives the
    untrained model (heads at their seeded initialisation, no adapter)."""
    encoder = build_encoder(encoder_name, embed_dim=embed_dim, seed=seed)
    if folder is not None:
        if not os.path.exists(os.path.join(folder, HEADS_FILE)):
            raise FileNotFoundError(f"{folder}: not a checkpoint (no {HEADS_FILE})")
        method = checkpoint_method(folder)
        if method == "harma":
            saved = torch.load(os.path.join(folder, HARMA_FILE), map_location="cpu", weights_only=False)
            make_tunable(encoder, {"method": "harma", **saved["settings"]})
            encoder.harma.load_state_dict(saved["state"])
        elif method == "lora":
            from peft import PeftModel

            encoder.text_tower = PeftModel.from_pretrained(encoder.text_tower, os.path.join(folder, ADAPTER_DIR))
        encoder.load_head_state(load_heads_file(folder)["heads"])
    encoder.eval()
    return encoder
