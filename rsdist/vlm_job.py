"""Settings of `rsdist vlm`: the train.vlm / eval.vlm / ray sections of its YAML, with overrides."""

from __future__ import annotations

from dataclasses import dataclass, field

from rsdist.config import RayConfig, _build, _help, apply_sets, load_yaml
from rsdist.eval.vlm import VlmEvalConfig
from rsdist.train.vlm import VlmTrainConfig


@dataclass
class VlmTrainSection:
    vlm: VlmTrainConfig = _help("VLM instruction LoRA settings.", default_factory=VlmTrainConfig)


@dataclass
class VlmEvalSection:
    vlm: VlmEvalConfig = _help("VLM evaluation-by-generation settings.", default_factory=VlmEvalConfig)


@dataclass
class VlmJobConfig:
    train: VlmTrainSection = _help("train.vlm: instruction LoRA.", default_factory=VlmTrainSection)
    eval: VlmEvalSection = _help("eval.vlm: evaluation by generation.", default_factory=VlmEvalSection)
    ray: RayConfig = field(default_factory=RayConfig, metadata={"help": "Ray cluster to join or start."})


def load_job(path: str | None, sets: list[str], task: str | None) -> VlmJobConfig:
    """YAML (or defaults) + `--task` + `--set` overrides, validated once."""
    values = load_yaml(path) if path else {}
    apply_sets(values, ([f"eval.vlm.task={task}"] if task else []) + list(sets), form="section.vlm.field=value")
    return _build(VlmJobConfig, values, "")
