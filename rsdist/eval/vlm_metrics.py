"""Pure metric functions of VLM evaluation by generation: answer normalisation, matching a free
answer to a class list, scene-classification accuracy (overall and per class) and VQA accuracy
(normalised exact match, per question type and the average over types) and captioning (corpus
BLEU-4 with the brevity penalty, mean ROUGE-L F, against all references of each image)."""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict

from rsdist.config import VLM_EVAL_TASKS as TASKS  # what VLM evaluation by generation scores
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


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def corpus_bleu(candidates: list[str], references: list[list[str]], max_n: int = 4) -> float:
    """Corpus BLEU (Papineni et al. 2002) in [0, 1] on normalised words: clipped n-gram precisions
    for n = 1..max_n pooled over the corpus, their geometric mean, times the brevity penalty (the
    reference length closest to each candidate's). 0 when some order has no match."""
    matched, total = [0] * max_n, [0] * max_n
    length, ref_length = 0, 0
    for candidate, refs in zip(candidates, references):
        words = normalize_answer(candidate).split()
        ref_words = [normalize_answer(r).split() for r in refs]
        length += len(words)
        ref_length += min((abs(len(r) - len(words)), len(r)) for r in ref_words)[1] if ref_words else 0
        for n in range(1, max_n + 1):
            counts = _ngrams(words, n)
            best: Counter = Counter()
            for r in ref_words:
                best |= _ngrams(r, n)
            matched[n - 1] += sum(min(c, best[g]) for g, c in counts.items())
            total[n - 1] += max(len(words) - n + 1, 0)
    if min(matched) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matched, total)) / max_n
    brevity = 1.0 if length > ref_length else math.exp(1 - ref_length / max(length, 1))
    return brevity * math.exp(log_precision)


def _lcs(a: list[str], b: list[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        previous = 0
        for j, y in enumerate(b, 1):
            previous, row[j] = row[j], previous + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(candidate: str, references: list[str], beta: float = 1.2) -> float:
    """ROUGE-L F (Lin 2004, beta 1.2 as in the COCO caption toolkit) of one candidate: the longest
    common subsequence's precision and recall with each reference, the best reference's F."""
    words = normalize_answer(candidate).split()
    best = 0.0
    for ref in references:
        ref_words = normalize_answer(ref).split()
        common = _lcs(words, ref_words)
        if common == 0:
            continue
        precision, recall = common / len(words), common / len(ref_words)
        best = max(best, (1 + beta ** 2) * precision * recall / (recall + beta ** 2 * precision))
    return best


def caption_metrics(candidates: list[str], references: list[list[str]]) -> dict:
    """Captioning: corpus BLEU-4 and mean ROUGE-L F against each image's references (both in [0, 1])."""
    if len(candidates) != len(references):
        raise ValueError(f"caption_metrics: {len(candidates)} captions for {len(references)} reference lists")
    return {"bleu4": corpus_bleu(candidates, references), "rouge_l": sum(rouge_l(c, r) for c, r in zip(candidates, references)) / max(len(candidates), 1),
            "count": len(candidates)}
