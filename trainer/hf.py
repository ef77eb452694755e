"""Optional: train a Hugging Face causal LM that is already on this machine's disk.

`transformers` is not a dependency of shoal. This module never downloads anything: every
load uses `local_files_only=True` and refuses repository code (`trust_remote_code=False`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


class HuggingFaceUnavailableError(RuntimeError):
    """`transformers` is not installed, or the model folder cannot be used."""


@dataclass
class HuggingFaceModel:
    """A local causal LM and its tokenizer. `model(tokens)` gives logits (B, T, vocab)."""

    model: nn.Module
    tokenizer: Any
    path: Path


class CausalLMLogits(nn.Module):
    """Wraps a transformers causal LM so it maps tokens (B, T) to logits like shoal's models."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.inner(input_ids=tokens.long()).logits
        return logits


def _import_transformers() -> Any:
    try:
        return importlib.import_module("transformers")
    except ImportError as exc:
        raise HuggingFaceUnavailableError(
            "loading a Hugging Face model needs the 'transformers' package, which is not "
            "installed: run `pip install transformers` in shoal's environment, or use one of "
            "shoal's built-in model sizes (tiny, small, base, 350m)"
        ) from exc


def load_local_causal_lm(
    path: str | Path, *, device: torch.device | str = "cpu"
) -> HuggingFaceModel:
    """Load the causal LM + tokenizer saved in folder `path` (as by `save_pretrained`).

    Raises `HuggingFaceUnavailableError` with what to do when transformers is missing or
    the folder is not a usable model folder. Never touches the network.
    """
    transformers = _import_transformers()
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise HuggingFaceUnavailableError(
            f"{str(folder)!r} is not a Hugging Face model folder (no config.json); pass the "
            "folder that save_pretrained() wrote, already on this machine"
        )
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            folder, local_files_only=True, trust_remote_code=False
        )
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, local_files_only=True, trust_remote_code=False
        )
    except (OSError, ValueError) as exc:
        raise HuggingFaceUnavailableError(f"cannot load the model in {folder}: {exc}") from exc
    return HuggingFaceModel(
        model=CausalLMLogits(model).to(torch.device(device)), tokenizer=tokenizer, path=folder
    )
