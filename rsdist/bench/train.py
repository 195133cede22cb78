"""Benchmark of the training step: cached image-tower features (what the train stage does) against
running the frozen image tower on decoded pixels every step (the baseline it avoids).

Both paths run the same LoRA text tower, heads and InfoNCE step in one process on the same
batches, so the ratio is the saving of reusing the features stage's `image_emb`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch

from rsdist.models.encoders import build_encoder
from rsdist.train.loss import info_nce
from rsdist.config import TrainConfig
from rsdist.models.tuned import count_parameters, make_tunable


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rsdist bench train", description=__doc__)
    p.add_argument("--encoder", default="tiny", choices=["tiny", "composite"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=5, help="timed steps per path (after one warm-up step)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    p.add_argument("--method", default="lora", choices=["lora", "harma", "heads"], help="train.method (its other settings at their defaults); the JSON counts its trainable parameters")
    return p.parse_args(argv)


def _steps(encoder, batch_size: int, steps: int, image_size: int, cached: bool) -> float:
    """Seconds per training step; `cached` feeds stored features, else runs the image tower."""
    texts = ["a dense residential area with many houses and roads"] * batch_size
    tokens = encoder.tokenize(texts, 48)
    pixels = torch.rand(batch_size, 3, image_size, image_size) * 255
    with torch.no_grad():
        stored = encoder.encode_image_features(pixels)
    opt = torch.optim.AdamW([p for p in encoder.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        if cached:
            feats = stored
        else:
            with torch.no_grad():
                feats = encoder.encode_image_features(pixels)
        loss = info_nce(encoder.project_image(feats), encoder.project_text(encoder.encode_text_features(**tokens)), encoder.logit_scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - start)
        print(f"bench train: {'cached' if cached else 'tower'} step {i}/{steps} {time.perf_counter() - start:.3f}s", file=sys.stderr)
    return sum(times) / len(times)


def bench(argv: list[str]) -> dict:
    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    encoder = build_encoder(args.encoder, embed_dim=256)
    full = count_parameters(encoder)[1]
    encoder = make_tunable(encoder, {**dataclasses.asdict(TrainConfig()), "method": args.method})
    trainable, total = count_parameters(encoder)
    cached = _steps(encoder, args.batch_size, args.steps, args.image_size, cached=True)
    tower = _steps(encoder, args.batch_size, args.steps, args.image_size, cached=False)
    out = {
        "encoder": args.encoder,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "torch_threads": torch.get_num_threads(),
        "method": args.method,
        "trainable_params": trainable,
        "total_params": total,
        "full_finetune_params": full,
        "trainable_percent_of_full": round(100 * trainable / full, 2),
        "cached_step_s": round(cached, 4),
        "tower_step_s": round(tower, 4),
        "cached_rows_per_s": round(args.batch_size / cached, 2),
        "tower_rows_per_s": round(args.batch_size / tower, 2),
        "speedup_cached_vs_tower": round(tower / cached, 2),
    }
    return out


if __name__ == "__main__":
    import json

    print(json.dumps(bench(sys.argv[1:])))
