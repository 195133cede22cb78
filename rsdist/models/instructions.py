"""The instruction pool: any canonical row as a conversation, with the prompts evaluation uses.

One pool mixes GeoChat / LLaVA instruction JSON (rows with `conversations`, kept verbatim), RSVQA
(task 'vqa': the question with the short-answer prompt, the answer), scene folders (a `label`:
GeoChat's classification prompt with the pool's class list, the class in words) and captions
(task 'caption': "Describe the image.", the first caption). A caption row that also has a label
(RSICD-style class folders) becomes both turns. Evaluation by generation asks the same prompts,
so what the tuned model is scored on is what it was tuned to answer.
"""

from __future__ import annotations

import json

from rsdist.core.schema import readable_label

IMAGE = "<image>"
SCENE_PROMPT = "Classify the image from the following classes. Answer in one word or a short phrase."
VQA_PROMPT = "Answer the question using a single word or phrase."
CAPTION_PROMPT = "Describe the image."


def scene_prompt(classes: list[str]) -> str:
    return f"{SCENE_PROMPT}\nClasses: {', '.join(classes)}."


def vqa_prompt(question: str) -> str:
    return f"{question}\n{VQA_PROMPT}"


def question_type(meta: str | None) -> str | None:
    """`question_type` of a row's meta JSON (RSVQA rows carry one), or None."""
    try:
        return json.loads(meta or "{}").get("question_type")
    except json.JSONDecodeError:
        return None


def _turn(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def row_turns(row: dict, classes: list[str] | None = None) -> list[dict]:
    """The row as [{from, value}] turns; the first human turn carries the `<image>` placeholder.

    `classes`: the pool's scene classes in words (the prompt of a labelled row's classification
    turn); without them a labelled row lists its own class only.
    """
    turns = row.get("conversations") or []
    if turns:
        return turns
    out: list[dict] = []
    if row.get("task") == "vqa" and row.get("text") and row.get("answer"):
        out += _turn(vqa_prompt(row["text"]), row["answer"])
    else:
        if row.get("label"):
            out += _turn(scene_prompt(list(classes or [readable_label(row["label"])])), readable_label(row["label"]))
        caption = next((c for c in row.get("captions") or [] if c), None)
        if row.get("task") != "classification" and caption:
            out += _turn(CAPTION_PROMPT, caption)
        elif not out and row.get("answer"):
            out += _turn(row.get("text") or CAPTION_PROMPT, row["answer"])
    if not out:
        raise ValueError(f"sample {row.get('sample_id')}: no conversations, answer, label or caption to train on")
    out[0] = {"from": "human", "value": f"{IMAGE}\n{out[0]['value']}"}
    return out


def pool_classes(run) -> list[str]:
    """The distinct labels of the run's shards (every split), in words and sorted: the class list
    of the classification prompt, the same for training and evaluation. Reads the label column only."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    labels: set[str] = set()
    for path in run.parquet_files("shards"):
        with run.fs.open(path, "rb") as f:
            column = pq.read_table(f, columns=["label"]).column("label")
        labels.update(v for v in pc.unique(column).to_pylist() if v)
    return sorted({readable_label(v) for v in labels})
