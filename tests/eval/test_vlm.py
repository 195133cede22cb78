"""VLM evaluation by generation end to end with tiny random models: rows -> prompts -> batched
greedy generation (in-process and on a Ray Data actor pool) -> metrics of the tuned and the
untuned model (the eval stage with train.model=vlm) + predictions."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from rsdist.config import ConfigError, EvalConfig
from rsdist.eval import vlm_stage
from rsdist.eval.vlm import CAPTION_PROMPT, SCENE_PROMPT, VQA_PROMPT, VlmEvalConfig, eval_rows, evaluate_model, generate_answers, task_inputs
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
    for i in range(2):
        row = empty_row()
        row.update(sample_id=make_sample_id("constructed", f"cap{i}"), image=png(32, 32, seed=20 + i), image_format="png", task="caption",
                   text="a forest", captions=["a dense forest with trees", "many trees in a forest"], split="test", source="constructed")
        rows.append(row)
    train = empty_row()
    train.update(sample_id=make_sample_id("constructed", "train0"), image=png(30, 30), task="classification", text="x", label="Desert", split="train")
    rows.append(train)
    run.write_table(pa.Table.from_pylist(rows, schema=CANONICAL_SCHEMA), "shards", "part-00000.parquet")


def save_adapter(run, model_name: str, seed: int) -> None:
    """A LoRA adapter + train_meta.json where VLM training puts them (what run_vlm writes)."""
    base, _ = load_vlm(model_name, seed=seed)
    peft_model = apply_lora(base, VlmTrainConfig(model=model_name))
    folder = run.makedirs("vlm_checkpoints", "final", "adapter")
    peft_model.save_pretrained(folder)
    run.write_json({"settings": {"model": model_name, "seed": seed}}, "vlm_checkpoints", "final", "train_meta.json")


def test_rows_and_prompts(run_dir):
    make_eval_run(run_dir)
    scene = eval_rows(run_dir, "scene", VlmEvalConfig())
    assert scene.num_rows == 5  # the train row with a label is not evaluated
    inputs, scoring = task_inputs(scene, "scene", ["desert"])  # the pool's classes, and every target's
    assert scoring["classes"] == ["airport", "dense residential", "desert", "forest"]
    assert inputs.column("prompt")[0].as_py() == f"{SCENE_PROMPT}\nClasses: airport, dense residential, desert, forest."
    vqa = eval_rows(run_dir, "vqa", VlmEvalConfig(max_rows=3))
    inputs, scoring = task_inputs(vqa, "vqa", [])
    assert vqa.num_rows == 3 and all(p.as_py().endswith("\n" + VQA_PROMPT) for p in inputs.column("prompt"))
    assert set(scoring["types"]) <= {"presence", "count", "rural_urban"}
    caption = eval_rows(run_dir, "caption", VlmEvalConfig())
    inputs, scoring = task_inputs(caption, "caption", [])
    assert caption.num_rows == 2 and inputs.column("prompt").to_pylist() == [CAPTION_PROMPT] * 2 and len(scoring["references"][0]) == 2
    with pytest.raises(ConfigError, match="eval.vlm.tasks: 'ocr' is not one of: scene, vqa, caption"):
        VlmEvalConfig(tasks=["ocr"])


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


def test_the_eval_stage_scores_tuned_and_untuned_on_every_task(run_dir):
    make_eval_run(run_dir)
    save_adapter(run_dir, "llava-tiny", seed=3)
    cfg = EvalConfig(vlm=VlmEvalConfig(num_actors=0, batch_size=3, max_new_tokens=3, caption_new_tokens=4, max_pixels=40 * 40))
    result = vlm_stage.run(run_dir, cfg)
    saved = run_dir.read_json("vlm_eval", "metrics.json")
    assert result.rows_out == 5 + 4 + 2 and result.extra["tasks"] == ["caption", "scene", "vqa"]
    assert saved["model"] == "llava-tiny" and saved["seed"] == 3 and saved["adapter"].endswith("adapter")
    for which in ("tuned", "untuned"):
        m = saved[which]["scene"]["metrics"]
        assert m["count"] == 5 and sorted(m["per_class"]) == ["airport", "dense residential", "forest"]
        assert m["correct"] == sum(v["correct"] for v in m["per_class"].values()) and 0 <= m["accuracy"] <= 1
        assert saved[which]["scene"]["classes"] == ["airport", "dense residential", "desert", "forest"]  # the pool's, the train row's desert too
        assert {t: v["count"] for t, v in saved[which]["vqa"]["metrics"]["per_type"].items()} == {"count": 1, "presence": 2, "rural_urban": 1}
        assert saved[which]["caption"]["metrics"]["count"] == 2 and 0 <= saved[which]["caption"]["metrics"]["bleu4"] <= 1
        preds = run_dir.read_table("vlm_eval", f"{which}_scene_predictions.parquet")
        assert preds.num_rows == 5 and sum(preds.column("correct").to_pylist()) == m["correct"]
    flat = result.extra["metrics"]
    assert {"scene_accuracy", "vqa_accuracy", "vqa_presence_accuracy", "caption_bleu4", "caption_rouge_l", "untuned_scene_accuracy", "untuned_vqa_count_accuracy"} <= set(flat)
    assert flat == saved["flat"]


def test_generation_on_a_ray_actor_pool(ray_session, run_dir):
    make_eval_run(run_dir)
    cfg = dict(tasks=["vqa"], batch_size=2, max_new_tokens=3, max_pixels=56 * 56, cpus_per_actor=0.5)
    on_ray = evaluate_model(run_dir, VlmEvalConfig(**cfg, num_actors=1), "qwen2-vl-tiny", 0, None, [], "untuned")
    ray_preds = run_dir.read_table("vlm_eval", "untuned_vqa_predictions.parquet").column("prediction").to_pylist()
    local = evaluate_model(run_dir, VlmEvalConfig(**cfg, num_actors=0), "qwen2-vl-tiny", 0, None, [], "untuned")
    local_preds = run_dir.read_table("vlm_eval", "untuned_vqa_predictions.parquet").column("prediction").to_pylist()
    assert on_ray["vqa"]["rows"] == 4
    assert ray_preds == local_preds and on_ray["vqa"]["metrics"] == local["vqa"]["metrics"]  # same model, same greedy answers, same order


def test_a_trained_adapter_is_required(run_dir):
    make_eval_run(run_dir)
    with pytest.raises(FileNotFoundError, match="no trained VLM adapter; run the train stage with train.model=vlm first"):
        vlm_stage.run(run_dir, EvalConfig(vlm=VlmEvalConfig(num_actors=0)))
