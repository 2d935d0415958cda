"""Turning ``normkit audit``'s TARGET into something to audit: a factory, a checkpoint, a
safetensors file, a Hugging Face directory or an ONNX file.  Every failure is a ``TargetError``
with a one-line message (the command prints it and exits with code 2)."""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..audit._onnx_file import TargetError, error_line


@dataclass
class Target:
    kind: str  # factory | hf | checkpoint | safetensors | onnx
    name: str
    model: torch.nn.Module | None = None
    example_inputs: Any = None
    state_dict: dict[str, torch.Tensor] | None = None
    onnx_path: str | None = None
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)


_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def load_factory(spec: str) -> tuple[torch.nn.Module, Any]:
    """Call ``package.module:function``; it returns a model or (model, example_inputs)."""
    if not _FACTORY.match(spec):
        raise TargetError(f"{spec!r} is not a factory; expected package.module:function")
    mod_name, fn_name = spec.split(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: modules next to the user resolve
    try:
        mod = importlib.import_module(mod_name)
    except Exception as e:
        raise TargetError(f"cannot import {mod_name!r}: {type(e).__name__}: {e}") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise TargetError(f"{mod_name!r} has no callable {fn_name!r}")
    try:
        result = fn()
    except Exception as e:
        raise TargetError(f"{spec}() raised {type(e).__name__}: {e}") from None
    inputs = None
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module):
        result, inputs = result
    if not isinstance(result, torch.nn.Module):
        raise TargetError(f"{spec}() returned {type(result).__name__}, not a torch.nn.Module")
    return result, inputs


def _tensor_dict(obj: Any, path: str) -> dict[str, torch.Tensor]:
    """The state_dict inside a loaded checkpoint (bare, or under "state_dict"/"model")."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise TargetError(f"{path} holds no state_dict (a dict of tensors)")


def load_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """A torch checkpoint, loaded with ``weights_only=True`` (never unpickles code)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        text = str(e)
        if "weights_only" in text or "Unpickler" in text or "GLOBAL" in text:
            raise TargetError(
                f"{path} is not a plain state_dict (it pickles Python objects, e.g. a whole "
                "model); normkit loads checkpoints only with weights_only=True: save "
                "model.state_dict() instead") from None
        raise TargetError(f"cannot read {path} as a torch checkpoint: {error_line(e)}") from None
    return _tensor_dict(obj, path)


def load_safetensors(path: str) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise TargetError('reading .safetensors needs safetensors: pip install "normkit[hf]"') \
            from None
    try:
        return load_file(path)
    except Exception as e:
        raise TargetError(f"cannot read {path} as safetensors: {error_line(e)}") from None


def load_hf_dir(path: str) -> Target:
    """A Hugging Face model directory, offline: the class named in config.json's
    ``architectures`` (else AutoModel), weights from safetensors or .bin (transformers reads
    .bin with weights_only=True)."""
    try:
        import transformers
    except ImportError:
        raise TargetError('a Hugging Face directory needs transformers: pip install '
                          '"normkit[hf]"') from None
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            arch = (json.load(f).get("architectures") or [None])[0]
    except (OSError, ValueError) as e:
        raise TargetError(f"cannot read {path}/config.json: {e}") from None
    cls = getattr(transformers, arch, None) if arch else None
    cls = cls or transformers.AutoModel
    try:
        model, info = cls.from_pretrained(path, local_files_only=True, output_loading_info=True)
    except Exception as e:
        raise TargetError(f"cannot load the Hugging Face model in {path}: {error_line(e)}") \
            from None
    return Target("hf", path, model=model.eval(), missing_keys=list(info.get("missing_keys", [])),
                  unexpected_keys=list(info.get("unexpected_keys", [])))


def load_target(spec: str, model_factory: str | None = None) -> Target:
    """Resolve a CLI TARGET (see module docstring).  ``model_factory`` supplies the
    architecture for a bare checkpoint."""
    p = Path(spec)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise TargetError(f"{spec} is a directory without config.json (not a Hugging Face "
                              "model directory)")
        return load_hf_dir(spec)
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix == ".onnx":
            return Target("onnx", spec, onnx_path=spec)
        if suffix == ".safetensors":
            sd, kind = load_safetensors(spec), "safetensors"
        elif suffix in _CHECKPOINT_SUFFIXES:
            sd, kind = load_checkpoint(spec), "checkpoint"
        else:
            raise TargetError(f"{spec}: unknown file type {suffix or '(none)'}; expected .pt, "
                              ".pth, .bin, .ckpt, .safetensors or .onnx")
        target = Target(kind, spec, state_dict=sd)
        if model_factory:
            target.model, target.example_inputs = load_factory(model_factory)
        return target
    if _FACTORY.match(spec):
        model, inputs = load_factory(spec)
        return Target("factory", spec, model=model, example_inputs=inputs)
    raise TargetError(f"{spec}: no such file or directory, and not a package.module:function "
                      "factory")
