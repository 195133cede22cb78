"""The select stage on a constructed run directory: every method, the manifest, determinism, errors."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rsdist.config import ConfigError, SelectConfig, config_from_dict
from rsdist.core.schema import make_sample_id
from rsdist.select import stage as select
from rsdist.stage import fingerprint, run_stage

DIM = 8
METHODS = ["shift", "random", "cluster-random", "scalselect", "semdedup", "coincide", "coincide-within", "error-driven", "caption-diversity", "caption-typicality", "typicality-mmd", "alignment-mmd"]


def emb_array(m):
    return pa.FixedSizeListArray.from_arrays(pa.array(m.ravel(), type=pa.float32()), m.shape[1])


def write_inputs(run, n=60, k=4, n_test=6, seed=0):
    """clusters/ (two part files) and features/ for n pool rows plus n_test test rows; rows 50-54 duplicate row 0."""
    rng = np.random.default_rng(seed)
    ids = [make_sample_id("constructed", f"img{i}") for i in range(n + n_test)]
    centres = rng.normal(size=(k, DIM)) * 3
    cluster = np.arange(n + n_test) % k
    img = centres[cluster] + rng.normal(size=(n + n_test, DIM))
    img[50:55] = img[0]
    cluster[50:55] = cluster[0]
    txt = img + 0.1 * rng.normal(size=img.shape)
    shift = rng.random(n + n_test).astype(np.float32)
    split = ["train"] * n + ["test"] * n_test
    feats = pa.table(
        {
            "sample_id": ids,
            "split": split,
            "label": [f"c{c}" for c in cluster],
            "image_emb": emb_array(img.astype(np.float32)),
            "text_emb": emb_array(txt.astype(np.float32)),
            "shift": shift,
            "shift_noise": shift[::-1].copy(),
        }
    )
    order = rng.permutation(n + n_test)  # file order must not matter
    run.write_table(feats.take(pa.array(order[: (n + n_test) // 2])), "features", "part-00000.parquet")
    run.write_table(feats.take(pa.array(order[(n + n_test) // 2:])), "features", "part-00001.parquet")
    clusters = pa.table({"sample_id": ids[:n], "cluster": pa.array(cluster[:n], pa.int32()), "dist": pa.array(rng.random(n), pa.float32())})
    run.write_table(clusters.slice(0, 25), "clusters", "part-00000.parquet")
    run.write_table(clusters.slice(25), "clusters", "part-00001.parquet")
    np.save(run.path("clusters", "centroids.npy"), centres)
    # shards/: every third image repeats one generic sentence, the others have their own captions.
    captions = [["a generic scene ."] * 3 if i % 3 == 0 else [f"scene {i} view {j}" for j in range(1 + i % 3)] for i in range(n + n_test)]
    run.write_table(pa.table({"sample_id": ids, "captions": captions, "text": [c[0] for c in captions]}), "shards", "part-00000.parquet")
    return ids


def write_failures(run, ids):
    pq.write_table(pa.table({"sample_id": ids[60:63], "weight": [1.0, 2.0, 1.0]}), run.path("failures.parquet"))
    return run.url("failures.parquet")


@pytest.mark.parametrize("method", METHODS)
def test_every_method_writes_an_exact_manifest(run_dir, ray_session, method):
    ids = write_inputs(run_dir)
    cfg = SelectConfig(method=method, budget=0.25, failures=write_failures(run_dir, ids))
    result = select.run(run_dir, cfg)
    assert (result.rows_in, result.rows_out) == (60, 15)
    assert result.extra == {"method": method, "budget": 0.25, "budget_count": 15, "selected": 15, "pool": 60}
    manifest = run_dir.read_table("selection", "manifest.parquet")
    assert manifest.schema.equals(select.MANIFEST_SCHEMA)
    assert manifest.num_rows == 60 and sum(manifest.column("selected").to_pylist()) == 15
    assert manifest.column("sample_id").to_pylist() == sorted(ids[:60])
    assert all(r.startswith(("kept:", "dropped:")) for r in manifest.column("reason").to_pylist())
    info = run_dir.read_json("selection", "selection.json")
    assert info["method"] == method and info["pool"] == 60 and info["selected"] == 15
    assert sum(c["selected"] for c in info["clusters"].values()) == 15
    if method in ("shift", "cluster-random", "coincide-within"):
        assert sum(c["quota"] for c in info["clusters"].values()) == 15
    if method == "caption-diversity":
        kept = [int(r["sample_id"] in set(manifest.filter(manifest.column("selected")).column("sample_id").to_pylist())) for r in manifest.to_pylist()]
        assert not any(ids.index(s) % 3 == 0 for s, k in zip(manifest.column("sample_id").to_pylist(), kept) if k)
        assert info["info"]["distinct_captions_selected"] > 15
    if method == "semdedup":
        dup_ids = {ids[i] for i in range(51, 55)}
        kept = set(manifest.filter(manifest.column("selected")).column("sample_id").to_pylist())
        assert len(kept & (dup_ids | {ids[0], ids[50]})) <= 1


@pytest.mark.parametrize("direction", ["image-to-text", "both"])
@pytest.mark.parametrize("score", ["cosine", "contrastive"])
def test_alignment_mmd_reads_its_space_and_the_alignment_of_the_pool(run_dir, direction, score):
    from rsdist.select.alignment import pair_alignment

    write_inputs(run_dir)
    pool = select.read_pool(run_dir)
    cfg = SelectConfig(space="joint", alignment_direction=direction, alignment_score=score, alignment_temperature=0.1)
    x, alignment = select.embeddings_and_alignment(run_dir, pool, cfg)
    np.testing.assert_allclose(x, select.pool_embeddings(run_dir, pool, "joint"))
    image, text = select.pool_embeddings(run_dir, pool, "image"), select.pool_embeddings(run_dir, pool, "text")
    expected, _ = pair_alignment(image, text, direction=direction, score=score, groups=pool.groups, temperature=0.1, block_rows=cfg.mmd_block_rows)
    np.testing.assert_allclose(alignment, expected)
    if score == "cosine":
        assert alignment.shape == (60,) and np.all(np.abs(alignment) <= 1.0 + 1e-9)
    else:  # log-probabilities of the own caption among the cluster's
        assert alignment.shape == (60,) and np.all(alignment <= 1e-12)


def test_same_inputs_give_the_same_manifest(tmp_path):
    from rsdist.core.rundir import RunDir

    tables = []
    for name in ("a", "b"):
        run = RunDir(str(tmp_path / name))
        write_inputs(run, seed=3)
        select.run(run, SelectConfig(method="cluster-random", budget=20, quota="equal", seed=7))
        tables.append(run.read_table("selection", "manifest.parquet"))
    assert tables[0].equals(tables[1])


def test_dedup_filter_composes_with_shift_and_a_shift_column(run_dir):
    write_inputs(run_dir)
    cfg = SelectConfig(method="shift", budget=30, dedup_threshold=0.99, dedup_keep="first", shift_column="shift_noise")
    select.run(run_dir, cfg)
    manifest = run_dir.read_table("selection", "manifest.parquet").to_pylist()
    dropped = [r for r in manifest if "near-duplicate" in r["reason"]]
    assert len(dropped) == 5 and not any(r["selected"] for r in dropped)
    assert sum(r["selected"] for r in manifest) == 30


def test_dedup_filter_composes_with_typicality_mmd_in_the_image_space(run_dir):
    """typicality-mmd behind the filter (with the 20% settings): the duplicates are dropped before
    the per-cluster typicality and MMD run on the survivors, and the count stays exact."""
    ids = write_inputs(run_dir)
    cfg = SelectConfig(method="typicality-mmd", budget=30, dedup_threshold=0.99, dedup_keep="first", space="image", mmd_width=0.5)
    select.run(run_dir, cfg)
    manifest = run_dir.read_table("selection", "manifest.parquet").to_pylist()
    dropped = {r["sample_id"] for r in manifest if "near-duplicate" in r["reason"]}
    copies = {ids[i] for i in (0, 50, 51, 52, 53, 54)}  # six identical image rows
    assert len(dropped) == 5 and dropped < copies and min(copies) not in dropped  # 'first': the lowest sample_id stays
    assert not any(r["selected"] for r in manifest if r["sample_id"] in dropped)
    assert sum(r["selected"] for r in manifest) == 30
    info = run_dir.read_json("selection", "selection.json")
    assert info["info"]["mmd_width"] == 0.5 and info["settings"]["space"] == "image"


@pytest.mark.parametrize("score", ["cosine", "contrastive"])
def test_dedup_filter_composes_with_alignment_mmd_in_the_image_space(run_dir, score):
    """alignment-mmd behind the filter, both directions, MMD in the image space, candidates 1 (each
    cluster keeps exactly its best-aligned survivors): the survivors' scores are their own pool
    rows' alignment, and no survivor left out of a cluster is better aligned than one kept."""
    ids = write_inputs(run_dir)
    cfg = SelectConfig(method="alignment-mmd", budget=30, dedup_threshold=0.99, dedup_keep="first", space="image", candidates=1.0, alignment_direction="both", alignment_score=score)
    select.run(run_dir, cfg)
    manifest = run_dir.read_table("selection", "manifest.parquet").to_pylist()
    dropped = {r["sample_id"] for r in manifest if "near-duplicate" in r["reason"]}
    assert len(dropped) == 5 and sum(r["selected"] for r in manifest) == 30
    pool = select.read_pool(run_dir)
    _, alignment = select.embeddings_and_alignment(run_dir, pool, cfg)
    expected = dict(zip(pool.ids.to_pylist(), alignment))
    survivors = [r for r in manifest if r["sample_id"] not in dropped]
    assert all(r["score"] == pytest.approx(expected[r["sample_id"]], abs=1e-6) for r in survivors)
    for c in {r["cluster"] for r in survivors}:
        kept = [r["score"] for r in survivors if r["cluster"] == c and r["selected"]]
        left = [r["score"] for r in survivors if r["cluster"] == c and not r["selected"]]
        assert not left or not kept or min(kept) >= max(left)


def test_run_stage_skips_a_complete_selection(run_dir):
    write_inputs(run_dir)
    cfg = SelectConfig(method="random", budget=0.5)
    fp = fingerprint(cfg)
    first = run_stage(run_dir, "selection", fp, lambda: select.run(run_dir, cfg))
    again = run_stage(run_dir, "selection", fp, lambda: select.run(run_dir, cfg))
    assert not first["skipped"] and again["skipped"] and again["rows_out"] == 30


def test_bad_inputs_name_the_file_and_the_row(run_dir):
    ids = write_inputs(run_dir)
    run_dir.write_table(pa.table({"sample_id": [ids[0]], "cluster": pa.array([0], pa.int32()), "dist": pa.array([0.0], pa.float32())}), "clusters", "part-00002.parquet")
    with pytest.raises(ValueError, match=f"clusters: sample_id '{ids[0]}' appears more than once"):
        select.run(run_dir, SelectConfig(method="random"))
    run_dir.remove("clusters", "part-00002.parquet")
    run_dir.write_table(pa.table({"sample_id": ["not-in-features"], "cluster": pa.array([0], pa.int32()), "dist": pa.array([0.0], pa.float32())}), "clusters", "part-00002.parquet")
    with pytest.raises(ValueError, match="features: no row for sample_id 'not-in-features'"):
        select.run(run_dir, SelectConfig(method="shift"))
    run_dir.remove("clusters", "part-00002.parquet")
    with pytest.raises(ValueError, match="select.failures: .* does not exist"):
        select.run(run_dir, SelectConfig(method="error-driven"))


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="select.method: 'best' is not one of: shift, random, cluster-random"):
        SelectConfig(method="best")
    with pytest.raises(ConfigError, match="select.energy"):
        config_from_dict({"select": {"energy": 1.5}})
    with pytest.raises(ConfigError, match="select.space"):
        SelectConfig(space="pixels")
    with pytest.raises(ConfigError, match="select.dedup_keep"):
        SelectConfig(dedup_keep="random")
    assert SelectConfig(space="vlm_emb").space == "vlm_emb"
    with pytest.raises(ConfigError, match="select.within_clusters: for methods scalselect and coincide only; random"):
        SelectConfig(method="random", within_clusters=True)
    with pytest.raises(ConfigError, match="select.candidates: 0.5 must be at least 1"):
        SelectConfig(method="typicality-mmd", candidates=0.5)
    with pytest.raises(ConfigError, match="select.mmd_width: 0 must be > 0"):
        SelectConfig(method="coincide", mmd_width=0)
    with pytest.raises(ConfigError, match="select.mmd_block_rows: -1 must be >= 0"):
        SelectConfig(method="coincide", mmd_block_rows=-1)


def test_caption_diversity_names_a_pool_row_without_shard_row(run_dir):
    ids = write_inputs(run_dir)
    shards = run_dir.read_table("shards")
    run_dir.write_table(shards.filter(pa.array([s != ids[7] for s in shards.column("sample_id").to_pylist()])), "shards", "part-00000.parquet")
    with pytest.raises(ValueError, match=f"shards: no row for sample_id '{ids[7]}' of the cluster pool"):
        select.run(run_dir, SelectConfig(method="caption-diversity", budget=10))


@pytest.mark.parametrize("method", ["scalselect", "coincide"])
def test_within_clusters_spends_the_proportional_quota(run_dir, ray_session, method):
    write_inputs(run_dir)
    select.run(run_dir, SelectConfig(method=method, budget=0.25, within_clusters=True))
    info = run_dir.read_json("selection", "selection.json")
    sizes = {c: v["size"] for c, v in info["clusters"].items()}
    assert all(v["selected"] == v["quota"] for v in info["clusters"].values())
    assert sum(v["quota"] for v in info["clusters"].values()) == 15
    assert all(abs(v["quota"] - 15 * sizes[c] / 60) < 1 for c, v in info["clusters"].items())


def test_coincide_within_is_coincide_with_within_clusters(tmp_path, ray_session):
    """coincide-within is a name for coincide with within_clusters: the same manifest."""
    from rsdist.core.rundir import RunDir

    tables = []
    for name, cfg in (("alias", SelectConfig(method="coincide-within", budget=0.25)), ("spelled", SelectConfig(method="coincide", within_clusters=True, budget=0.25))):
        run = RunDir(str(tmp_path / name))
        write_inputs(run)
        select.run(run, cfg)
        tables.append(run.read_table("selection", "manifest.parquet"))
    assert tables[0].equals(tables[1])
