"""The CPU stage of the features pass: decode, resize and perturb texts, so model actors only run models.

Input batch (numpy format): the canonical columns `sample_id, image, text, captions, label, split`
plus `path` (the shard file the row came from, added by the reader).
Output batch: `sample_id, split, label, shard` (shard file name), `pixels` (uint8 [B, S, S, 3]),
`perturbed` (uint8 [B, K, S, S, 3], the K image perturbations in order; only when
`perturb_images` is set, else the model actor perturbs: see embed.py),
`texts` (JSON list of the sample's captions, or [text] when it has none) and `texts_<name>` for
each text perturbation (JSON list of the perturbed captions).
Declared resources: a quarter CPU per task (see stage.py), so reads and decodes keep running next to
the model actors on a 2-CPU machine.

Where image perturbations run: on CPU-only pools the actor applies them just before its forward, so
one uint8 image per row crosses the object store instead of 1 + K (and the perturbation work runs on
the cores the actor already holds). With GPU actors they run here, off the GPU's critical path.
"""

from __future__ import annotations

import json
import posixpath
from typing import Sequence

import numpy as np
from PIL import Image

from rsdist.core.images import decode_rgb
from rsdist.features.perturb import IMAGE_PERTURBATIONS, perturb_batch, perturb_texts


def decode_resized(data: bytes, size: int) -> np.ndarray:
    """Encoded image bytes -> RGB uint8 [size, size, 3] (bilinear; JPEG decoded at reduced scale when much larger).

    16-bit and float images (shards written before ingest converted them) go through the same
    conversion ingest applies (`rsdist.core.images.decode_rgb`), not Pillow's clipping `convert("RGB")`.
    """
    img = decode_rgb(data, draft_size=size)  # a big JPEG is decoded at >= size, cheaper
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def sample_texts(text, captions) -> list[str]:
    """The captions of a sample, or its single text when it has no caption list."""
    if captions is not None and len(captions) > 0:
        return [str(c) for c in captions]
    if text is None:
        return []
    return [str(text)]


def split_perturbations(names: Sequence[str]) -> tuple[list[str], list[str]]:
    """(image perturbations, text perturbations), each in the configured order."""
    image = [n for n in names if n in IMAGE_PERTURBATIONS]
    text = [n for n in names if n not in IMAGE_PERTURBATIONS]
    return image, text


def preprocess_batch(batch: dict[str, np.ndarray], image_size: int, perturbations: Sequence[str], seed: int, perturb_images: bool = False) -> dict[str, np.ndarray]:
    """Decode and resize every image, perturb the texts (and the images when `perturb_images`)."""
    image_names, text_names = split_perturbations(perturbations)
    ids = [str(s) for s in batch["sample_id"]]
    shards = [posixpath.basename(str(p)) for p in batch["path"]]
    n = len(ids)
    pixels = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    texts: list[str] = []
    texts_perturbed: dict[str, list[str]] = {name: [] for name in text_names}
    for i, sid in enumerate(ids):
        where = f"{shards[i]}: sample {sid}"
        data = batch["image"][i]
        if data is None or len(data) == 0:
            raise ValueError(f"{where}: image is empty")
        try:
            img = decode_resized(bytes(data), image_size)
        except Exception as e:  # PIL raises several types for bad bytes
            raise ValueError(f"{where}: image could not be decoded ({type(e).__name__}: {e})") from None
        pixels[i] = img
        caps = sample_texts(batch["text"][i], batch["captions"][i])
        if not caps:
            raise ValueError(f"{where}: no text and no captions")
        texts.append(json.dumps(caps))
        for name in text_names:
            texts_perturbed[name].append(json.dumps(perturb_texts(caps, name, sid, seed)))
    out = {
        "sample_id": np.array(ids, dtype=object),
        "split": np.array([None if s is None else str(s) for s in batch["split"]], dtype=object),
        "label": np.array([None if s is None else str(s) for s in batch["label"]], dtype=object),
        "shard": np.array(shards, dtype=object),
        "pixels": pixels,
        "texts": np.array(texts, dtype=object),
    }
    if "row" in batch:  # the row's position in its shard (the features stage names its output parts by it)
        out["row"] = np.asarray(batch["row"], dtype=np.int64)
    if perturb_images and image_names:
        out["perturbed"] = perturb_batch(pixels, ids, image_names, seed)
    for name in text_names:
        out[f"texts_{name}"] = np.array(texts_perturbed[name], dtype=object)
    return out
