"""RunDir: the parquet layout (embeddings stored uncompressed, everything else zstd) and folder copies."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rsdist.core.rundir import RunDir, compression


def test_float_vectors_are_stored_uncompressed_and_the_rest_zstd(tmp_path):
    vectors = np.arange(12, dtype=np.float32).reshape(3, 4)
    table = pa.table({
        "sample_id": ["a", "b", "c"],
        "image_emb": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), 4),
        "text_emb": pa.array(vectors.tolist(), pa.list_(pa.float32())),
        "tokens": pa.array([[1, 2], [3], []], pa.list_(pa.int64())),
        "shift": pa.array([0.1, 0.2, 0.3], pa.float32()),
    })
    assert compression(table.schema) == {
        "sample_id": "zstd", "image_emb.list.element": "none", "text_emb.list.element": "none", "tokens.list.element": "zstd", "shift": "zstd",
    }
    run = RunDir(str(tmp_path))
    path = run.write_table(table, "features", "part-00000.parquet")
    meta = pq.ParquetFile(path).metadata.row_group(0)
    codecs = {meta.column(i).path_in_schema.split(".")[0]: meta.column(i).compression for i in range(meta.num_columns)}
    assert codecs == {"sample_id": "ZSTD", "image_emb": "UNCOMPRESSED", "text_emb": "UNCOMPRESSED", "tokens": "ZSTD", "shift": "ZSTD"}
    assert run.read_table("features").equals(table)


def test_write_local_folder_copies_every_file(tmp_path):
    src = tmp_path / "adapter"
    src.mkdir()
    (src / "adapter_config.json").write_text("{}")
    (src / "adapter_model.safetensors").write_bytes(b"\x00\x01")
    run = RunDir("memory://rundir-folder-test")
    run.write_local_folder(str(src), "checkpoints", "final", "adapter")
    assert run.fs.cat(run.path("checkpoints", "final", "adapter", "adapter_model.safetensors")) == b"\x00\x01"
    assert run.read_json("checkpoints", "final", "adapter", "adapter_config.json") == {}
