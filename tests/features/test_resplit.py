import dataclasses

import numpy as np
import pytest

from rsdist.config import config_from_dict
from rsdist.features import resplit
from rsdist.core.rundir import RunDir
from rsdist.pipeline import run_pipeline
from rsdist.stage import completed
from tests.test_pipeline import tiny_settings


def _config(run_dir: str, offset: float):
    cfg = config_from_dict(tiny_settings(run_dir))
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, test_offset=offset))


def _features(run_dir: str):
    return RunDir(run_dir).read_table("features").sort_by("sample_id")


@pytest.mark.slow
def test_resplit_features_equal_computing_them_on_the_other_split(ray_session, tmp_path):
    first, taken, computed = (str(tmp_path / n) for n in ("first", "taken", "computed"))
    run_pipeline(_config(first, 0.0), only=["ingest", "features"], write_summary=False)
    cfg = _config(taken, 0.5)
    run_pipeline(cfg, only=["ingest", "features"], write_summary=False,
                 bodies={"features": lambda run: resplit.run(run, cfg.features, RunDir(first))})
    run_pipeline(_config(computed, 0.5), only=["ingest", "features"], write_summary=False)

    a, b, c = _features(first), _features(taken), _features(computed)
    assert b.column("sample_id").equals(c.column("sample_id"))
    assert b.column("split").to_pylist() == c.column("split").to_pylist() != a.column("split").to_pylist()
    for column in ("image_emb", "text_emb", "shift"):
        np.testing.assert_allclose(np.stack(b.column(column).to_numpy(zero_copy_only=False)),
                                   np.stack(c.column(column).to_numpy(zero_copy_only=False)), atol=1e-5, err_msg=column)
    taken_run, computed_run = RunDir(taken), RunDir(computed)
    assert completed(taken_run, "features")["taken_from"] == RunDir(first).url("features")
    # under the fingerprint the features stage would have: the plain pipeline skips it
    run_pipeline(cfg, only=["ingest", "features"], write_summary=False)
    assert completed(taken_run, "features")["taken_from"] == RunDir(first).url("features")
    assert taken_run.read_json("features", "features_meta.json") == computed_run.read_json("features", "features_meta.json")

    other = dataclasses.replace(cfg.features, image_size=48)
    with pytest.raises(ValueError, match=r"config.json: features.image_size is 32 there and 48 here"):
        resplit.run(RunDir(str(tmp_path / "x")), other, RunDir(first))
    with pytest.raises(FileNotFoundError, match=r"no complete features output"):
        resplit.run(taken_run, cfg.features, RunDir(str(tmp_path / "nowhere")))


def test_resplit_table_names_the_file_when_rows_differ():
    import pyarrow as pa

    feats = pa.table({"sample_id": ["a", "b", "c"], "split": ["train", "train", "test"], "x": [1, 2, 3]})
    shard = pa.table({"sample_id": ["c", "a", "b"], "split": ["train", "test", "train"]})
    out = resplit.resplit_table(feats, shard, "f.parquet")
    assert out.column("split").to_pylist() == ["test", "train", "train"] and out.column("x").to_pylist() == [1, 2, 3]
    with pytest.raises(ValueError, match=r"f.parquet: the source's feature rows are not this shard's rows \(3 feature rows, 2 shard rows\)"):
        resplit.resplit_table(feats, shard.slice(0, 2), "f.parquet")
    with pytest.raises(ValueError, match=r"f.parquet: .*not this shard's rows"):
        resplit.resplit_table(feats, pa.table({"sample_id": ["a", "b", "d"], "split": ["train"] * 3}), "f.parquet")
