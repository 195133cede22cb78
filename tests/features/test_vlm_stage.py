"""VLM-internal features in the features stage: coincide_emb / scalselect_emb columns from a tiny
random Qwen2-VL in the actor pool, then the cluster and select stages on those columns."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from rsdist.config import ClusterConfig, ConfigError, FeaturesConfig, SelectConfig
from rsdist.features import stage as features
from rsdist.features.vlm_embed import VlmEmbedder, VlmSpec, find_subsequence, prompt_mask

from .conftest import write_shards

LAYERS = [0, 1]  # the tiny Qwen2-VL has 2 language layers of width 64


def _cfg(**kw) -> FeaturesConfig:
    base = dict(encoder="tiny", image_size=32, batch_size=4, perturbations=["noise"], vlm="qwen2-vl-tiny", coincide_layers=LAYERS)
    base.update(kw)
    return FeaturesConfig(**base)


def test_stage_writes_vlm_columns_and_select_uses_them(ray_session, run_dir):
    from rsdist.cluster import stage as cluster
    from rsdist.select import stage as select

    ids = write_shards(run_dir, n_shards=2, rows_per_shard=8, seed=3)
    cfg = _cfg(batch_size=8, num_actors=1)  # one actor: each one builds its own VLM
    result = features.run(run_dir, cfg)
    assert result.rows_in == result.rows_out == 16
    table = run_dir.read_table("features")
    assert table.column("sample_id").to_pylist() == ids  # exactly once, in shard order
    assert table.schema.field("coincide_emb").type == pa.list_(pa.float32(), 2 * len(LAYERS) * 64)
    assert table.schema.field("scalselect_emb").type == pa.list_(pa.float32(), 64)
    assert table.schema.field("image_emb").type == pa.list_(pa.float32(), 32)  # the dual-encoder columns stay
    coincide = np.stack(table.column("coincide_emb").to_numpy(zero_copy_only=False))
    scal = np.stack(table.column("scalselect_emb").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(np.linalg.norm(coincide, axis=1), 1.0, rtol=1e-5)
    assert np.isfinite(scal).all() and len(np.unique(scal.round(5), axis=0)) == 16  # every sample its own vector
    meta = run_dir.read_json("features", "features_meta.json")
    assert meta["vlm"]["model"] == "qwen2-vl-tiny" and meta["vlm"]["columns"] == {"coincide_emb": 256, "scalselect_emb": 64}
    assert meta["vlm"]["coincide_layers"] == LAYERS

    # the actors' rows equal the same computation in this process (batching and actors do not matter)
    from rsdist.features.preprocess import preprocess_batch

    shard = run_dir.read_table("shards", "part-00000.parquet").slice(0, 3)
    columns = {c: shard.column(c).to_numpy(zero_copy_only=False) for c in ("sample_id", "image", "text", "captions", "label", "split")}
    columns["path"] = np.array(["part-00000.parquet"] * 3, dtype=object)
    local = VlmEmbedder(features.vlm_spec(cfg))(preprocess_batch(columns, cfg.image_size, cfg.perturbations, cfg.seed))
    np.testing.assert_allclose(local["coincide_emb"], coincide[:3], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(local["scalselect_emb"], scal[:3], rtol=1e-4, atol=1e-5)

    cluster.run(run_dir, ClusterConfig(k=2))
    for method, space in (("coincide", "coincide_emb"), ("scalselect", "scalselect_emb")):
        result = select.run(run_dir, SelectConfig(method=method, budget=0.5, space=space))
        manifest = run_dir.read_table("selection", "manifest.parquet")
        assert result.rows_out == sum(manifest.column("selected").to_pylist()) == result.extra["budget_count"] > 0, method


def test_prompt_tokens_are_scalselects_user_tokens():
    ids = torch.tensor([[1, 5, 5, 7, 8, 9, 2, 7, 8], [1, 5, 7, 8, 9, 0, 0, 0, 0]])
    mask, found = prompt_mask(ids, (ids != 0).long(), image_token=5, prompt_variants=[[7, 8, 9]])
    assert found
    assert mask[0].nonzero().squeeze(1).tolist() == [3, 4, 5] and mask[1].nonzero().squeeze(1).tolist() == [2, 3, 4]
    fallback, found = prompt_mask(ids, (ids != 0).long(), image_token=5, prompt_variants=[[4, 4]])
    assert not found and fallback[1].tolist() == [True, False, True, True, True, False, False, False, False]
    assert find_subsequence([1, 2, 3, 1, 2], [1, 2], start=1) == 3 and find_subsequence([1, 2], [3]) == -1


def test_tiny_qwen2_vl_prompt_is_found_and_layers_are_checked():
    spec = VlmSpec("qwen2-vl-tiny", ("coincide", "scalselect"), (0, 1), 0.9, "Describe the image.")
    embedder = VlmEmbedder(spec)
    pixels = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    inputs = embedder.inputs(pixels, ['["many planes are parked"]', '["a river"]'])
    mask, found = prompt_mask(inputs["input_ids"], inputs["attention_mask"], embedder.image_token, embedder.prompt_variants)
    assert found
    tokenizer = embedder.processor.tokenizer
    assert tokenizer.decode(inputs["input_ids"][0][mask[0]]) == "Describe the image."
    with pytest.raises(ValueError, match=r"features.coincide_layers: \[5\] are outside qwen2-vl-tiny's 2 language layers"):
        VlmEmbedder(VlmSpec("qwen2-vl-tiny", ("coincide",), (0, 5), 0.9, "Describe the image."))


def test_vlm_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="features.vlm: 'qwen' is not one of: none, qwen2-vl-tiny, hf:<folder>"):
        _cfg(vlm="qwen")
    with pytest.raises(ConfigError, match="features.vlm_features: 'clip' is not one of: coincide, scalselect"):
        _cfg(vlm_features=["clip"])
    with pytest.raises(ConfigError, match="features.coincide_layers: -1 must be a layer index >= 0"):
        _cfg(coincide_layers=[-1])
    with pytest.raises(ConfigError, match=r"features.scalselect_mass: 1.5 must be in \(0, 1\]"):
        _cfg(scalselect_mass=1.5)
    assert features.vlm_spec(_cfg(vlm="none")) is None
    assert features.vlm_spec(_cfg(vlm_features=["scalselect"])).columns == ["scalselect_emb"]
