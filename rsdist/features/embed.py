"""The model side of the features pass: tower features of originals and perturbed copies, and shifts.

`EmbedModel` is the callable class of the actor pool: it loads the encoder once in `__init__`
(with a deliberate number of torch threads) and maps a preprocessed batch (see preprocess.py) to
`sample_id, split, label, shard, image_emb, text_emb, shift, shift_<name>...`.
`embed_batch` is the same computation as a plain function, so a single-process loop (the
benchmark's baseline) runs exactly what the actors run.

The K seeded image perturbations are made here, just before the forward, unless the CPU stage
already sent them (`perturbed` in the batch: the GPU layout, see preprocess.py). The original and
its K perturbed copies go through the image tower in one forward of B * (1 + K) images (channels_last, inference_mode; bf16 autocast on CUDA). Text features are the mean of the
L2-normalised embeddings of all captions of a sample, computed in one forward over the batch's
captions. shift_p = 1 - cos(e(x), e(x~_p)); shift = mean over p.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from rsdist.features.perturb import perturb_batch
from rsdist.features.vlm_embed import VlmEmbedder, VlmSpec
from rsdist.models.dual import DualEncoder
from rsdist.models.encoders import build_encoder

log = logging.getLogger("rsdist")


def load_encoder(name: str, threads: int, device: str = "cpu") -> DualEncoder:
    """Build the encoder for inference on `device`, with `threads` intra-op torch threads."""
    import transformers

    torch.set_num_threads(max(1, int(threads)))
    if int(threads) <= 1:  # a single-thread actor: no tokenizer thread pool competing with the others for cores
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    transformers.logging.set_verbosity_error()  # the load report of every actor drowns the progress lines
    transformers.logging.disable_progress_bar()
    model = build_encoder(name).to(device).eval()
    model.image_tower.to(memory_format=torch.channels_last)
    return model


def _autocast(device: str):
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def image_features(model: DualEncoder, images: np.ndarray, device: str = "cpu") -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float32 tower features [N, image_dim]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device, non_blocking=True)
    x = x.permute(0, 3, 1, 2).float().contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), _autocast(device):
        return model.encode_image_features(x).float()


def mean_text_features(model: DualEncoder, caption_lists: Sequence[Sequence[str]], device: str = "cpu", max_tokens: int = 48) -> torch.Tensor:
    """Per sample, the mean of the L2-normalised embeddings of its captions: [B, text_dim]."""
    flat = [c for caps in caption_lists for c in caps]
    owner = torch.repeat_interleave(torch.arange(len(caption_lists)), torch.tensor([len(c) for c in caption_lists]))
    tokens = {k: v.to(device) for k, v in model.tokenize(flat, max_tokens).items()}
    with torch.inference_mode(), _autocast(device):
        emb = F.normalize(model.encode_text_features(**tokens).float(), dim=-1).cpu()
    sums = torch.zeros(len(caption_lists), emb.shape[1]).index_add_(0, owner, emb)
    return sums / torch.bincount(owner, minlength=len(caption_lists)).clamp(min=1).unsqueeze(1)


def cosine_shift(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return (1.0 - F.cosine_similarity(a, b, dim=-1)).numpy().astype(np.float32)


def embed_batch(
    model: DualEncoder,
    batch: dict[str, np.ndarray],
    image_perturbations: Sequence[str],
    text_perturbations: Sequence[str],
    device: str = "cpu",
    max_tokens: int = 48,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """A preprocessed batch -> features, per-perturbation shifts and their mean."""
    pixels = batch["pixels"]
    n = len(pixels)
    k = len(image_perturbations)
    if k:
        perturbed = batch.get("perturbed")
        if perturbed is None:
            perturbed = perturb_batch(pixels, batch["sample_id"], image_perturbations, seed)
        stacked = np.concatenate([pixels[:, None], perturbed], axis=1).reshape(n * (1 + k), *pixels.shape[1:])
    else:
        stacked = pixels
    feats = image_features(model, stacked, device).cpu().reshape(n, 1 + k, -1)
    image_emb = feats[:, 0]
    text_emb = mean_text_features(model, [json.loads(t) for t in batch["texts"]], device, max_tokens)
    shifts: dict[str, np.ndarray] = {}
    for j, name in enumerate(image_perturbations):
        shifts[f"shift_{name}"] = cosine_shift(image_emb, feats[:, 1 + j])
    for name in text_perturbations:
        other = mean_text_features(model, [json.loads(t) for t in batch[f"texts_{name}"]], device, max_tokens)
        shifts[f"shift_{name}"] = cosine_shift(text_emb, other)
    out = {
        "sample_id": batch["sample_id"],
        "split": batch["split"],
        "label": batch["label"],
        "shard": batch["shard"],
        "image_emb": image_emb.numpy().astype(np.float32),
        "text_emb": text_emb.numpy().astype(np.float32),
        "shift": np.mean(np.stack(list(shifts.values())), axis=0).astype(np.float32),
    }
    out.update(shifts)
    if "row" in batch:
        out["row"] = batch["row"]
    return out


class EmbedModel:
    """Actor-pool callable: the encoder (and the VLM, when `vlm` names one) is loaded once per actor,
    then every batch is one fused pass; the VLM's `*_emb` columns join the encoder's."""

    def __init__(self, encoder: str, image_perturbations: Sequence[str], text_perturbations: Sequence[str], threads: int = 1, use_gpu: bool = False, max_tokens: int = 48, seed: int = 0, vlm: VlmSpec | None = None):
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.model = load_encoder(encoder, threads, self.device)
        self.vlm = VlmEmbedder(vlm, self.device) if vlm is not None else None
        self.image_perturbations = list(image_perturbations)
        self.text_perturbations = list(text_perturbations)
        self.max_tokens = max_tokens
        self.seed = seed
        log.info("features actor: encoder %s on %s, %d threads", encoder, self.device, torch.get_num_threads())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = embed_batch(self.model, batch, self.image_perturbations, self.text_perturbations, self.device, self.max_tokens, self.seed)
        if self.vlm is not None:
            out.update(self.vlm(batch))
        return out
