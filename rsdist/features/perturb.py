"""Seeded perturbations of one image or one caption, for the shift score.

Each perturbation takes one sample and a random generator and returns a perturbed copy of the
same shape (images: uint8 [H, W, 3]; texts: a string). The generator is drawn from the sample id,
the run's seed and the perturbation's name (`sample_rng`), so a sample is perturbed the same way
whichever batch, block or actor it lands in, and on every re-run.

Image perturbations: noise (gaussian, sigma 8% of the range), rotate (90 degrees), flip
(horizontal), crop (random resized crop, 50-100% of the area, aspect 3/4-4/3, back to full size),
blur (gaussian, radius 1-2 px), jpeg (re-encode at quality 15-40).
Text perturbations: token_dropout (each word dropped with probability 0.2, at least one kept),
word_shuffle (words shuffled within windows of 3).
"""

from __future__ import annotations

import hashlib
import io
from typing import Callable

import numpy as np
from PIL import Image, ImageFilter

IMAGE_PERTURBATIONS = ("noise", "rotate", "crop", "flip", "blur", "jpeg")
TEXT_PERTURBATIONS = ("token_dropout", "word_shuffle")


def sample_rng(sample_id: str, seed: int, name: str) -> np.random.Generator:
    """A generator fixed by (sample id, seed, perturbation name), independent of batching."""
    digest = hashlib.sha1(f"{seed}\x00{name}\x00{sample_id}".encode("utf-8")).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


# -- images (uint8 [H, W, 3] -> uint8 [H, W, 3]) -------------------------------------------------
def gaussian_noise(img: np.ndarray, rng: np.random.Generator, sigma: float = 0.08 * 255) -> np.ndarray:
    noisy = img.astype(np.float32) + rng.standard_normal(img.shape, dtype=np.float32) * sigma
    return np.clip(noisy, 0, 255).astype(np.uint8)


def rotate90(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.ascontiguousarray(np.rot90(img, k=1, axes=(0, 1)))


def hflip(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.ascontiguousarray(img[:, ::-1])


def random_resized_crop(img: np.ndarray, rng: np.random.Generator, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)) -> np.ndarray:
    """torchvision's RandomResizedCrop rule: area share and log-uniform aspect, then resize back."""
    h, w = img.shape[:2]
    area = h * w
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = float(np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]))))
        cw, ch = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            break
    else:  # fall back to a centred square of the smaller side
        ch = cw = min(h, w)
        top, left = (h - ch) // 2, (w - cw) // 2
    crop = Image.fromarray(img[top : top + ch, left : left + cw])
    return np.asarray(crop.resize((w, h), Image.BILINEAR))


def gaussian_blur(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    radius = float(rng.uniform(1.0, 2.0))
    return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius)))


def jpeg_reencode(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=int(rng.integers(15, 41)))
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


IMAGE_FUNCTIONS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "noise": gaussian_noise,
    "rotate": rotate90,
    "crop": random_resized_crop,
    "flip": hflip,
    "blur": gaussian_blur,
    "jpeg": jpeg_reencode,
}


# -- texts ---------------------------------------------------------------------------------------
def token_dropout(text: str, rng: np.random.Generator, p: float = 0.2) -> str:
    words = text.split()
    if len(words) <= 1:
        return text
    keep = rng.random(len(words)) >= p
    if not keep.any():
        keep[int(rng.integers(0, len(words)))] = True
    return " ".join(w for w, k in zip(words, keep) if k)


def word_shuffle(text: str, rng: np.random.Generator, window: int = 3) -> str:
    words = text.split()
    out: list[str] = []
    for start in range(0, len(words), window):
        chunk = words[start : start + window]
        out.extend(chunk[i] for i in rng.permutation(len(chunk)))
    return " ".join(out)


TEXT_FUNCTIONS: dict[str, Callable[[str, np.random.Generator], str]] = {
    "token_dropout": token_dropout,
    "word_shuffle": word_shuffle,
}


def perturb_image(img: np.ndarray, name: str, sample_id: str, seed: int) -> np.ndarray:
    return IMAGE_FUNCTIONS[name](img, sample_rng(sample_id, seed, name))


def perturb_texts(texts: list[str], name: str, sample_id: str, seed: int) -> list[str]:
    """Perturb every caption of one sample with one generator (caption order matters, batching does not)."""
    rng = sample_rng(sample_id, seed, name)
    fn = TEXT_FUNCTIONS[name]
    return [fn(t, rng) for t in texts]


def perturb_batch(pixels: np.ndarray, sample_ids, names, seed: int) -> np.ndarray:
    """uint8 [B, S, S, 3] -> uint8 [B, K, S, S, 3]: each sample's K image perturbations, in `names` order."""
    out = np.empty((len(pixels), len(names), *pixels.shape[1:]), dtype=np.uint8)
    for i, sid in enumerate(sample_ids):
        for j, name in enumerate(names):
            out[i, j] = perturb_image(pixels[i], name, str(sid), seed)
    return out
