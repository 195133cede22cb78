"""Settings of `rsdist vlm`: the train.vlm / eval.vlm / ray sections of its YAML, with overrides."""

from __future__ import annotations

from dataclasses import dataclass, field

import yaml

from rsdist.config import ConfigError, RayConfig, _build, _help, apply_sets
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
    import fsspec

    values: dict = {}
    if path:
        with fsspec.open(path, "r") as f:
            try:
                values = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: not valid YAML: {e}".splitlines()[0]) from None
    apply_sets(values, ([f"eval.vlm.task={task}"] if task else []) + list(sets), form="section.vlm.field=value")
    return _build(VlmJobConfig, values, "")
