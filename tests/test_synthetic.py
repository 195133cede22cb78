import io

import fsspec
import numpy as np
from PIL import Image

from rsdist import synthetic


def test_generates_rsicd_layout_with_redundancy(tmp_path):
    counts = synthetic.generate(str(tmp_path / "s"), per_class=5, size=48)
    names = (tmp_path / "s/captions/train_filename.txt").read_text().split()
    caps = (tmp_path / "s/captions/train_caps.txt").read_text().splitlines()
    assert len(names) == counts["images"] == counts["unique"] + counts["exact_duplicates"] + counts["near_duplicates"]
    assert len(caps) == 5 * len(names)
    assert all(n.startswith("synthetic_") for n in names)
    assert counts["unique"] == 5 * len(synthetic.CLASSES)
    # every image file exists and decodes at the requested size
    for cls in synthetic.CLASSES:
        files = list((tmp_path / "s/images" / cls).glob("*.jpg"))
        assert files
        assert Image.open(files[0]).size == (48, 48)


def test_exact_copies_share_bytes_and_near_duplicates_differ_slightly(tmp_path):
    synthetic.generate(str(tmp_path / "s"), per_class=12, size=48, duplicate_fraction=1.0, near_duplicate_fraction=1.0)
    folder = tmp_path / "s/images/Forest"
    orig, copy, near = (folder / "synthetic_forest_0.jpg"), (folder / "synthetic_forest_0_copy.jpg"), (folder / "synthetic_forest_0_near.jpg")
    assert orig.read_bytes() == copy.read_bytes()
    a = np.asarray(Image.open(orig), dtype=float)
    b = np.asarray(Image.open(near), dtype=float)
    other = np.asarray(Image.open(folder / "synthetic_forest_5.jpg"), dtype=float)
    assert 0 < np.abs(a - b).mean() < np.abs(a - other).mean() * 1.5


def test_is_deterministic_and_works_on_memory_fs():
    synthetic.generate("memory://synth-a", per_class=3, size=32)
    synthetic.generate("memory://synth-b", per_class=3, size=32)
    fs = fsspec.filesystem("memory")
    assert fs.cat("/synth-a/captions/train_caps.txt") == fs.cat("/synth-b/captions/train_caps.txt")
    assert fs.cat("/synth-a/images/Lake/synthetic_lake_2.jpg") == fs.cat("/synth-b/images/Lake/synthetic_lake_2.jpg")
    Image.open(io.BytesIO(fs.cat("/synth-a/images/Lake/synthetic_lake_2.jpg"))).verify()
