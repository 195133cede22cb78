"""How far the perturbation shift of the pool follows image texture: Spearman rank correlations.

    python research/scripts/shift_texture.py runs/exp-grid/base [--limit N] [--side 224]

The pool is the rows of `<run>/features` with split == "train". For each pool image, texture is the
mean gradient magnitude of its grey image: decode `image` from `<run>/shards`, convert to grey
(PIL "L"), resize to `--side` x `--side` (bilinear, so image size does not matter), scale to float32
in [0, 1], take forward differences gx = I[y, x+1] - I[y, x] and gy = I[y+1, x] - I[y, x] over the
(side-1) x (side-1) pixels where both exist, and average sqrt(gx^2 + gy^2). A flat image scores 0;
fine texture and sharp edges score high.

Prints a markdown table with, for each shift column present (`shift`, `shift_noise`,
`shift_rotate`, `shift_crop`), its Spearman rank correlation with texture and n, then as the last
line one JSON object with the same figures. Shards are streamed in batches of `image` and
`sample_id` only; images are decoded one at a time.
"""

from __future__ import annotations

import argparse
import io
import json

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image
from scipy.stats import spearmanr

from rsdist.core.rundir import RunDir

SHIFT_COLUMNS = ("shift", "shift_noise", "shift_rotate", "shift_crop")
POOL_SPLIT = "train"


def texture(image_bytes: bytes, side: int) -> float:
    """Mean gradient magnitude of the grey image resized to side x side, intensities in [0, 1]."""
    with Image.open(io.BytesIO(image_bytes)) as img:
        grey = img.convert("L").resize((side, side), Image.BILINEAR)
    a = np.asarray(grey, dtype=np.float32) / 255.0
    gx = a[:-1, 1:] - a[:-1, :-1]
    gy = a[1:, :-1] - a[:-1, :-1]
    return float(np.sqrt(gx * gx + gy * gy).mean())


def shift_columns(run: RunDir) -> list[str]:
    """The shift columns the features stage wrote (a run may use a subset of the perturbations)."""
    files = run.parquet_files("features")
    if not files:
        raise SystemExit(f"no parquet files under {run.url('features')}")
    with run.fs.open(files[0], "rb") as fh:
        names = set(pq.ParquetFile(fh).schema_arrow.names)
    present = [c for c in SHIFT_COLUMNS if c in names]
    if not present:
        raise SystemExit(f"{files[0]}: no shift column (expected one of {', '.join(SHIFT_COLUMNS)})")
    return present


def pool_shifts(run: RunDir, columns: list[str], limit: int | None) -> tuple[list[str], dict[str, np.ndarray]]:
    """Sample ids and shift values of the pool rows, in features order, the first `limit` if given."""
    table = run.read_table("features", columns=["sample_id", "split", *columns])
    table = table.filter(pc.equal(table["split"], POOL_SPLIT))
    if limit is not None:
        table = table.slice(0, limit)
    ids = table["sample_id"].to_pylist()
    if len(set(ids)) != len(ids):
        raise SystemExit(f"{run.url('features')}: sample_id repeats among the {POOL_SPLIT} rows")
    shifts = {c: table[c].to_numpy(zero_copy_only=False).astype(np.float64) for c in columns}
    return ids, shifts


def pool_textures(run: RunDir, ids: list[str], side: int) -> np.ndarray:
    """Texture of each pool image, in the order of `ids`, streaming the shards in batches."""
    wanted = set(ids)
    found: dict[str, float] = {}
    for batch in run.iter_batches("shards", columns=["sample_id", "image"], batch_size=256):
        for sample_id, data in zip(batch.column("sample_id").to_pylist(), batch.column("image")):
            if sample_id not in wanted or sample_id in found:
                continue
            try:
                found[sample_id] = texture(data.as_py(), side)
            except Exception as exc:  # a bad image is a data error: name it
                raise SystemExit(f"{run.url('shards')}: sample_id {sample_id}: image does not decode ({exc})") from exc
        if len(found) == len(wanted):
            break
    missing = [s for s in ids if s not in found]
    if missing:
        raise SystemExit(f"{run.url('shards')}: {len(missing)} pool sample_id(s) have no image, e.g. {missing[0]}")
    return np.array([found[s] for s in ids])


def correlations(tex: np.ndarray, shifts: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Spearman rho (and its p-value) of each shift column against texture, over the finite rows."""
    out = {}
    for name, values in shifts.items():
        ok = np.isfinite(values) & np.isfinite(tex)
        rho, p = spearmanr(values[ok], tex[ok])
        out[name] = {"spearman": round(float(rho), 4), "p": float(p), "n": int(ok.sum())}
    return out


def markdown(figures: dict[str, dict[str, float]]) -> str:
    lines = ["| shift column | Spearman with texture | n |", "|---|---:|---:|"]
    lines += [f"| {name} | {f['spearman']:.2f} | {f['n']:,} |" for name, f in figures.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run directory (any fsspec URI) holding features/ and shards/")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N pool rows")
    parser.add_argument("--side", type=int, default=224, help="side in pixels images are resized to before the gradient")
    args = parser.parse_args()
    if args.limit is not None and args.limit < 2:
        parser.error(f"--limit must be at least 2, got {args.limit}")
    if args.side < 2:
        parser.error(f"--side must be at least 2, got {args.side}")
    run = RunDir(args.run)
    columns = shift_columns(run)
    ids, shifts = pool_shifts(run, columns, args.limit)
    if len(ids) < 2:
        raise SystemExit(f"{run.url('features')}: {len(ids)} {POOL_SPLIT} row(s), need at least 2")
    tex = pool_textures(run, ids, args.side)
    figures = correlations(tex, shifts)
    print(markdown(figures))
    print(f"texture: mean {tex.mean():.4f}, median {np.median(tex):.4f} (mean grey gradient magnitude, {args.side} px)")
    print(json.dumps({"n": len(ids), "side": args.side, "texture_mean": round(float(tex.mean()), 4), "correlations": figures}, sort_keys=True))


if __name__ == "__main__":
    main()
