"""Resolve and load the model a spec names — always offline.

A model comes from a flexc zoo name (built on first use), a local Hugging Face directory, or
a hub id that must already be in the local Hugging Face cache. The config is read first so a
missing or non-MoE model fails fast with a clear message, before any weights are loaded.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flexc.errors import ModelError
from flexc.utils.weights import (  # noqa: F401 -- checks.py reads them here
    check_safetensors, check_weight_files, read_safetensors_header)

if TYPE_CHECKING:
    from flexc.compiler.spec import ModelSpec

log = logging.getLogger("flexc")

#: Config attributes that name the number of routed experts in the MoE families transformers ships.
MOE_CONFIG_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts")
KNOWN_ZOO = ("tiny", "small")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    config: Any
    directory: Path
    family: str | None


# --------------------------------------------------------------------------- zoo


def zoo_names() -> list[str]:
    try:
        from flexc import zoo
    except ImportError:
        return list(KNOWN_ZOO)
    return [e.name for e in zoo.available()]


def _unknown_zoo(name: str) -> ModelError:
    names = zoo_names()
    close = difflib.get_close_matches(name, names, n=1)
    hint = f" — did you mean {close[0]!r}?" if close else ""
    return ModelError(f"unknown zoo model {name!r}{hint} (zoo models: {', '.join(names)}; see `flexc zoo list`)")


def check_zoo_name(name: str) -> str | None:
    """An error message if ``name`` is not a zoo model, else None."""
    if name in zoo_names():
        return None
    return str(_unknown_zoo(name))


def zoo_directory(name: str, *, progress: bool = True) -> Path:
    """The zoo model's checkpoint directory, building it first if it is not cached."""
    try:
        from flexc import zoo
    except ImportError as exc:
        raise ModelError(f"the flexc model zoo is not available in this installation ({exc})") from None
    entries = {e.name: e for e in zoo.available()}
    if name not in entries:
        raise _unknown_zoo(name)
    if not entries[name].cached:
        log.info("zoo model %r is not built yet: building it now (first use, offline)", name)
        return Path(zoo.build(name, progress=progress))
    return Path(zoo.resolve(name))


# --------------------------------------------------------------------------- hub cache


def hub_directory(repo_id: str, revision: str | None = None) -> Path:
    """The snapshot directory of ``repo_id`` in the local Hugging Face cache (never downloads)."""
    _offline()
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as exc:  # pragma: no cover - huggingface_hub ships with transformers
        raise ModelError(f"cannot read the Hugging Face cache: {exc}") from None
    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        rev = f" at revision {revision!r}" if revision else ""
        from huggingface_hub.constants import HF_HUB_CACHE

        raise ModelError(
            f"hub model {repo_id!r}{rev} is not in the local Hugging Face cache ({HF_HUB_CACHE}); flexc runs "
            "offline and never downloads — put the model there first (e.g. `hf download` on a machine with "
            "network access) or point `model: {path: ...}` at a local directory"
        ) from None


# --------------------------------------------------------------------------- resolution


def resolve_directory(spec: "ModelSpec", *, progress: bool = True) -> Path:
    """The local directory holding the spec's model (a zoo model is built if not cached); resolved
    once per spec (the checks, the execution choice and the load ask again)."""
    memo = getattr(spec, "_resolved", {})
    if "directory" not in memo:
        kind, value = spec.source
        if kind == "zoo":
            memo["directory"] = zoo_directory(value, progress=progress)
        elif kind == "hub":
            memo["directory"] = hub_directory(value, spec.revision)
        else:
            memo["directory"] = check_model_directory(Path(value))
    return memo["directory"]


def spec_device(spec: "ModelSpec") -> str:
    """The device ``spec.device`` names on this machine (:func:`resolve_device`), resolved once per spec."""
    memo = getattr(spec, "_resolved", {})
    if "device" not in memo:
        memo["device"] = resolve_device(spec.device)
    return memo["device"]


def check_model_directory(path: Path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelError(f"model directory not found: {path} (relative paths are taken from {Path.cwd()}); expected "
                         "a Hugging Face model directory (config.json, weights, tokenizer)")
    if not path.is_dir():
        raise ModelError(f"model path is not a directory: {path}; expected a Hugging Face model directory "
                         "(config.json, weights, tokenizer)")
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} is not a Hugging Face model directory: it has no config.json; expected the "
                         "folder save_pretrained wrote (config.json, weights, tokenizer)")
    return path


def resolve_argument(arg: str) -> Path:
    """A model given on the command line: an existing path, a zoo name, or a cached hub id."""
    p = Path(arg).expanduser()
    if p.exists():
        return check_model_directory(p)
    if arg in zoo_names():
        return zoo_directory(arg)
    if arg.count("/") == 1 and not arg.startswith((".", "/", "~")):  # hub ids are "org/name"
        return hub_directory(arg)
    names = zoo_names()
    close = difflib.get_close_matches(arg, names, n=1)
    hint = f" — did you mean zoo model {close[0]!r}?" if close else ""
    raise ModelError(
        f"{arg!r} is neither a model directory nor a zoo model ({', '.join(names)}) nor a cached hub id{hint}"
    )


# --------------------------------------------------------------------------- config


def _read_config_json(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read {path}: {exc}; expected the model's config (a JSON object)") from None
    if not isinstance(raw, dict):
        raise ModelError(f"{path}: expected a JSON object (a model config); found a JSON {type(raw).__name__}")
    return raw


def _moe_from_json(raw: dict[str, Any]) -> bool:
    for source in (raw, raw.get("text_config") or {}):
        for key in MOE_CONFIG_KEYS:
            value = source.get(key)
            if isinstance(value, int) and value > 1:
                return True
    return False


def check_moe_config(directory: Path) -> str | None:
    """Fail unless ``directory`` holds a supported MoE model; return its family name when known."""
    return _checked_config(directory)[1]


def _checked_config(directory: Path) -> tuple[Any, str | None]:
    """The transformers config of a supported MoE model in ``directory`` (or the raw dict), and its family."""
    raw = _read_config_json(directory)
    model_type = raw.get("model_type", "?")
    try:
        from flexc.ir.families import UnsupportedModelError, detect_family
    except ImportError:
        if not _moe_from_json(raw):
            raise ModelError(
                f"{directory} holds a {model_type!r} model, which is not a Mixture-of-Experts model "
                f"(its config has none of {', '.join(MOE_CONFIG_KEYS)}); flexc compresses MoE experts"
            ) from None
        return raw, model_type
    _offline()
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:  # transformers raises many kinds for a bad config
        raise ModelError(f"cannot load the model config in {directory}: {exc}") from None
    try:
        family = detect_family(config)
    except UnsupportedModelError as exc:
        raise ModelError(f"the model in {directory} cannot be compressed: {exc}") from None
    return config, getattr(family, "family", None) or str(family)


# --------------------------------------------------------------------------- shape (no weights)


@dataclass
class ModelShape:
    """What spec checks need to know about a model, read from its config alone."""

    intermediate_size: int  # routed experts' intermediate width
    num_experts: int
    top_k: int
    max_positions: int | None  # max_position_embeddings, when the config says
    directory: Path | None  # None for a zoo model that is not built yet
    config_file: str  # where the numbers come from, for messages
    vocab_size: int | None = None  # the LM head's outputs, when the config says


def model_shape(spec: "ModelSpec") -> ModelShape | None:
    """The shape of the spec's model from its config (a zoo recipe when not built): no weights are read.

    None when the family is not one flexc knows the config fields of.
    """
    kind, value = spec.source
    if kind == "zoo":
        from flexc import zoo

        entry = {e.name: e for e in zoo.available()}[value]
        if not entry.cached:  # not built yet: the recipe gives the config without training
            recipe = zoo.RECIPES[value]
            config = recipe.model_config()
            return ModelShape(recipe.moe_intermediate_size, recipe.num_experts, recipe.top_k,
                              config.max_position_embeddings, None, f"zoo recipe {value!r}",
                              getattr(config, "vocab_size", None))
        directory = Path(entry.path)
    else:
        directory = resolve_directory(spec, progress=False)
    config, _ = _checked_config(directory)
    from flexc.ir.families import FAMILIES

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    adapter = FAMILIES.get(getattr(text, "model_type", None))
    if adapter is None:
        return None
    try:
        shape = ModelShape(int(getattr(text, adapter.intermediate_attr)), int(getattr(text, adapter.num_experts_attr)),
                           adapter.top_k(text), getattr(text, "max_position_embeddings", None), directory,
                           str(directory / "config.json"), getattr(text, "vocab_size", None))
    except (AttributeError, TypeError, ValueError) as exc:
        raise ModelError(f"{directory / 'config.json'}: cannot read the expert shape "
                         f"({adapter.intermediate_attr}, {adapter.num_experts_attr}): {exc}") from None
    if not 1 <= shape.top_k <= shape.num_experts:  # routing would fail deep inside lowering
        raise ModelError(f"{directory / 'config.json'}: num_experts_per_tok is {shape.top_k}, but the model has "
                         f"{shape.num_experts} routed experts ({adapter.num_experts_attr}); expected a value from 1 to "
                         f"{shape.num_experts}")
    return shape


def has_tokenizer(directory: Path) -> bool:
    return any((directory / f).is_file() for f in TOKENIZER_FILES)


# --------------------------------------------------------------------------- loading


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} requested but CUDA is not available here (use device: cpu or auto)")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise ModelError(f"device {device!r} requested but this machine has {torch.cuda.device_count()} CUDA "
                         f"device(s); expected one of cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ModelError("device 'mps' requested but MPS is not available here; expected 'cpu' or 'auto' on this "
                         "machine")
    return device


def load_tokenizer(directory: Path) -> Any:
    """The tokenizer saved beside the model, or None if the directory has none."""
    _offline()
    if not any((directory / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:  # no tokenizer files, or an unknown tokenizer class
        log.debug("no tokenizer in %s: %s", directory, exc)
        return None


def load_model(spec: "ModelSpec", *, progress: bool = True) -> LoadedModel:
    """Resolve, check and load the model and tokenizer of ``spec`` (offline)."""
    _offline()
    directory = resolve_directory(spec, progress=progress)
    family = check_moe_config(directory)
    device = spec_device(spec)
    import torch
    from transformers import AutoModelForCausalLM

    from transformers.utils import logging as hf_logging

    dtype: Any = "auto" if spec.dtype == "auto" else getattr(torch, spec.dtype)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # transformers' load report: flexc says what is wrong itself, below
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, local_files_only=True,
                                                           output_loading_info=True)
    except Exception as exc:
        text = str(exc).splitlines()[0] if str(exc) else ""
        if "conversion" in text:  # its message points at a load report flexc does not print
            text = ("transformers could not assemble the weights: a tensor is missing from the safetensors files or "
                    "has another shape than config.json implies (is the download complete?)")
        raise ModelError(f"cannot load the model in {directory}: {type(exc).__name__}: {text}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # transformers would initialise them at random and carry on
        raise ModelError(f"{directory}: its weight files lack {len(missing)} tensor(s) the model needs "
                         f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); expected every tensor "
                         "of the model (is the download complete, or the checkpoint edited?)")
    model.to(device)
    model.eval()
    return LoadedModel(model, load_tokenizer(directory), model.config, directory, family)
