"""Benchmark of VLM instruction LoRA training: a random Qwen2-VL built from a config at a size
given by flags (presets `tiny`, `2b`, `7b` = Qwen2-VL-2B / 7B shapes; any dimension overridable),
LoRA on the language model's attention + MLP projections (the train.vlm defaults), projector
trainable, batches of one image and one instruction turn encoded by `encode_batch`.

bf16 weights on CUDA (fp32 on CPU). Reports samples/s, tokens/s (all attended tokens, and the
supervised ones), seconds per step, peak memory (CUDA: max allocated; CPU: max RSS of the process)
and parameter counts. `rsdist bench vlm-train --preset 2b --batch-size 4 --image-size 448` on a GPU;
`rsdist bench vlm-train` (tiny preset) runs on CPU in seconds.
"""

from __future__ import annotations

import argparse
import io
import resource
import sys
import time

import numpy as np
import torch

PRESETS = {  # language model / vision tower shapes
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=0, vision_dim=32, vision_depth=1, vision_heads=2),
    "2b": dict(hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960, vocab=151936, vision_dim=1280, vision_depth=32, vision_heads=16),
    "7b": dict(hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944, vocab=152064, vision_dim=1280, vision_depth=32, vision_heads=16),
}
TIED_EMBEDDINGS = {"2b"}  # Qwen2-VL-2B shares its input and output embeddings; 7B does not


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rsdist bench vlm-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model shape; the flags below override single dimensions")
    for name in PRESETS["tiny"]:
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help=f"override the preset's {name} (vocab 0 = the tokenizer's)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--image-size", type=int, default=112, help="square images of this side (multiple of 28)")
    p.add_argument("--answer-words", type=int, default=32, help="words in each supervised answer")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps (after one warm-up step)")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--no-bf16", action="store_true", help="fp32 weights on CUDA too")
    return p.parse_args(argv)


def build_model(shape: dict, tokenizer, dtype: torch.dtype, device: torch.device, tie_embeddings: bool = False):
    """A random Qwen2-VL of `shape` (weights created directly on `device` in `dtype`)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    head_dim = shape["hidden"] // shape["heads"]
    section = [head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16]  # Qwen2-VL's t/h/w split of half the head dim
    text = dict(vocab_size=shape["vocab"] or len(tokenizer), hidden_size=shape["hidden"], intermediate_size=shape["intermediate"], num_hidden_layers=shape["layers"],
                num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"], max_position_embeddings=32768,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": section},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(depth=shape["vision_depth"], embed_dim=shape["vision_dim"], hidden_size=shape["hidden"], num_heads=shape["vision_heads"], mlp_ratio=4,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                           vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=tie_embeddings)
    with torch.device(device):
        return Qwen2VLForConditionalGeneration._from_config(config, dtype=dtype)


def make_rows(batch_size: int, image_size: int, answer_words: int) -> list[dict]:
    from PIL import Image

    words = "a dense residential area with many houses trees roads and a river near the airport".split()
    rows = []
    for i in range(batch_size):
        buf = io.BytesIO()
        Image.fromarray((np.random.default_rng(i).random((image_size, image_size, 3)) * 255).astype("uint8")).save(buf, "PNG")
        answer = " ".join(words[(i + j) % len(words)] for j in range(answer_words))
        rows.append({"sample_id": str(i), "image": buf.getvalue(), "conversations": [{"from": "human", "value": "<image>\nDescribe the image in detail."},
                                                                                         {"from": "gpt", "value": answer}]})
    return rows


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024**3
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB -> GiB


def bench(argv: list[str]) -> dict:
    from rsdist.train.vlm import VlmTrainConfig, apply_lora, encode_batch, parameter_counts
    from rsdist.models.vlm import QWEN2_VL_TEMPLATE, _image_only_processor_class, tiny_tokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    args = _parse(argv)
    shape = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in PRESETS[args.preset].items()}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = device.type == "cuda" and not args.no_bf16
    dtype = torch.bfloat16 if bf16 else torch.float32
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    started = time.perf_counter()
    model = apply_lora(build_model(shape, tokenizer, dtype, device, args.preset in TIED_EMBEDDINGS), VlmTrainConfig(lora_r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0))
    build_s = time.perf_counter() - started
    if args.gradient_checkpointing:
        model.enable_input_require_grads()
        model.gradient_checkpointing_enable()
    pixels = args.image_size * args.image_size
    processor = _image_only_processor_class()(image_processor=Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": pixels}),
                                              tokenizer=tokenizer, video_processor=None, chat_template=QWEN2_VL_TEMPLATE)
    batch = encode_batch(processor, make_rows(args.batch_size, args.image_size, args.answer_words), max_pixels=pixels)
    batch = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in batch.items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(args.steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - start)
        print(f"bench vlm-train: step {i}/{args.steps} loss {float(loss.detach()):.4f} {time.perf_counter() - start:.3f}s", file=sys.stderr)
    step_s = sum(times) / len(times)
    tokens = int(batch["attention_mask"].sum())
    supervised = int((batch["labels"] != -100).sum())
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).replace("torch.", ""),
        "preset": args.preset,
        "shape": shape,
        **parameter_counts(model),
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "tokens_per_batch": tokens,
        "image_tokens_per_sample": int((batch["input_ids"][0] == processor.image_token_id).sum()),
        "supervised_tokens_per_batch": supervised,
        "gradient_checkpointing": args.gradient_checkpointing,
        "build_s": round(build_s, 2),
        "step_s": round(step_s, 4),
        "samples_per_s": round(args.batch_size / step_s, 3),
        "tokens_per_s": round(tokens / step_s, 1),
        "supervised_tokens_per_s": round(supervised / step_s, 1),
        "peak_memory_gb": round(peak_memory_gb(device), 3),
        "torch_threads": torch.get_num_threads(),
    }


if __name__ == "__main__":
    import json

    print(json.dumps(bench(sys.argv[1:])))
