"""VLM instruction tuning: canonical instruction rows -> chat-templated batches with assistant-only
labels -> peft LoRA on the chosen parts of an image-text-to-text model.

Input rows (canonical schema): `conversations` (list of {from, value}; roles "human"/"gpt", an
`<image>` placeholder where the image goes), `image` (encoded bytes, may be empty: text-only row);
rows without conversations become instruction turns (rsdist/models/instructions.py: a VQA row its
question with the short-answer prompt, a labelled row GeoChat's classification prompt with the
pool's classes, a caption row "Describe the image." with its first caption).
Batches: `encode_batch` applies the model family's training chat template through the processor
(`return_assistant_tokens_mask`), so labels are the token ids of the assistant turns (their
content and end-of-turn token) and -100 everywhere else: system and user turns, image tokens,
padding. Images are resized to fit `max_pixels` (and at least `min_pixels`) keeping aspect ratio.
LoRA (`apply_lora`): language model attention + MLP projections (`lm_targets`), vision blocks
frozen or LoRA (`vision`), projector trainable (saved with the adapter through peft's
`modules_to_save`) or frozen (`projector`).
"""

from __future__ import annotations

import contextlib
import re

import torch

from rsdist.config import VlmTrainConfig
from rsdist.models.instructions import IMAGE, row_turns
from rsdist.models.tuned import lora_config
from rsdist.models.vlm import decode_image

__all__ = ["VlmTrainConfig", "to_messages", "encode_batch", "apply_lora", "accumulate_gradients"]

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


# -- rows -> chat messages ------------------------------------------------------------------------


def to_messages(row: dict, image=None, classes: list[str] | None = None) -> list[dict]:
    """Canonical turns (`row_turns`: the row as an instruction) -> chat messages with typed content;
    `image` (PIL or None) goes where the `<image>` placeholder is, or before the first user text
    when there is none."""
    messages, placed = [], False
    for i, turn in enumerate(row_turns(row, classes)):
        role = ROLES.get(turn.get("from"))
        if role is None:
            raise ValueError(f"sample {row.get('sample_id')}: turn {i} has role {turn.get('from')!r}; allowed: {', '.join(ROLES)}")
        value = turn.get("value") or ""
        if role == "assistant":
            messages.append({"role": role, "content": [{"type": "text", "text": value}]})
            continue
        content = []
        pieces = value.split(IMAGE)
        for j, piece in enumerate(pieces):
            if j and image is not None and not placed:
                content.append({"type": "image", "image": image})
                placed = True
            piece = piece.strip("\n") if len(pieces) > 1 else piece
            if piece:
                content.append({"type": "text", "text": piece})
        messages.append({"role": role, "content": content})
    if image is not None and not placed:
        first_user = next(m for m in messages if m["role"] == "user")
        first_user["content"].insert(0, {"type": "image", "image": image})
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"sample {row.get('sample_id')}: conversation has no assistant ('gpt') turn")
    return messages


def encode_batch(processor, rows: list[dict], max_pixels: int, min_pixels: int = 0, max_tokens: int | None = None, classes: list[str] | None = None) -> dict:
    """Tokenised, padded batch with `labels`: assistant tokens keep their ids, the rest is -100.
    `classes`: the pool's scene classes, listed in the prompt of a labelled row's classification turn."""
    conversations = [to_messages(row, decode_image(row, max_pixels, min_pixels), classes) for row in rows]
    kwargs = {"padding": True}
    if max_tokens:
        kwargs.update(truncation=True, max_length=max_tokens)
    out = processor.apply_chat_template(conversations, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                        return_tensors="pt", processor_kwargs=kwargs)
    mask = torch.as_tensor(out.pop("assistant_masks")).bool()
    batch = dict(out)
    batch["labels"] = batch["input_ids"].masked_fill(~mask, -100)
    return batch


# -- one optimizer step over several micro-batches --------------------------------------------------
def supervised_tokens(batch: dict) -> int:
    """Tokens the causal-LM loss counts in `batch`: labels other than -100 after the one-token shift."""
    return int((batch["labels"][:, 1:] != -100).sum())


def accumulate_gradients(model, batches: list[dict], sync=None, autocast=None) -> float:
    """Forward and backward over the micro-batches of one optimizer step; returns the step's loss.

    Each micro-batch's token losses are summed and divided by the supervised tokens of the whole
    step (`num_items_in_batch`), so the accumulated gradients are those of one batch of all rows,
    whatever the padding and answer lengths of each micro-batch. `sync(last)` is a context entered
    around each micro-batch (DDP's no_sync except on the last); `autocast` wraps the forward only.
    """
    items = sum(supervised_tokens(b) for b in batches)
    if items == 0:
        raise ValueError("train.vlm: an optimizer step has no supervised token (answers truncated away? raise train.vlm.max_tokens)")
    total = 0.0
    for i, batch in enumerate(batches):
        with sync(i == len(batches) - 1) if sync else contextlib.nullcontext():
            with autocast or contextlib.nullcontext():
                loss = model(**batch, num_items_in_batch=items).loss
            loss.backward()
        total += float(loss.detach())
    return total


def enable_gradient_checkpointing(model) -> None:
    """Activation checkpointing on every layer that supports it (non-reentrant: works with frozen
    inputs, DDP and FSDP); a model that has none raises a one-line error."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"train.vlm.gradient_checkpointing: {type(model).__name__} does not support gradient checkpointing")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


# -- LoRA on the chosen parts ------------------------------------------------------------------------
def lora_target_regex(family, cfg: VlmTrainConfig) -> str:
    """One regex over full module names: LM targets, plus the vision blocks' linears when vision=lora
    (`family`: the model's `vlm_models.Family`, where its parts live)."""
    alternatives = [rf"{re.escape(family.lm)}\..*\.({'|'.join(map(re.escape, cfg.lm_targets))})"]
    if cfg.vision == "lora":
        alternatives.append(rf"{re.escape(family.vision)}\..*\.({'|'.join(family.vision_linears)})")
    return "^(" + "|".join(alternatives) + ")$"


def apply_lora(model, cfg: VlmTrainConfig):
    """Freeze the model, add LoRA to the chosen parts, make the projector trainable when asked."""
    from peft import get_peft_model

    from rsdist.models.vlm import family_of

    family = family_of(model)  # a one-line error for an unsupported family
    pattern = lora_target_regex(family, cfg)
    names = [n for n, _ in model.named_modules() if re.match(pattern, n)]
    if not any(n.startswith(family.lm + ".") for n in names):
        raise ValueError(f"train.vlm.lm_targets: {', '.join(cfg.lm_targets)} match no module of the language model ({family.lm})")
    modules_to_save = [family.projector.rsplit(".", 1)[-1]] if cfg.projector == "trainable" else None
    config = lora_config(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, pattern, modules_to_save)
    for p in model.parameters():
        p.requires_grad_(False)
    return get_peft_model(model, config)


def parameter_counts(model) -> dict:
    """Trainable and total parameters, and the trainable share in percent."""
    from rsdist.models.tuned import count_parameters

    trainable, total = count_parameters(model)
    return {"trainable_params": trainable, "total_params": total, "trainable_percent": round(100.0 * trainable / max(total, 1), 4)}
