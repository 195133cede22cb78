"""Benchmark of the features pass: the Ray pass against a plain loop, and 1 vs 2 actors.

On the same shards and model, in one run:
- plain: one process reads the shards and calls `preprocess_batch` + `embed_batch` (the code the
  actors run) with torch using all of the cluster's CPUs as threads;
- ray_1x1 / ray_2x1: the features stage with 1 and 2 single-thread model actors.
Ray figures are end to end (actor start and model load included, about 9 s for the composite
encoder), the plain loop's exclude its one model load, so use enough rows for the start to amortise,
and a multiple of 2 x batch size so the last batches do not leave one actor idle. The load average
before and after is in the figures: on a shared machine only a quiet run's ratios mean much.

`--gpu-clip` (CUDA only; skipped with a reason on CPU): the model adapter's batched forward
(`rsdist.features.embed.image_features`: uint8 host images -> device, channels_last, normalise,
bf16 autocast, `get_image_features(...).pooler_output`) of a ViT-B/16-sized CLIP built from its
config (random weights), against the bare model forward on already normalised device tensors under
the same autocast: images/s of each and their ratio.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa


def _log(msg: str) -> None:
    print(f"[bench features] {msg}", file=sys.stderr, flush=True)


def _synthetic_jpeg(rng: np.random.Generator, size: int) -> bytes:
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size] / size
    img = np.stack([x, y, 1 - x], axis=-1) * rng.uniform(60, 220, size=3) + rng.normal(0, 12, (size, size, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _image_files(root: str, limit: int) -> list[str]:
    files = []
    for dirpath, _, names in sorted(os.walk(root)):
        files += [os.path.join(dirpath, n) for n in sorted(names) if n.lower().endswith((".jpg", ".jpeg", ".png", ".tif"))]
    return files[:limit]


def write_bench_shards(run, rows: int, shard_rows: int, images: str | None, seed: int = 0) -> None:
    """Canonical shards of `rows` samples: real image files under `images`, else 150 px synthetic JPEGs."""
    from rsdist.core.schema import CANONICAL_SCHEMA, empty_row, make_sample_id

    rng = np.random.default_rng(seed)
    files = _image_files(images, rows) if images else []
    if images and not files:
        raise FileNotFoundError(f"--images: no image files under {images}")
    batch = []
    for i in range(rows):
        row = empty_row()
        data = open(files[i % len(files)], "rb").read() if files else _synthetic_jpeg(rng, 150)
        caps = [f"an aerial view of scene {i} with {w} buildings and green trees near a road" for w in ("many", "some", "few", "two", "white")]
        row.update(sample_id=make_sample_id("bench", str(i)), image=data, image_format="jpeg", text=caps[0], captions=caps, label="x", source="bench")
        batch.append(row)
        if len(batch) == shard_rows or i == rows - 1:
            n = len(run.parquet_files("shards"))
            run.write_table(pa.Table.from_pylist(batch, schema=CANONICAL_SCHEMA), "shards", f"part-{n:05d}.parquet")
            batch = []


def plain_loop(run, cfg, threads: int) -> float:
    """Rows/s of one process doing what the actors do, with `threads` torch threads (model load excluded)."""
    from rsdist.features.embed import embed_batch, load_encoder
    from rsdist.features.preprocess import preprocess_batch, split_perturbations
    from rsdist.core.schema import MODEL_INPUT_COLUMNS

    image_names, text_names = split_perturbations(cfg.perturbations)
    model = load_encoder(cfg.encoder, threads)
    rows = 0
    start = time.perf_counter()
    for rb in run.iter_batches("shards", columns=MODEL_INPUT_COLUMNS, batch_size=cfg.batch_size):
        batch = {c: rb.column(c).to_numpy(zero_copy_only=False) for c in MODEL_INPUT_COLUMNS}
        batch["path"] = np.array(["shard"] * rb.num_rows, dtype=object)
        pre = preprocess_batch(batch, cfg.image_size, cfg.perturbations, cfg.seed)
        embed_batch(model, pre, image_names, text_names, max_tokens=cfg.max_text_tokens, seed=cfg.seed)
        rows += rb.num_rows
    return rows / (time.perf_counter() - start)


def ray_pass(run, cfg) -> tuple[float, float, float]:
    """The features stage with `cfg`'s pool: (rows/s end to end, rows/s after the first result block,
    seconds to the first result), so actor start and model load can be told apart from throughput."""
    from rsdist.features import stage

    run.remove("features")
    start = time.perf_counter()
    result = stage.run(run, cfg)
    end_to_end = result.rows_out / (time.perf_counter() - start)
    return end_to_end, result.extra["steady_rows_per_second"] or 0.0, result.extra["first_result_seconds"] or 0.0


# ViT-B/16 CLIP (openai/clip-vit-base-patch16's sizes), random weights: only the compute matters here
VIT_B16 = {
    "vision_config": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224, patch_size=16),
    "text_config": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
    "projection_dim": 512,
}


def _timed(fn, iters: int, sync) -> float:
    """Seconds per call of `fn` after one warm-up call, synchronising the device around the timing."""
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - start) / iters


def clip_adapter_vs_bare(device: str = "cuda", batch: int = 256, iters: int = 20, config: dict | None = None) -> dict:
    """images/s of the adapter's batched forward against the bare CLIP forward (same autocast, same
    model): the adapter adds the host -> device copy of uint8 images, the layout change and the
    normalisation. `config` overrides the ViT-B/16 sizes (tests use a tiny one on CPU)."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    from rsdist.features.embed import _autocast, image_features
    from rsdist.models.hf import CLIP_MEAN, CLIP_STD, HFDualEncoder

    cfg = config or VIT_B16
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(**cfg)).eval()
    size = clip.config.vision_config.image_size
    adapter = HFDualEncoder(clip, None, size, CLIP_MEAN, CLIP_STD).to(device).eval()
    adapter.image_tower.to(memory_format=torch.channels_last)
    images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    tower = adapter.image_tower
    x = ((torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() - tower.mean) / tower.std).contiguous()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def bare():
        with torch.inference_mode(), _autocast(device):
            return clip.get_image_features(pixel_values=x).pooler_output

    def adapted():
        return image_features(adapter, images, device)

    with torch.inference_mode():
        torch.testing.assert_close(adapted().float(), bare().float(), rtol=5e-2, atol=5e-2)  # the same computation
    bare_s, adapter_s = _timed(bare, iters, sync), _timed(adapted, iters, sync)
    return {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else device,
        "model": "CLIP ViT-B/16 (random)" if config is None else "CLIP (config given)",
        "dtype": "bf16 autocast" if device.startswith("cuda") else "float32",
        "batch": batch,
        "bare_images_per_s": round(batch / bare_s, 1),
        "adapter_images_per_s": round(batch / adapter_s, 1),
        "adapter_vs_bare": round(bare_s / adapter_s, 3),
    }


def gpu_clip_section(batch: int, iters: int) -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    return clip_adapter_vs_bare("cuda", batch, iters)


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def bench(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="rsdist bench features", description=__doc__)
    p.add_argument("--encoder", default="composite", help="composite | tiny")
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--shard-rows", type=int, default=128)
    p.add_argument("--image-size", type=int, default=160)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--perturbations", default="noise,rotate,crop")
    p.add_argument("--images", default=None, help="folder of real images (default: synthetic 150 px JPEGs)")
    p.add_argument("--out", default=None, help="run directory for the shards (default: a temporary folder)")
    p.add_argument("--gpu-clip", action="store_true", help="also time the adapter's bf16 forward of a ViT-B/16 CLIP against the bare model (CUDA only)")
    p.add_argument("--gpu-clip-only", action="store_true", help="only the --gpu-clip section (no Ray passes)")
    p.add_argument("--gpu-batch", type=int, default=256, help="images per forward in the --gpu-clip section")
    p.add_argument("--gpu-iters", type=int, default=20, help="timed forwards per variant in the --gpu-clip section")
    args = p.parse_args(argv)
    if args.gpu_clip_only:
        gpu = gpu_clip_section(args.gpu_batch, args.gpu_iters)
        _log(f"gpu clip: {gpu}")
        return {"gpu_clip": gpu}
    if args.rows % (2 * args.batch_size):
        _log(f"--rows {args.rows} is not a multiple of 2 x --batch-size: the 2-actor pass ends with one actor idle")

    from rsdist.config import FeaturesConfig
    from rsdist.core.rundir import RunDir
    from rsdist.core.raycluster import cluster_cpus, init_ray

    init_ray()
    load_before = _load()
    cpus = int(cluster_cpus())
    run = RunDir(args.out or tempfile.mkdtemp(prefix="rsdist-bench-features-"))
    run.remove("shards")
    write_bench_shards(run, args.rows, args.shard_rows, args.images)
    base = dict(encoder=args.encoder, image_size=args.image_size, batch_size=args.batch_size, perturbations=args.perturbations.split(","))
    _log(f"{args.rows} rows, encoder {args.encoder}, {args.image_size} px, K={len(base['perturbations'])}, cluster CPUs {cpus}")

    plain = plain_loop(run, FeaturesConfig(**base), threads=cpus)
    _log(f"plain loop, {cpus} threads: {plain:.2f} rows/s")
    one, one_steady, one_first = ray_pass(run, FeaturesConfig(**base, num_actors=1, threads_per_actor=1))
    _log(f"ray, 1 actor x 1 thread: {one:.2f} rows/s end to end, {one_steady:.2f} after the first result at {one_first:.1f} s")
    two, two_steady, two_first = ray_pass(run, FeaturesConfig(**base, num_actors=2, threads_per_actor=1))
    _log(f"ray, 2 actors x 1 thread: {two:.2f} rows/s end to end, {two_steady:.2f} after the first result at {two_first:.1f} s")
    forwards = 1 + len([n for n in base["perturbations"] if n in ("noise", "rotate", "crop", "flip", "blur", "jpeg")])
    figures = {
        "encoder": args.encoder,
        "rows": args.rows,
        "image_size": args.image_size,
        "image_forwards_per_row": forwards,
        "cluster_cpus": cpus,
        "plain_rows_per_s": round(plain, 2),
        "ray_1x1_rows_per_s": round(one, 2),
        "ray_2x1_rows_per_s": round(two, 2),
        "ray_1x1_steady_rows_per_s": round(one_steady, 2),
        "ray_2x1_steady_rows_per_s": round(two_steady, 2),
        "ray_1x1_first_result_s": round(one_first, 2),
        "ray_2x1_first_result_s": round(two_first, 2),
        "ray_vs_plain": round(two / plain, 3),
        "scaling_2_vs_1_actors": round(two / one, 3),
        "ray_vs_plain_steady": round(two_steady / plain, 3),
        "scaling_2_vs_1_actors_steady": round(two_steady / one_steady, 3) if one_steady else None,
        "plain_images_per_s": round(plain * forwards, 2),
        "load_average_before": load_before,
        "load_average_after": _load(),
    }
    if args.gpu_clip:
        figures["gpu_clip"] = gpu_clip_section(args.gpu_batch, args.gpu_iters)
        _log(f"gpu clip: {figures['gpu_clip']}")
    return figures
