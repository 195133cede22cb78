"""Pure metric functions of VLM evaluation by generation: answer normalisation, matching a free
answer to a class list, scene-classification accuracy (overall and per class) and VQA accuracy
(normalised exact match, per question type and the average over types)."""

from __future__ import annotations

import re
from collections import defaultdict

TASKS = ("scene", "vqa")  # what VLM evaluation by generation scores
ARTICLES = {"a", "an", "the"}
NUMBER_WORDS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
UNMATCHED = None


def normalize_answer(text: str | None) -> str:
    """'The Dense_Residential area.' -> 'dense residential area': camelCase and underscores/hyphens to
    words, lowercase, punctuation removed, articles dropped, number words as digits, spaces collapsed."""
    text = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", text or "")
    text = re.sub(r"[_\-/]+", " ", text).lower()
    text = re.sub(r"[^\w\s]", " ", text)
    words = [NUMBER_WORDS.get(w, w) for w in text.split() if w not in ARTICLES]
    return " ".join(words)


def match_class(answer: str | None, classes: list[str]) -> str | None:
    """The class `answer` names, or None: first an exact normalised match (spaces ignored, so
    'baseballfield' is 'baseball field'), else the longest class found as whole words in the answer."""
    said = normalize_answer(answer)
    if not said:
        return UNMATCHED
    keys = {c: normalize_answer(c) for c in classes}
    for c, key in keys.items():
        if key.replace(" ", "") == said.replace(" ", ""):
            return c
    padded = f" {said} "
    found = [c for c, key in keys.items() if key and f" {key} " in padded]
    return max(found, key=lambda c: len(keys[c])) if found else UNMATCHED


def classification_metrics(answers: list[str], targets: list[str], classes: list[str]) -> dict:
    """Accuracy of free answers against target classes, overall and per target class; answers that
    name no class count as wrong (and are counted in `unmatched`)."""
    if len(answers) != len(targets):
        raise ValueError(f"classification_metrics: {len(answers)} answers for {len(targets)} targets")
    unknown = sorted(set(targets) - set(classes))
    if unknown:
        raise ValueError(f"classification_metrics: target class(es) {', '.join(unknown)} not in the class list")
    correct, count, unmatched = defaultdict(int), defaultdict(int), 0
    for answer, target in zip(answers, targets):
        predicted = match_class(answer, classes)
        unmatched += predicted is UNMATCHED
        count[target] += 1
        correct[target] += predicted == target
    per_class = {c: {"accuracy": correct[c] / count[c], "correct": correct[c], "count": count[c]} for c in sorted(count)}
    total = sum(count.values())
    return {"accuracy": sum(correct.values()) / total if total else 0.0, "correct": sum(correct.values()), "count": total,
            "unmatched": unmatched, "mean_class_accuracy": sum(v["accuracy"] for v in per_class.values()) / len(per_class) if per_class else 0.0,
            "per_class": per_class}


def vqa_matches(answers: list[str], targets: list[str]) -> list[bool]:
    """Per row: does the answer equal the target after normalisation (normalised exact match)."""
    if len(answers) != len(targets):
        raise ValueError(f"vqa_matches: {len(answers)} answers and {len(targets)} targets must be as many")
    return [normalize_answer(a) == normalize_answer(t) for a, t in zip(answers, targets)]


def vqa_metrics(matches: list[bool], types: list[str | None]) -> dict:
    """Accuracy of the rows' matches (`vqa_matches`) overall and per question type, and the
    average over types (how RSVQA reports it); rows without a type count under 'all'."""
    if len(matches) != len(types):
        raise ValueError(f"vqa_metrics: {len(matches)} matches and {len(types)} types must be as many")
    correct, count = defaultdict(int), defaultdict(int)
    for match, qtype in zip(matches, types):
        kind = qtype or "all"
        count[kind] += 1
        correct[kind] += bool(match)
    per_type = {t: {"accuracy": correct[t] / count[t], "correct": correct[t], "count": count[t]} for t in sorted(count)}
    total = sum(count.values())
    return {"accuracy": sum(correct.values()) / total if total else 0.0, "correct": sum(correct.values()), "count": total,
            "average_over_types": sum(v["accuracy"] for v in per_type.values()) / len(per_type) if per_type else 0.0,
            "per_type": per_type}
