"""The embedded demo dataset: SYNTHETIC aerial-looking scenes with captions, generated on the fly.

Six scene classes drawn procedurally (forest, farmland, residential, lake, desert, airport), five
captions per image from class templates, written in the RSICD retrieval layout
(`images/<Class>/<name>.jpg`, `captions/train_filename.txt`, `captions/train_caps.txt`) so the
demo goes through the same ingest path as real data. Built-in redundancy, so that selection has
something to find: some images are exact copies of others under a new name, some are near
duplicates (the same scene re-drawn with slight noise and a shift), and some images repeat one
caption five times, as real RSICD does. Every file name starts with `synthetic_`.

`generate_instructions` writes the VLM demo's instruction set from the same scenes: scene folders,
RSVQA-style questions (presence, rural/urban) and the captioned set, which ingest reads as one pool.
"""

from __future__ import annotations

import io
import posixpath

import fsspec
import numpy as np
from PIL import Image

CLASSES = ("Forest", "Farmland", "Residential", "Lake", "Desert", "Airport")

_CAPTIONS = {
    "Forest": [
        "a dense forest with many {adj} green trees",
        "many {adj} trees are in a piece of forest",
        "the forest is covered with {adj} green vegetation",
        "lots of trees grow closely together in a forest",
        "a large area of {adj} woodland seen from above",
    ],
    "Farmland": [
        "several {adj} fields are arranged in parallel strips",
        "farmland with {adj} crops planted in rows",
        "many pieces of farmland of different colors",
        "the {adj} fields are divided into long stripes",
        "rectangular farmland plots lie side by side",
    ],
    "Residential": [
        "many {adj} houses are arranged in neat rows",
        "a residential area with {adj} buildings and roads",
        "lots of houses with {adj} roofs along the streets",
        "buildings are densely packed in a residential area",
        "a grid of roads runs between {adj} houses",
    ],
    "Lake": [
        "a {adj} lake is surrounded by green land",
        "the blue water of a {adj} lake with a curved shore",
        "a lake lies next to some grass",
        "a {adj} pond with dark blue water",
        "green vegetation surrounds a body of water",
    ],
    "Desert": [
        "a {adj} desert with rippled sand dunes",
        "yellow sand covers the {adj} desert",
        "wavy dunes stretch across the desert",
        "a barren {adj} area of sand with no plants",
        "the desert shows long curved lines of sand",
    ],
    "Airport": [
        "an airport with a long {adj} runway",
        "several planes are parked near a {adj} runway",
        "a gray runway crosses the airport",
        "planes stand beside the runway of an airport",
        "an airport with white markings on a {adj} runway",
    ],
}
_ADJECTIVES = ("large", "small", "bright", "dark", "wide", "long", "quiet", "busy")


def _noise(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    return rng.normal(0.0, scale, (size, size, 1))


def _draw(cls: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """One scene of class `cls` as float RGB in [0, 255]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    img = np.zeros((size, size, 3), np.float32)
    if cls == "Forest":
        img[:] = (30, 70 + rng.uniform(-10, 10), 30)
        for _ in range(int(size * size / 60)):
            cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(2, 6)
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            img[mask] = (rng.uniform(20, 60), rng.uniform(80, 140), rng.uniform(20, 50))
    elif cls == "Farmland":
        angle = rng.uniform(0, np.pi)
        width = rng.uniform(8, 18)
        band = ((np.cos(angle) * xx + np.sin(angle) * yy) // width).astype(int)
        palette = np.array([(110, 150, 60), (180, 160, 90), (90, 120, 50), (150, 120, 70)], np.float32)
        img[:] = palette[band % len(palette)]
    elif cls == "Residential":
        img[:] = (150, 145, 135)
        step = int(rng.integers(12, 18))
        for y in range(2, size - 8, step):
            for x in range(2, size - 8, step):
                h, w = rng.integers(5, step - 3), rng.integers(5, step - 3)
                roof = (rng.uniform(120, 200), rng.uniform(60, 110), rng.uniform(50, 90)) if rng.random() < 0.6 else (90, 90, 100)
                img[y : y + h, x : x + w] = roof
        img[:, :: step * 3] = (70, 70, 70)
    elif cls == "Lake":
        img[:] = (70, 120, 60)
        cy, cx = rng.uniform(0.3, 0.7) * size, rng.uniform(0.3, 0.7) * size
        ry, rx = rng.uniform(0.2, 0.4) * size, rng.uniform(0.2, 0.4) * size
        wobble = 1 + 0.15 * np.sin(np.arctan2(yy - cy, xx - cx) * rng.integers(2, 6))
        mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < wobble
        img[mask] = (30, 60 + rng.uniform(0, 30), 120 + rng.uniform(0, 40))
    elif cls == "Desert":
        freq, angle = rng.uniform(0.08, 0.2), rng.uniform(0, np.pi)
        wave = np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy) + 3 * np.sin(0.03 * yy))
        base = np.array((200, 170, 110), np.float32)
        img[:] = base + 25 * wave[..., None]
    elif cls == "Airport":
        img[:] = (120, 140, 90)
        y0 = int(rng.uniform(0.3, 0.6) * size)
        img[y0 : y0 + size // 8] = (80, 80, 85)
        img[y0 + size // 16, ::6] = (240, 240, 240)
        for _ in range(int(rng.integers(2, 6))):
            py, px = int(rng.uniform(0.05, 0.25) * size), int(rng.uniform(0.1, 0.9) * size)
            img[py : py + 2, max(px - 5, 0) : px + 5] = (230, 230, 230)
            img[max(py - 4, 0) : py + 6, px : px + 2] = (230, 230, 230)
    return img


def render(cls: str, seed: int, size: int, jitter: float = 0.0) -> np.ndarray:
    """A uint8 scene; `jitter` > 0 re-draws the same scene with a shift and noise (a near duplicate)."""
    img = _draw(cls, np.random.default_rng(seed), size)
    rng = np.random.default_rng(seed + 1)
    img = img + _noise(rng, size, 6.0)
    if jitter:
        shift = np.random.default_rng(seed + 2).integers(1, 4, size=2)
        img = np.roll(img, tuple(int(s) for s in shift), axis=(0, 1))
        img = img + np.random.default_rng(seed + 3).normal(0, jitter, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _captions(cls: str, rng: np.random.Generator) -> list[str]:
    if rng.random() < 0.3:  # RSICD-style redundancy: one caption repeated five times
        one = rng.choice(_CAPTIONS[cls]).format(adj=rng.choice(_ADJECTIVES))
        return [one] * 5
    return [t.format(adj=rng.choice(_ADJECTIVES)) for t in _CAPTIONS[cls]]


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def generate(out: str, per_class: int = 40, size: int = 128, seed: int = 0,
             duplicate_fraction: float = 0.2, near_duplicate_fraction: float = 0.25) -> dict:
    """Write the synthetic dataset under fsspec URI `out`; return counts of what was written.

    Per class: `per_class` unique scenes, then exact copies of a `duplicate_fraction` of them (same
    bytes and captions, new name) and near duplicates of a `near_duplicate_fraction` (re-drawn with
    jitter, paraphrased captions).
    """
    fs, root = fsspec.core.url_to_fs(out)
    rng = np.random.default_rng(seed)
    names, caps = [], []
    counts = {"unique": 0, "exact_duplicates": 0, "near_duplicates": 0}
    for ci, cls in enumerate(CLASSES):
        folder = posixpath.join(root, "images", cls)
        fs.makedirs(folder, exist_ok=True)
        scenes = []
        for i in range(per_class):
            scene_seed = seed * 1_000_003 + ci * 10_007 + i * 31
            data, captions = _jpeg(render(cls, scene_seed, size)), _captions(cls, rng)
            scenes.append((scene_seed, data, captions))
            records = [(f"synthetic_{cls.lower()}_{i}.jpg", data, captions)]
            counts["unique"] += 1
            if rng.random() < duplicate_fraction:
                records.append((f"synthetic_{cls.lower()}_{i}_copy.jpg", data, captions))
                counts["exact_duplicates"] += 1
            if rng.random() < near_duplicate_fraction:
                near = _jpeg(render(cls, scene_seed, size, jitter=4.0))
                records.append((f"synthetic_{cls.lower()}_{i}_near.jpg", near, _captions(cls, rng)))
                counts["near_duplicates"] += 1
            for name, blob, cap in records:
                with fs.open(posixpath.join(folder, name), "wb") as f:
                    f.write(blob)
                names.append(name)
                caps.extend(cap)
    fs.makedirs(posixpath.join(root, "captions"), exist_ok=True)
    with fs.open(posixpath.join(root, "captions", "train_filename.txt"), "w") as f:
        f.write("\n".join(names) + "\n")
    with fs.open(posixpath.join(root, "captions", "train_caps.txt"), "w") as f:
        f.write("\n".join(caps) + "\n")
    with fs.open(posixpath.join(root, "README.txt"), "w") as f:
        f.write("SYNTHETIC data generated by rsdist.synthetic for the demo; not real imagery.\n")
    return {"images": len(names), "classes": len(CLASSES), **counts}


# -- the VLM demo's instruction set ----------------------------------------------------------------
# VQA-style questions on the synthetic scenes, by question type: (question, classes answered 'yes').
_PRESENCE = (
    ("Is there water in the image?", {"Lake"}),
    ("Is there a runway in the image?", {"Airport"}),
    ("Are there buildings in the image?", {"Residential"}),
    ("Are there trees in the image?", {"Forest"}),
    ("Is there sand in the image?", {"Desert"}),
    ("Are there crop fields in the image?", {"Farmland"}),
)
_RURAL_URBAN = "Is this a rural or an urban area?"
_URBAN = {"Residential", "Airport"}
INSTRUCTION_PARTS = {"scenes": "scene-folders", "vqa": "rsvqa", "captions": "captions-txt"}


def _tiff(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="TIFF")
    return buf.getvalue()


def _write_json(fs, path: str, value) -> None:
    import json

    with fs.open(path, "w") as f:
        json.dump(value, f)


def generate_instructions(out: str, per_class: int = 12, size: int = 64, seed: int = 0) -> dict:
    """Write the SYNTHETIC instruction set of the VLM demo under `out`, in three real layouts that
    ingest reads into one instruction pool (`INSTRUCTION_PARTS`):

    - `scenes/<Class>/synthetic_<class>_<i>.jpg`: scene folders (classification with GeoChat's prompt),
    - `vqa/`: RSVQA layout (`synthetic_questions.json`, `_answers.json`, `_images.json`,
      `images/<id>.tif`): per image one presence question (yes/no) and one rural/urban question,
    - `captions/`: the captioned demo set (`generate`), as "describe the image" turns.
    `per_class` scenes of each class in each part (other drawings in each). Returns counts.
    """
    fs, root = fsspec.core.url_to_fs(out)
    rng = np.random.default_rng(seed + 7)
    scenes = posixpath.join(root, "scenes")
    vqa_images = posixpath.join(root, "vqa", "images")
    fs.makedirs(vqa_images, exist_ok=True)
    questions, answers, images = [], [], []
    for ci, cls in enumerate(CLASSES):
        fs.makedirs(posixpath.join(scenes, cls), exist_ok=True)
        for i in range(per_class):
            with fs.open(posixpath.join(scenes, cls, f"synthetic_{cls.lower()}_{i}.jpg"), "wb") as f:
                f.write(_jpeg(render(cls, 50_000_017 * (seed + 1) + ci * 10_007 + i * 31, size)))
            img_id = len(images)
            with fs.open(posixpath.join(vqa_images, f"{img_id}.tif"), "wb") as f:
                f.write(_tiff(render(cls, 90_000_049 * (seed + 1) + ci * 10_007 + i * 31, size)))
            images.append({"id": img_id, "active": True})
            question, yes = _PRESENCE[int(rng.integers(len(_PRESENCE)))]
            for text, answer, qtype in ((question, "yes" if cls in yes else "no", "presence"),
                                        (_RURAL_URBAN, "urban" if cls in _URBAN else "rural", "rural_urban")):
                answers.append({"id": len(answers), "answer": answer, "active": True})
                questions.append({"id": len(questions), "img_id": img_id, "question": text, "type": qtype, "answers_ids": [answers[-1]["id"]], "active": True})
    _write_json(fs, posixpath.join(root, "vqa", "synthetic_questions.json"), {"questions": questions})
    _write_json(fs, posixpath.join(root, "vqa", "synthetic_answers.json"), {"answers": answers})
    _write_json(fs, posixpath.join(root, "vqa", "synthetic_images.json"), {"images": images})
    captions = generate(fs.unstrip_protocol(posixpath.join(root, "captions")), per_class=per_class, size=size, seed=seed + 1)
    with fs.open(posixpath.join(root, "README.txt"), "w") as f:
        f.write("SYNTHETIC instruction data generated by rsdist.synthetic for the VLM demo; not real imagery.\n")
    return {"scenes": per_class * len(CLASSES), "vqa_questions": len(questions), "caption_images": captions["images"]}
