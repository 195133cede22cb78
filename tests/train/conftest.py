"""One heads run with best-val epoch keeping, shared by the tests that only read its outputs.

Each Ray Train run costs a worker group start, so the train stage's heads method, its best-val
rule before and after a resume, and the driver's hands-off reading are checked on the same two
runs of one run directory: two epochs, then the same run asked for four (it resumes after epoch 2).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

# What the train stage's driver must leave to the Ray tasks and workers: during both runs these
# raise in the driver (the workers are other processes and keep the real ones).
DRIVER_NEVER_CALLS = ("training_rows", "validation_rows", "feature_rows", "caption_rows", "join_captions", "split_rows", "_filtered", "selected_ids")

HEADS_BEST_VAL = dict(num_workers=2, batch_size=8, embed_dim=16, cpus_per_worker=0.5, shuffle_buffer=16, warmup_fraction=0.0,
                      method="heads", lr=0.3, keep_epoch="best-val", checkpoints_to_keep=1, read_block_rows=5)


def _refuse(*a, **k):
    raise AssertionError("the driver read training rows")


@pytest.fixture(scope="session")
def heads_best_val(ray_session, tmp_path_factory):
    """The two runs (epochs 2, then 4 in the same run directory) as records: the stage result,
    train_meta.json, the epoch in final/heads.safetensors, the final model, whether final/ holds a
    text adapter, and the final model's validation mR scored again in the test process."""
    from rsdist.config import EvalConfig, TrainConfig
    from rsdist.core import rows as data
    from rsdist.core.rundir import RunDir
    from rsdist.eval.stage import evaluate_model
    from rsdist.models.text_cache import frozen_text_features
    from rsdist.models.tuned import load_heads, load_trained
    from rsdist.train import stage as train
    from tests.train.runs import make_run

    run = RunDir(str(tmp_path_factory.mktemp("heads_best_val") / "run"))
    make_run(run, n_train=40, n_test=8, select=32, n_val=12)
    records = []
    for epochs in (2, 4):
        cfg = TrainConfig(epochs=epochs, **HEADS_BEST_VAL)
        with pytest.MonkeyPatch.context() as mp:
            for name in DRIVER_NEVER_CALLS:
                mp.setattr(data, name, _refuse)
            result = train.run(run, cfg)
        final = run.path("checkpoints", "final")
        model = load_trained("tiny", 16, final)
        val = data.join_captions(run, data.feature_rows(run, split="val"))
        rescored = evaluate_model(model, val, [], EvalConfig(), frozen_text_features("tiny", 0, cfg.max_text_tokens))["mR"]
        records.append(SimpleNamespace(result=result, meta=run.read_json("checkpoints", "final", "train_meta.json"), heads_epoch=load_heads(final)[1]["epoch"],
                                       model=model, has_adapter=run.exists("checkpoints", "final", "text_adapter"), rescored_mR=rescored))
    return SimpleNamespace(run=run, first=records[0], resumed=records[1])
