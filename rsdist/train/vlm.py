"""VLM instruction tuning: canonical instruction rows -> chat-templated batches with assistant-only
labels -> peft LoRA on the chosen parts of an image-text-to-text model.

Input rows (canonical schema): `conversations` (list of {from, value}; roles "human"/"gpt", an
`<image>` placeholder where the image goes), `image` (encoded bytes, may be empty: text-only row);
rows without conversations become one turn from `text` (question or "Describe the image.") and
`answer` (or the first caption).
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
from dataclasses import dataclass

import torch

from rsdist.config import ConfigError, LoraFields, _choice, _fraction, _help, _positive
from rsdist.models.tuned import lora_config
from rsdist.models.vlm import decode_image

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE = "<image>"
VISION_CHOICES = ("frozen", "lora")
PROJECTOR_CHOICES = ("trainable", "frozen")
STRATEGY_CHOICES = ("ddp", "fsdp")


@dataclass
class VlmTrainConfig(LoraFields):
    model: str = _help("Image-text-to-text model: 'qwen2-vl-tiny', 'llava-tiny', 'llava-next-tiny', 'idefics3-tiny' (random, for tests) or 'hf:<folder>' (local checkpoint).", default="qwen2-vl-tiny")
    vision: str = _help("Vision tower: 'frozen' or 'lora' (LoRA on its blocks' linears).", default="frozen")
    projector: str = _help("Vision-language projector: 'trainable' (fully) or 'frozen'.", default="trainable")
    lora_dropout: float = _help("LoRA dropout.", default=0.05)
    lm_targets: list[str] = _help("Language-model Linear names that get LoRA (attention + MLP projections).",
                                  default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    max_pixels: int = _help("Images larger than this many pixels are downscaled to fit (aspect kept).", default=448 * 448)
    min_pixels: int = _help("Images smaller than this many pixels are upscaled to reach it.", default=28 * 28)
    max_tokens: int = _help("Sequences are truncated to this many tokens.", default=2048)
    batch_size: int = _help("Conversations per micro-batch per worker.", default=4)
    grad_accum: int = _help("Micro-batches accumulated per optimizer step.", default=1)
    epochs: int = _help("Passes over the selected rows.", default=1)
    lr: float = _help("AdamW learning rate.", default=2e-4)
    weight_decay: float = _help("AdamW weight decay.", default=0.0)
    warmup_fraction: float = _help("Share of optimizer steps with linear warm-up; then linear decay to 0.", default=0.03)
    checkpoint_every: int = _help("Optimizer steps between checkpoints (and one at the end).", default=50)
    checkpoints_to_keep: int = _help("Step checkpoints kept (oldest removed).", default=2)
    num_workers: int = _help("Ray Train workers (data parallel, see strategy).", default=1)
    cpus_per_worker: float = _help("CPUs each worker asks Ray for.", default=1.0)
    bf16: bool = _help("bf16 autocast of the forward pass on GPU (ignored on CPU).", default=True)
    gradient_checkpointing: bool = _help("Recompute each layer's activations in the backward pass (saves memory, same loss).", default=False)
    strategy: str = _help("Data parallelism: 'ddp' (every worker holds the whole model) or 'fsdp' (torch FSDP2: parameters, "
                          "gradients and optimizer state sharded per layer over the workers, for models that do not fit one GPU).", default="ddp")
    max_failures: int = _help("Worker failures Ray Train recovers from (restarting at the last checkpoint).", default=0)
    seed: int = _help("Seed of initialisation and shuffling.", default=0)
    max_steps: int = _help("Stop after this many optimizer steps in all (0 = run every epoch); a later run resumes.", default=0)

    def __post_init__(self) -> None:
        _choice("train.vlm.vision", self.vision, VISION_CHOICES)
        _choice("train.vlm.projector", self.projector, PROJECTOR_CHOICES)
        _choice("train.vlm.strategy", self.strategy, STRATEGY_CHOICES)
        from rsdist.models.vlm import TINY

        if not (self.model in TINY or self.model.startswith("hf:")):
            raise ConfigError(f"train.vlm.model: {self.model!r} is not one of: {', '.join(TINY)}, hf:<folder>")
        self.check_lora("train.vlm")
        for name in ("max_pixels", "min_pixels", "max_tokens", "batch_size", "grad_accum", "epochs", "checkpoint_every", "checkpoints_to_keep", "num_workers", "cpus_per_worker", "lr"):
            _positive(f"train.vlm.{name}", getattr(self, name))
        _positive("train.vlm.weight_decay", self.weight_decay, allow_zero=True)
        _positive("train.vlm.max_failures", self.max_failures, allow_zero=True)
        _positive("train.vlm.max_steps", self.max_steps, allow_zero=True)
        _fraction("train.vlm.warmup_fraction", self.warmup_fraction, lo_open=False)
        if self.min_pixels > self.max_pixels:
            raise ConfigError(f"train.vlm.min_pixels: {self.min_pixels} must be <= train.vlm.max_pixels={self.max_pixels}")
        if not self.lm_targets:
            raise ConfigError("train.vlm.lm_targets: must name at least one module (e.g. q_proj, v_proj)")


# -- rows -> chat messages ------------------------------------------------------------------------


def row_turns(row: dict) -> list[dict]:
    """The row's conversation as [{from, value}]: `conversations`, else one turn from text/answer."""
    turns = row.get("conversations") or []
    if turns:
        return turns
    question = row.get("text") or "Describe the image."
    answer = row.get("answer") or next(iter(row.get("captions") or []), None)
    if not answer:
        raise ValueError(f"sample {row.get('sample_id')}: no conversations and no answer or caption to train on")
    return [{"from": "human", "value": f"{IMAGE}\n{question}"}, {"from": "gpt", "value": answer}]


def to_messages(row: dict, image=None) -> list[dict]:
    """Canonical turns -> chat messages with typed content; `image` (PIL or None) goes where the
    `<image>` placeholder is, or before the first user text when there is none."""
    messages, placed = [], False
    for i, turn in enumerate(row_turns(row)):
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




def encode_batch(processor, rows: list[dict], max_pixels: int, min_pixels: int = 0, max_tokens: int | None = None) -> dict:
    """Tokenised, padded batch with `labels`: assistant tokens keep their ids, the rest is -100."""
    conversations = [to_messages(row, decode_image(row, max_pixels, min_pixels)) for row in rows]
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
