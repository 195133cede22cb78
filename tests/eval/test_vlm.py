"""VLM evaluation by generation end to end with tiny random models: rows -> prompts -> batched
greedy generation (in-process and on a Ray Data actor pool) -> metrics JSON + predictions."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from rsdist.config import ConfigError
from rsdist.eval.vlm import SCENE_PROMPT, VQA_PROMPT, VlmEvalConfig, eval_rows, generate_answers, run_vlm_eval, task_inputs
from rsdist.core.schema import CANONICAL_SCHEMA, empty_row, make_sample_id
from rsdist.train.vlm import VlmTrainConfig, apply_lora
from rsdist.models.vlm import load_vlm
from tests.train.test_vlm import png

LABELS = ["Airport", "DenseResidential", "Forest", "Airport", "Forest"]
VQA = [("Is there a road?", "yes", "presence"), ("How many buildings are there?", "3", "count"), ("Is it rural or urban?", "rural", "rural_urban"),
       ("Is there water?", "no", "presence")]


def make_eval_run(run) -> None:
    """Test-split scene rows (labels) and VQA rows (question types in meta), plus train rows that must be ignored."""
    rows = []
    for i, label in enumerate(LABELS):
        row = empty_row()
        row.update(sample_id=make_sample_id("constructed", f"scene{i}"), image=png(40, 30, seed=i), image_format="png", task="classification",
                   text=label, label=label, split="test", source="constructed")
        rows.append(row)
    for i, (question, answer, qtype) in enumerate(VQA):
        row = empty_row()
        row.update(sample_id=make_sample_id("constructed", f"vqa{i}"), image=png(36, 36, seed=10 + i) if i != 3 else b"", image_format="png", task="vqa",
                   text=question, answer=answer, split="test", source="constructed", meta=json.dumps({"question_type": qtype}))
        rows.append(row)
    train = empty_row()
    train.update(sample_id=make_sample_id("constructed", "train0"), image=png(30, 30), task="classification", text="x", label="Desert", split="train")
    rows.append(train)
    run.write_table(pa.Table.from_pylist(rows, schema=CANONICAL_SCHEMA), "shards", "part-00000.parquet")


def save_adapter(run, model_name: str, seed: int) -> None:
    """A LoRA adapter + train_meta.json where VLM training puts them (what run_vlm writes)."""
    base, _ = load_vlm(model_name, seed=seed)
    peft_model = apply_lora(base, VlmTrainConfig(model=model_name))
    folder = run.makedirs("checkpoints", "vlm", "final", "adapter")
    peft_model.save_pretrained(folder)
    run.write_json({"settings": {"model": model_name, "seed": seed}}, "checkpoints", "vlm", "final", "train_meta.json")


def test_rows_and_prompts(run_dir):
    make_eval_run(run_dir)
    scene = eval_rows(run_dir, VlmEvalConfig(task="scene"))
    assert scene.num_rows == 5  # the train row with a label is not evaluated
    inputs, scoring = task_inputs(scene, VlmEvalConfig(task="scene"))
    assert scoring["classes"] == ["airport", "dense residential", "forest"]
    assert inputs.column("prompt")[0].as_py() == f"{SCENE_PROMPT}\nClasses: airport, dense residential, forest."
    vqa = eval_rows(run_dir, VlmEvalConfig(task="vqa", max_rows=3))
    inputs, scoring = task_inputs(vqa, VlmEvalConfig(task="vqa"))
    assert vqa.num_rows == 3 and all(p.as_py().endswith("\n" + VQA_PROMPT) for p in inputs.column("prompt"))
    assert set(scoring["types"]) <= {"presence", "count", "rural_urban"}
    with pytest.raises(ConfigError, match="eval.vlm.task: 'caption' is not one of: scene, vqa"):
        VlmEvalConfig(task="caption")


@pytest.mark.parametrize("name", ["qwen2-vl-tiny", "llava-tiny", "idefics3-tiny"])
def test_batched_generation_matches_one_by_one(name):
    """Left padding: an answer does not depend on what else is in the batch."""
    from PIL import Image
    import io

    model, processor = load_vlm(name, seed=0)
    model.eval()
    images = [Image.open(io.BytesIO(png(40, 30, seed=1))).convert("RGB"), None]
    prompts = [f"{SCENE_PROMPT}\nClasses: airport, forest.", "Is there a road?\n" + VQA_PROMPT]
    together = generate_answers(model, processor, images, prompts, max_new_tokens=4)
    alone = [generate_answers(model, processor, [im], [p], max_new_tokens=4)[0] for im, p in zip(images, prompts)]
    assert together == alone and all(isinstance(a, str) for a in together)


def test_scene_and_vqa_end_to_end_with_the_trained_adapter(run_dir):
    make_eval_run(run_dir)
    save_adapter(run_dir, "llava-tiny", seed=3)
    scene = run_vlm_eval(run_dir, VlmEvalConfig(task="scene", num_actors=0, batch_size=2, max_new_tokens=3, max_pixels=40 * 40))
    saved = run_dir.read_json("eval", "vlm_scene.json")
    assert saved == json.loads(json.dumps(scene))
    assert saved["model"] == "llava-tiny" and saved["seed"] == 3 and saved["adapter"].endswith("adapter") and saved["rows"] == 5
    m = saved["metrics"]
    assert m["count"] == 5 and sorted(m["per_class"]) == ["airport", "dense residential", "forest"]
    assert [m["per_class"][c]["count"] for c in ("airport", "dense residential", "forest")] == [2, 1, 2]
    assert m["correct"] == sum(v["correct"] for v in m["per_class"].values()) and 0 <= m["accuracy"] <= 1
    assert saved["settings"]["batch_size"] == 2 and saved["classes"] == ["airport", "dense residential", "forest"]
    preds = run_dir.read_table("eval", "vlm_scene_predictions.parquet")
    assert preds.num_rows == 5 and sum(preds.column("correct").to_pylist()) == m["correct"]

    vqa = run_vlm_eval(run_dir, VlmEvalConfig(task="vqa", num_actors=0, batch_size=3, max_new_tokens=3, max_pixels=40 * 40))
    assert vqa["metrics"]["count"] == 4 and {t: v["count"] for t, v in vqa["metrics"]["per_type"].items()} == {"count": 1, "presence": 2, "rural_urban": 1}
    assert run_dir.exists("eval", "vlm_vqa.json")


def test_generation_on_a_ray_actor_pool(ray_session, run_dir):
    make_eval_run(run_dir)
    cfg = dict(task="vqa", model="qwen2-vl-tiny", adapter=False, batch_size=2, max_new_tokens=3, max_pixels=56 * 56, cpus_per_actor=0.5)
    on_ray = run_vlm_eval(run_dir, VlmEvalConfig(**cfg, num_actors=1))
    ray_preds = run_dir.read_table("eval", "vlm_vqa_predictions.parquet").column("prediction").to_pylist()
    local = run_vlm_eval(run_dir, VlmEvalConfig(**cfg, num_actors=0))
    local_preds = run_dir.read_table("eval", "vlm_vqa_predictions.parquet").column("prediction").to_pylist()
    assert on_ray["rows"] == 4 and on_ray["adapter"] is None
    assert ray_preds == local_preds and on_ray["metrics"] == local["metrics"]  # same model, same greedy answers, same order


def test_adapter_is_required_unless_turned_off(run_dir):
    make_eval_run(run_dir)
    with pytest.raises(FileNotFoundError, match="no trained VLM adapter"):
        run_vlm_eval(run_dir, VlmEvalConfig(task="scene", num_actors=0))


def test_cli_vlm_eval_writes_the_results(run_dir, tmp_path, capsys):
    from rsdist.cli import main

    make_eval_run(run_dir)
    config = tmp_path / "vlm.yaml"
    config.write_text("eval:\n  vlm: {model: idefics3-tiny, adapter: false, num_actors: 0, max_new_tokens: 2, batch_size: 4}\n")
    assert main(["vlm", "eval", str(config), "--out", str(tmp_path / "run"), "--task", "vqa", "--set", "eval.vlm.max_rows=2"]) == 0
    printed = json.loads(capsys.readouterr().out.splitlines()[0])
    assert printed["task"] == "vqa" and printed["rows"] == 2
    saved = run_dir.read_json("eval", "vlm_vqa.json")
    assert saved["settings"]["max_rows"] == 2 and saved["model"] == "idefics3-tiny" and saved["metrics"]["count"] == 2
    assert main(["vlm", "eval", "--out", str(tmp_path / "run"), "--set", "eval.vlm.task=caption"]) == 2
    assert capsys.readouterr().err.strip() == "rsdist: error: eval.vlm.task: 'caption' is not one of: scene, vqa"
