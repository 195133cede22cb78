"""The select stage's work on one cluster group, run as a Ray task (see rsdist.select.blocks).

Each function reads one group's rows from the scratch folder, runs the strategies' per-cluster
kernels (the pure functions of rsdist.select.*) on each of its clusters, and returns a small
result: partial sums of a pool-wide statistic, per-cluster counts, or (decide) the per-cluster
selected counts after writing the group's manifest rows. No function returns a row.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rsdist.core.rundir import RunDir
from rsdist.select import blocks
from rsdist.select.alignment import cluster_contrastive, held_out_cosine_at, held_out_fit, held_out_unit_predictions, unit_rows
from rsdist.select.budget import top_per_group
from rsdist.select.captions import caption_select, caption_words, normalize_caption
from rsdist.select.coincide import blocked_greedy_mmd, density, mmd_among_top
from rsdist.select.columns import embedding_columns, embedding_of
from rsdist.select.scalselect import GramAccumulator, leverage_scores, scalselect_select
from rsdist.select.semdedup import cluster_redundancy
from rsdist.select.strategies import shift_select
from rsdist.select.threshold import BINS, histogram

OUT_SCHEMA = pa.schema([("pos", pa.int64()), ("sample_id", pa.string()), ("cluster", pa.int32()), ("score", pa.float32()), ("selected", pa.bool_()), ("reason", pa.string())])
RED_SCHEMA = pa.schema([("pos", pa.int64()), ("group", pa.int32()), ("max_cos", pa.float32()), ("duplicate_of", pa.string())])
KEY_SCHEMA = pa.schema([("pos", pa.int64()), ("key", pa.float64())])
CHUNK = 4096


@dataclass
class Group:
    """One group's rows in pool order, with each row's cluster index (0..k-1 over the pool)."""

    number: int
    table: pa.Table
    index: np.ndarray
    eligible: np.ndarray  # rows that pass the near-duplicate filter (all without one)
    red: pa.Table | None  # the filter's redundancy, aligned with the rows

    @property
    def pos(self) -> np.ndarray:
        return self.table.column("pos").to_numpy()

    @property
    def ids(self) -> np.ndarray:
        return np.asarray(self.table.column("sample_id").to_pylist(), dtype=object)

    def members(self, eligible_only: bool = True) -> list[tuple[int, np.ndarray]]:
        """(cluster index, row positions in pool order) of each of the group's clusters."""
        rows = np.flatnonzero(self.eligible) if eligible_only else np.arange(len(self.index))
        idx = self.index[rows]
        order = np.argsort(idx, kind="stable")
        rows, idx = rows[order], idx[order]
        cuts = np.flatnonzero(np.diff(idx)) + 1
        return [(int(self.index[r[0]]), r) for r in np.split(rows, cuts) if len(r)]

    def x(self, space: str, rows: np.ndarray | None = None) -> np.ndarray:
        t = self.table.select([c for c in embedding_columns(space) if c in self.table.column_names])
        if rows is not None:
            t = t.slice(int(rows[0]), len(rows)) if is_range(rows) else t.take(pa.array(rows))
        return embedding_of(t, space, "features")


def is_range(rows: np.ndarray) -> bool:
    """Whether `rows` are consecutive ascending positions (read as a zero-copy slice, not a take)."""
    return len(rows) > 0 and int(rows[-1]) - int(rows[0]) == len(rows) - 1 and bool((np.diff(rows) == 1).all())


def load_group(run: RunDir, number: int, labels: np.ndarray, columns: list[str] | None = None, threshold: float | None = None, with_red: bool = False) -> Group:
    """A group's rows with `columns` (all when None); with a filter `threshold` (or `with_red`)
    also each row's redundancy from red/."""
    cols = None if columns is None else list(dict.fromkeys(["sample_id", "pos", "cluster", *columns]))
    table = blocks.read_group(run, number, cols).combine_chunks()  # one chunk per column: cheap slices and takes
    index = np.searchsorted(labels, table.column("cluster").to_numpy()).astype(np.int64)
    eligible = np.ones(table.num_rows, dtype=bool)
    red = None
    if threshold is not None or with_red:
        red = blocks.read_parts(run, blocks.scratch("red", f"g-{number:05d}"), schema=RED_SCHEMA)
        red = red.take(pc.sort_indices(red, [("pos", "ascending")]))
        if threshold is not None:
            eligible = red.column("max_cos").to_numpy() <= threshold
    return Group(number, table, index, eligible, red)


# -- the near-duplicate filter and semdedup --------------------------------------------------------------


def redundancy_phase(run: RunDir, number: int, labels: np.ndarray, offsets: np.ndarray, space: str, rule: str, threshold: float | None) -> dict:
    """Each row's highest cosine to an earlier row of its cluster in keep order, written to
    red/; per cluster, the rows at or under `threshold`; per bucket, the same count."""
    g = load_group(run, number, labels, ["image_emb", "text_emb"] if space == "joint" else [space if space.endswith("_emb") else f"{space}_emb"])
    n = g.table.num_rows
    max_cos = np.full(n, -1.0, dtype=np.float32)
    dup = np.full(n, None, dtype=object)
    ids = g.ids
    for _, rows in g.members(eligible_only=False):
        mc, d = cluster_redundancy(g.x(space, rows), rule)
        max_cos[rows] = mc
        has = d >= 0
        dup[rows[has]] = ids[rows[d[has]]]
    red = pa.table({"pos": g.table.column("pos"), "group": pa.array(np.full(n, number, dtype=np.int32)), "max_cos": pa.array(max_cos), "duplicate_of": pa.array(dup.tolist(), type=pa.string())}, schema=RED_SCHEMA)
    blocks.write_by_bucket(run, "red", number, red, offsets)
    keep = max_cos <= threshold if threshold is not None else np.ones(n, dtype=bool)
    bucket = np.searchsorted(offsets, g.pos, side="right") - 1
    return {"eligible": np.bincount(g.index[keep], minlength=len(labels)), "per_bucket": np.bincount(bucket[keep], minlength=len(offsets)), "duplicates": int((~keep).sum())}


def survivor_draws(run: RunDir, bucket: int, groups: int, offset: int, threshold: float, seed: int) -> int:
    """The draws of one bucket's rows that pass the filter, numbered among the filter's survivors
    in pool order (default_rng(seed).random(survivors)), written per group to draw/."""
    red = blocks.read_bucket(run, "red", bucket, groups, RED_SCHEMA)
    keep = red.column("max_cos").to_numpy() <= threshold
    red = red.filter(pa.array(keep))
    rng = np.random.default_rng(seed)
    rng.bit_generator.advance(offset)
    draws = rng.random(red.num_rows)
    group = red.column("group").to_numpy()
    for gnum in np.unique(group):
        m = group == gnum
        run.write_table(pa.table({"pos": red.column("pos").filter(pa.array(m)), "draw": pa.array(draws[m])}), *blocks.group_file("draw", int(gnum), bucket))
    return red.num_rows


def group_draws(run: RunDir, g: Group, filtered: bool) -> np.ndarray:
    """Each row's seeded draw (NaN for rows the filter drops)."""
    if not filtered:
        return g.table.column("draw").to_numpy()
    t = blocks.read_parts(run, blocks.scratch("draw", f"g-{g.number:05d}"), schema=pa.schema([("pos", pa.int64()), ("draw", pa.float64())]))
    out = np.full(g.table.num_rows, np.nan)
    out[np.searchsorted(g.pos, t.column("pos").to_numpy())] = t.column("draw").to_numpy()
    return out


# -- pool-wide statistics ------------------------------------------------------------------------------


def gram_phase(run: RunDir, number: int, labels: np.ndarray, space: str | None, columns: list[str]) -> GramAccumulator:
    """The Gram accumulator of the group's rows: of `space`, or (space None) of [image | text] unit rows."""
    g = load_group(run, number, labels, columns)
    acc = None
    for s in range(0, g.table.num_rows, CHUNK):
        rows = np.arange(s, min(g.table.num_rows, s + CHUNK))
        x = g.x(space, rows) if space else np.hstack([g.x("image", rows), g.x("text", rows)])
        if acc is None:
            acc = GramAccumulator(x.shape[1])
        acc.add(x)
    return acc


def merge_grams(*accs: GramAccumulator) -> GramAccumulator:
    out = None
    for a in accs:
        if a is None:
            continue
        if out is None:
            out = GramAccumulator(a.dim)
        out.merge(a)
    return out


def alignment_errors(run: RunDir, number: int, labels: np.ndarray, ridges: list) -> list[np.ndarray]:
    """Per ridge map: the sum over the group's rows of the squared held-out error at each strength."""
    g = load_group(run, number, labels, ["image_emb", "text_emb"])
    sums = [np.zeros(len(r[2].strengths)) for r in ridges]
    for s in range(0, g.table.num_rows, CHUNK):
        rows = np.arange(s, min(g.table.num_rows, s + CHUNK))
        cols = {"image": g.x("image", rows), "text": g.x("text", rows)}
        for i, (a, b, ridge) in enumerate(ridges):
            sums[i] += held_out_fit(cols[a], cols[b], ridge)[0].sum(axis=0)
    return sums


def word_counts(run: RunDir, number: int, labels: np.ndarray) -> Counter:
    """How many of the group's images use each caption word."""
    g = load_group(run, number, labels, ["captions", "text"])
    return Counter(w for ws in caption_words(captions_of(run, g)) for w in ws)


def merge_counters(*counters: Counter) -> Counter:
    out: Counter = Counter()
    for c in counters:
        out.update(c)
    return out


def caption_split(run: RunDir, number: int, labels: np.ndarray, parts: int) -> int:
    """The group's (normalised distinct caption, pos) pairs, written to caps/h-<part>/ by caption hash."""
    g = load_group(run, number, labels, ["captions", "text"])
    caps, pos = [], []
    for p, cs in zip(g.pos, captions_of(run, g)):
        for c in sorted({normalize_caption(c) for c in cs if c and c.strip()}):
            caps.append(c)
            pos.append(p)
    h = blocks.caption_hash(caps, parts)
    table = pa.table({"caption": pa.array(caps, type=pa.string()), "pos": pa.array(np.asarray(pos, dtype=np.int64)), "group": pa.array(np.full(len(caps), number, dtype=np.int32))})
    for q in np.unique(h):
        run.write_table(table.filter(pa.array(h == q)), *blocks.scratch("caps", f"h-{int(q):05d}", f"g-{number:05d}.parquet"))
    return len(caps)


def caption_df(run: RunDir, part: int) -> int:
    """The pool count of each caption of one hash part, written back per group to capdf/."""
    if not run.exists(*blocks.scratch("caps", f"h-{part:05d}")):
        return 0
    t = blocks.read_parts(run, blocks.scratch("caps", f"h-{part:05d}"))
    df = t.group_by("caption").aggregate([("pos", "count")])
    idx = pc.index_in(t.column("caption"), value_set=df.column("caption"))
    t = t.append_column("df", df.column("pos_count").take(idx))
    group = t.column("group").to_numpy()
    for gnum in np.unique(group):
        run.write_table(t.filter(pa.array(group == gnum)).select(["pos", "caption", "df"]), *blocks.scratch("capdf", f"g-{int(gnum):05d}", f"h-{part:05d}.parquet"))
    return t.num_rows


def captions_of(run: RunDir | None, g: Group) -> list[list[str]]:
    """Each row's captions, its `text` when the list is empty (train.data.caption_rows' rule)."""
    out = []
    for sid, caps, text in zip(g.table.column("sample_id").to_pylist(), g.table.column("captions").to_pylist(), g.table.column("text").to_pylist()):
        caps = [c for c in (caps or []) if c and c.strip()]
        if not caps and text and text.strip():
            caps = [text]
        if not caps:
            raise blocks.PoolError(f"{run.url('shards') if run else 'shards'}: sample {sid} has no caption (captions and text are empty)")
        out.append(caps)
    return out


def caption_information_of(run: RunDir, g: Group) -> tuple[np.ndarray, np.ndarray]:
    """(information, distinct captions) per row of the group, from capdf/ (see captions.caption_information)."""
    info = np.zeros(g.table.num_rows)
    distinct = np.zeros(g.table.num_rows, dtype=np.int64)
    if not run.exists(*blocks.scratch("capdf", f"g-{g.number:05d}")):
        return info, distinct
    t = blocks.read_parts(run, blocks.scratch("capdf", f"g-{g.number:05d}"))
    t = t.take(pc.sort_indices(t, [("pos", "ascending"), ("caption", "ascending")]))
    row = np.searchsorted(g.pos, t.column("pos").to_numpy())
    sums = [0] * g.table.num_rows
    for r, d in zip(row.tolist(), t.column("df").to_pylist()):
        sums[r] += 1.0 / d
    info[:] = sums
    distinct[:] = np.bincount(row, minlength=g.table.num_rows)
    return info, distinct


def typicality_of(g: Group, in_pool: Counter, pool_rows: int, k: int) -> np.ndarray:
    """captions.caption_typicality of the group's rows, with the pool's word counts `in_pool`."""
    words = caption_words(captions_of(None, g))
    out = np.zeros(len(words))
    for c, rows in g.members(eligible_only=False):
        local = [words[r] for r in rows]
        vocab = {w: j for j, w in enumerate(sorted({w for ws in local for w in ws}))}
        r_ = np.repeat(np.arange(len(local)), [len(ws) for ws in local])
        cols = np.array([vocab[w] for ws in local for w in ws], dtype=np.int64)
        in_cluster = np.bincount(cols, minlength=len(vocab)).astype(np.float64)
        pool = np.array([in_pool[w] for w in sorted(vocab)], dtype=np.float64)
        shared = pool[cols] >= 2 if len(cols) else np.zeros(0, dtype=bool)
        r_, cols = r_[shared], cols[shared]
        lift = np.log(in_cluster[cols] / (len(rows) + 1)) - np.log(pool[cols] / (pool_rows + 1))
        n_words = np.bincount(r_, minlength=len(local)).astype(np.float64)
        out[rows] = np.bincount(r_, weights=lift, minlength=len(local)) / np.maximum(n_words, 1.0)
    return out


def coincide_stats(run: RunDir, number: int, labels: np.ndarray, space: str, threshold: float | None, density_rows: int, seeds: np.ndarray) -> dict:
    """Per cluster of the group (filter survivors only): the sum of its unit rows and its density."""
    g = load_group(run, number, labels, embedding_columns(space), threshold)
    out = {}
    for c, rows in g.members():
        x = g.x(space, rows)
        s = np.zeros((1, x.shape[1]), dtype=np.float64)
        np.add.at(s, np.zeros(len(x), dtype=np.int64), x)
        out[c] = (s[0], density(x, density_rows, int(seeds[c])))
    return out


# -- global top-B keys -----------------------------------------------------------------------------------


def write_keys(run: RunDir, number: int, name: str, pos: np.ndarray, key: np.ndarray) -> int:
    run.write_table(pa.table({"pos": pa.array(pos, type=pa.int64()), "key": pa.array(key, type=pa.float64())}, schema=KEY_SCHEMA), *blocks.scratch("keys", name, f"g-{number:05d}.parquet"))
    return len(pos)


def key_histogram(run: RunDir, name: str, numbers: list[int], prefix) -> np.ndarray:
    total = np.zeros(BINS, dtype=np.int64)
    for n in numbers:
        if run.exists(*blocks.scratch("keys", name, f"g-{n:05d}.parquet")):
            t = blocks._read(run, run.path(*blocks.scratch("keys", name, f"g-{n:05d}.parquet")))
            total += histogram(t.column("key").to_numpy(), t.column("pos").to_numpy(), prefix)
    return total


def key_phase(run: RunDir, number: int, labels: np.ndarray, spec: dict, subspace=None) -> int:
    """Write the global key of the group's rows for a global top-B (see threshold.py)."""
    method = spec["method"]
    threshold = spec.get("threshold")
    if method == "readmit":
        g = load_group(run, number, labels, [], threshold)
        dups = ~g.eligible
        return write_keys(run, number, "readmit", g.pos[dups], -g.red.column("max_cos").to_numpy()[dups].astype(np.float64))
    if method == "random":
        g = load_group(run, number, labels, [] if threshold is not None else ["draw"], threshold)
        draw = group_draws(run, g, threshold is not None)
        return write_keys(run, number, "main", g.pos[g.eligible], draw[g.eligible])
    if method == "scalselect":
        g = load_group(run, number, labels, spec["columns"], threshold)
        rows = np.flatnonzero(g.eligible)
        lev = np.concatenate([leverage_scores(g.x(spec["space"], rows[s:s + CHUNK]), subspace) for s in range(0, len(rows), CHUNK)]) if len(rows) else np.zeros(0)
        return write_keys(run, number, "main", g.pos[rows], lev)
    if method == "semdedup":
        red = blocks.read_parts(run, blocks.scratch("red", f"g-{number:05d}"), schema=RED_SCHEMA)
        mc = red.column("max_cos").to_numpy()
        keep = mc <= threshold if threshold is not None else np.ones(len(mc), dtype=bool)
        return write_keys(run, number, "main", red.column("pos").to_numpy()[keep], (1.0 - mc[keep]).astype(np.float32).astype(np.float64))
    raise ValueError(f"no global key for {method}")


# -- decide: the group's manifest rows -------------------------------------------------------------------


def _kept(selected: np.ndarray, kept: str, dropped: str) -> np.ndarray:
    return np.where(selected, kept, dropped).astype(object)


def decide(run: RunDir, number: int, labels: np.ndarray, offsets: np.ndarray, spec: dict) -> dict:
    """Select the group's rows by `spec` (the method and what the driver learnt of the pool) and
    write its manifest rows to out/; returns the selected rows per cluster and method figures."""
    method = spec["method"]
    threshold = spec.get("threshold")
    g = load_group(run, number, labels, spec["columns"], threshold, with_red=method == "semdedup")
    n = g.table.num_rows
    selected = np.zeros(n, dtype=bool)
    score = np.zeros(n, dtype=np.float32)
    reason = np.empty(n, dtype=object)
    info: dict[str, Any] = {}
    quotas = spec.get("quotas")
    draw = group_draws(run, g, threshold is not None) if method in ("random", "cluster-random", "caption-diversity", "caption-typicality") else None
    zeros = lambda m: np.zeros(m, dtype=np.int64)  # noqa: E731  one cluster's groups

    def put(rows: np.ndarray, sel) -> None:
        selected[rows] = sel.selected
        score[rows] = sel.score
        reason[rows] = sel.reason

    if method == "caption-diversity":
        information, distinct = caption_information_of(run, g)
        e = g.eligible
        info["distinct_captions_pool"] = int(distinct[e].sum())
    if method in ("caption-typicality", "typicality-mmd"):
        typicality = typicality_of(g, spec["in_pool"], spec["pool_rows"], len(labels))
    if method == "alignment-mmd":
        alignment = alignment_of(g, spec)
    if method == "coincide":
        p, visit_pos, sizes, given = spec["p"], spec["visit_pos"], spec["sizes"], spec["given"]

    cut = spec.get("cut")
    for c, rows in g.members():
        q = int(quotas[c]) if quotas is not None else 0
        m = len(rows)
        if method == "random":
            sel = cut.keep(draw[rows], g.pos[rows]) if cut is not None else np.zeros(m, dtype=bool)
            selected[rows], score[rows] = sel, draw[rows].astype(np.float32)
            reason[rows] = _kept(sel, f"kept: uniform random draw (seed {spec['seed']})", "dropped: not drawn")
        elif method == "cluster-random":
            sel, _ = top_per_group(zeros(m), draw[rows], np.array([q]))
            selected[rows], score[rows] = sel, draw[rows].astype(np.float32)
            reason[rows] = _kept(sel, f"kept: random draw within the {spec['quota']} cluster quota", "dropped: not drawn within the cluster quota")
        elif method == "shift":
            shift = g.table.column(spec["shift_column"]).to_numpy(zero_copy_only=False).astype(np.float64)[rows]
            put(rows, shift_select(1, zeros(m), shift, q, "proportional", spec["keep"]))
        elif method == "scalselect":
            sub = spec["subspace"]
            lev = np.concatenate([leverage_scores(g.x(spec["space"], rows[s:s + CHUNK]), sub) for s in range(0, m, CHUNK)])
            if spec["within"]:
                put(rows, scalselect_select(1, zeros(m), lev, q, sub, np.array([q])))
            else:
                sel = cut.keep(lev, g.pos[rows]) if cut is not None else np.zeros(m, dtype=bool)
                selected[rows], score[rows] = sel, lev.astype(np.float32)
                what = [f"leverage {v:.6g} (k={sub.k}, energy {sub.energy:.3f})" for v in lev]
                reason[rows] = [f"kept: {w} in the global top {spec['budget']}" if s else f"dropped: {w} outside the budget" for w, s in zip(what, sel)]
            info.update(rank_k=sub.k, energy_held=round(sub.energy, 6))
        elif method == "semdedup":
            mc = g.red.column("max_cos").to_numpy()[rows] if g.red is not None else None
            dup_of = g.red.column("duplicate_of").to_pylist() if g.red is not None else None
            s = (1.0 - mc).astype(np.float32)
            sel = cut.keep(s.astype(np.float64), g.pos[rows]) if cut is not None else np.zeros(m, dtype=bool)
            selected[rows], score[rows] = sel, s
            reason[rows] = [f"kept: max cosine {v:.4f} to an earlier row of its cluster" if k else f"dropped: near-duplicate (cosine {v:.4f}) of {dup_of[r]}" for v, k, r in zip(mc, sel, rows)]
            if sel.any():
                info["cosine_cut"] = max(info.get("cosine_cut", -1.0), float(mc[sel].max()))
        elif method in ("caption-diversity", "caption-typicality"):
            s = information[rows] if method == "caption-diversity" else typicality[rows]
            what = "caption information" if method == "caption-diversity" else "caption typicality"
            put(rows, caption_select(1, zeros(m), s, q, "proportional", spec["seed"], spec["keep"], what, draw=draw[rows]))
            if method == "caption-diversity":
                info["distinct_captions_selected"] = info.get("distinct_captions_selected", 0) + int(distinct[rows][selected[rows]].sum())
        elif method in ("typicality-mmd", "alignment-mmd"):
            s = typicality[rows] if method == "typicality-mmd" else alignment[rows]
            what = "caption typicality" if method == "typicality-mmd" else "image-text alignment"
            sel = mmd_among_top(g.x(spec["space"], rows), zeros(m), 1, s, q, "proportional", spec["candidates"], spec["mmd_width"], spec["mmd_block_rows"], spec["seed"], what)
            put(rows, sel)
            info.update(sel.info)
        elif method == "coincide":
            picks = blocked_greedy_mmd(g.x(spec["space"], rows), q, width=spec["mmd_width"], block_rows=spec["mmd_block_rows"], seed=spec["seed"]) if q > 0 else np.zeros(0, dtype=np.int64)
            rank = np.full(m, -1, dtype=np.int64)
            rank[picks] = np.arange(len(picks))
            sel = rank >= 0
            selected[rows], score[rows] = sel, np.float32(p[c])
            if not given:
                where = f"cluster P={p[c]:.3g} visited {visit_pos[c] + 1} of {len(labels)}, quota {q} of {sizes[c]}"
            else:
                where = f"cluster P={p[c]:.3g}, quota {q} of {sizes[c]} from select.quota"
            reason[rows] = [
                f"dropped: not picked ({where})" if not s_ else (f"kept: whole cluster taken ({where})" if q >= sizes[c] else f"kept: greedy MMD pick {r_ + 1} ({where})")
                for s_, r_ in zip(sel, rank)
            ]
        elif method == "error-driven":
            best, picked = error_driven_rows(run, g, rows, spec)
            selected[rows], score[rows] = picked >= 0, best
            names = spec["failure_names"]
            reason[rows] = [
                f"kept: near {names[f]} (cosine {v:.4f})" if f >= 0 else "dropped: not among the nearest rows of any failure"
                for f, v in zip(picked, spec_cosines(g, rows, picked, spec))
            ]
        else:
            raise ValueError(f"select.method: {method!r} is not implemented")

    if threshold is not None:  # the near-duplicate filter's rows
        dups = np.flatnonzero(~g.eligible)
        mc = g.red.column("max_cos").to_numpy()
        dup_of = g.red.column("duplicate_of").to_pylist()
        back = spec["readmit_cut"].keep(-mc[dups].astype(np.float64), g.pos[dups]) if spec.get("readmit_cut") is not None else np.zeros(len(dups), dtype=bool)
        selected[dups], score[dups] = back, 0.0
        reason[dups] = [
            f"kept: near-duplicate let back in to meet the budget (cosine {mc[i]:.4f})" if b else f"dropped: near-duplicate (cosine {mc[i]:.4f} > {threshold}) of {dup_of[i]}"
            for i, b in zip(dups, back)
        ]
    out = pa.table(
        {
            "pos": g.table.column("pos"),
            "sample_id": g.table.column("sample_id"),
            "cluster": pa.array(labels[g.index].astype(np.int32)),
            "score": pa.array(score),
            "selected": pa.array(selected),
            "reason": pa.array([str(r) for r in reason], type=pa.string()),
        },
        schema=OUT_SCHEMA,
    )
    blocks.write_by_bucket(run, "out", number, out, offsets)
    return {"taken": np.bincount(g.index[selected], minlength=len(labels)), "info": info}


def alignment_of(g: Group, spec: dict) -> np.ndarray:
    """Each row's image-text alignment (rsdist.select.alignment.pair_alignment) from the pool's ridge maps."""
    n = g.table.num_rows
    alignment = np.zeros(n)
    for (a, b, ridge), j in zip(spec["ridges"], spec["best"]):
        scores = np.zeros(n)
        if spec["score"] == "cosine":
            for s in range(0, n, CHUNK):
                rows = np.arange(s, min(n, s + CHUNK))
                scores[rows] = held_out_cosine_at(g.x(a, rows), g.x(b, rows), ridge, j)
        else:
            for c, rows in g.members(eligible_only=False):
                inputs, outputs = g.x(a, rows), g.x(b, rows)
                chunks = [slice(s, s + CHUNK) for s in range(0, len(rows), CHUNK)]
                predicted, centred = held_out_unit_predictions(inputs, outputs, ridge, j, chunks)
                rng = np.random.default_rng(spec["seed"])
                state = spec["rng_states"].get(c)
                if state is not None:
                    rng.bit_generator.state = state
                scores[rows] = cluster_contrastive(predicted, centred, spec["temperature"], spec["mmd_block_rows"], rng)
        alignment += scores / len(spec["ridges"])
    return alignment


def error_driven_rows(run: RunDir, g: Group, rows: np.ndarray, spec: dict) -> tuple[np.ndarray, np.ndarray]:
    """(best cosine to any failure query, query that picked the row or -1) for one cluster's rows."""
    x = g.x(spec["space"], rows)
    queries = spec["queries"]
    best = np.full(len(rows), -np.inf, dtype=np.float32)
    for s in range(0, len(queries), 256):
        best = np.maximum(best, (x @ queries[s:s + 256].T).max(axis=1))
    picks = spec["picks"]
    picked = np.full(len(rows), -1, dtype=np.int64)
    pos = g.pos[rows]
    i = np.searchsorted(picks[0], pos)
    ok = (i < len(picks[0])) & (picks[0][np.minimum(i, len(picks[0]) - 1)] == pos)
    picked[ok] = picks[1][i[ok]]
    return best, picked


def spec_cosines(g: Group, rows: np.ndarray, picked: np.ndarray, spec: dict) -> np.ndarray:
    x = g.x(spec["space"], rows)
    q = spec["queries"]
    return np.array([float(x[i] @ q[f]) if f >= 0 else 0.0 for i, f in enumerate(picked)])


def nearest_candidates(run: RunDir, number: int, labels: np.ndarray, spec: dict, lengths: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per failure query, the group's `lengths[f]` eligible rows most similar to it: (cosines, pos)."""
    g = load_group(run, number, labels, spec["columns"], spec.get("threshold"))
    rows = np.flatnonzero(g.eligible)
    x = g.x(spec["space"], rows) if len(rows) else np.zeros((0, spec["queries"].shape[1]), dtype=np.float32)
    pos = g.pos[rows]
    out = []
    for f, q in enumerate(spec["queries"]):
        sims = x @ q
        top = np.lexsort((pos, -sims))[: int(lengths[f])]
        out.append((sims[top], pos[top]))
    return out


def unit(x: np.ndarray) -> np.ndarray:
    return unit_rows(np.asarray(x, dtype=np.float32))
