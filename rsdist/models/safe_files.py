"""Reading and writing what a run directory, a checkpoint or a model folder holds, without ever
running code from it.

Tensors live in safetensors files (a JSON header and raw bytes), metadata in JSON. The one torch
file rsdist still writes, an optimizer's state (`save_torch_state`), is read back with
`torch.load(weights_only=True)`, which accepts tensors, numbers, strings and containers and refuses
any other pickled object before it is built. A file that does not hold what its name says is refused
with CheckpointError naming it (one line: `<file>: ...`), so the command line ends with
`rsdist: error: <file>: ...` and nothing in the file is executed.
"""

from __future__ import annotations

import json
import os

import torch


class CheckpointError(ValueError):
    """A file of a run directory, checkpoint or model folder is not what rsdist wrote there."""


def save_tensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict | None = None) -> None:
    """`tensors` (contiguous CPU copies) as a safetensors file; `metadata` (JSON-able) in its header."""
    from safetensors.torch import save_file

    plain = {k: v.detach().to("cpu").clone().contiguous() for k, v in tensors.items()}  # clone: no shared storage
    save_file(plain, path, metadata=None if metadata is None else {"rsdist": json.dumps(metadata)})


def load_tensors(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (CPU)."""
    return load_tensors_and_metadata(path)[0]


def load_tensors_and_metadata(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a file written by `save_tensors`; CheckpointError when it is not one."""
    from safetensors import SafetensorError, safe_open

    if not os.path.exists(path):
        raise CheckpointError(f"{path}: missing")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            raw = (f.metadata() or {}).get("rsdist")
        return tensors, (json.loads(raw) if raw else {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a safetensors file ({_first_line(e)}); refused") from None


def save_torch_state(state: dict, path: str) -> None:
    """An optimizer's state dict (tensors, numbers and containers only) as a torch file."""
    torch.save(state, path)


def load_torch_state(path: str) -> dict:
    """A torch file of tensors, numbers, strings and containers; any other pickled object is refused
    (`weights_only=True`: it is never constructed)."""
    import pickle

    if not os.path.exists(path):
        raise CheckpointError(f"{path}: missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, AttributeError, ImportError) as e:
        raise CheckpointError(f"{path}: refused: not a plain torch state file (it may hold code; {_first_line(e)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: refused: holds a {type(state).__name__}, not a state dict")
    return state


def read_json_file(path: str) -> dict:
    """A JSON object from a local file; CheckpointError when the file is not one."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: missing")
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a JSON file ({_first_line(e)}); refused") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(value).__name__}, not an object")
    return value


def check_adapter_folder(folder: str) -> None:
    """A peft adapter folder rsdist wrote: `adapter_config.json` and `adapter_model.safetensors`
    (peft would fall back to a pickled `adapter_model.bin`; rsdist never writes one)."""
    read_json_file(os.path.join(folder, "adapter_config.json"))
    weights = os.path.join(folder, "adapter_model.safetensors")
    if not os.path.exists(weights):
        raise CheckpointError(f"{weights}: missing (rsdist reads adapter weights from safetensors only)")
    load_tensors(weights)


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:200]
