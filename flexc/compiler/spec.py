"""The compile spec: one YAML document that says what to compress, with what, and how far.

The pydantic models below are the source of truth; YAML is their serialisation
(:meth:`Spec.from_yaml`, :meth:`Spec.to_yaml` round-trip) and ``flexc schema`` prints their
JSON Schema. Every model forbids unknown keys. Errors are reported with the file, line and
column they come from (see :func:`parse_spec`).

Relative paths in a spec (model directory, data files, export directory) are resolved
against the current working directory.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from flexc.compiler.errors import SpecError, SpecIssue
from flexc.compiler.yamlpos import PositionIndex, YamlSyntaxError, load_with_positions
from flexc.passes.base import PassOptions, reject_bool_numbers

BUILTIN_SPLITS = ("train", "heldout")
DATA_FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
MAX_SPEC_BYTES = 1_000_000  # a spec is a page of YAML; anything near this size is a mistake
MAX_SEED = 2**63 - 1  # torch.manual_seed and the anneal noise generator take a signed 64-bit seed
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _flexc_error(message: str, subloc: tuple = (), at: str = "value", issues: list | None = None) -> PydanticCustomError:
    """A validation error that carries a location below the validator's own (see ``describe_errors``)."""
    ctx: dict[str, Any] = {"message": message, "subloc": tuple(subloc), "at": at}
    if issues:
        ctx["issues"] = issues
    return PydanticCustomError("flexc", "{message}", ctx)


class _Strict(BaseModel):
    # Numbers must be finite and never booleans (pydantic would read `true` as 1).
    model_config = ConfigDict(extra="forbid", validate_assignment=False, allow_inf_nan=False)

    _no_bools = field_validator("*", mode="before")(classmethod(reject_bool_numbers))


def _exactly_one(obj: BaseModel, names: tuple[str, ...], what: str) -> None:
    """Refuse ``obj`` unless exactly one of the fields ``names`` is set (``what``: which they are)."""
    given = [n for n in names if getattr(obj, n) is not None]
    if len(given) != 1:
        found = f"found {' and '.join(given)}" if given else "found none"
        raise _flexc_error(f"give exactly one {what}; {found}")


def _only_with_hub(obj: BaseModel, name: str, what: str) -> None:
    if getattr(obj, name) is not None and getattr(obj, "hub") is None:
        raise _flexc_error(f"'{name}' only applies to a 'hub' {what}", subloc=(name,), at="key")


# --------------------------------------------------------------------------- model


class ModelSpec(_Strict):
    """Which model to compress: exactly one of ``zoo``, ``path`` or ``hub``."""

    zoo: str | None = Field(None, description="Name of a flexc zoo model (`flexc zoo list`), built on first use.")
    path: str | None = Field(None, description="A local Hugging Face model directory (with config.json).")
    hub: str | None = Field(
        None, description="A hub id such as `Qwen/Qwen1.5-MoE-A2.7B`, read from the local Hugging Face cache only."
    )
    revision: str | None = Field(None, description="With `hub`: the revision (branch, tag or commit) in the cache.")
    dtype: Literal["float32", "float16", "bfloat16", "auto"] = Field(
        "float32", description="Weights dtype after loading; `auto` keeps the checkpoint's own."
    )
    device: str = Field("cpu", description="`cpu`, `cuda`, `cuda:N`, `mps`, or `auto` (CUDA when available).")
    # What flexc.models resolved for this spec (directory, device): once per spec, from the checks
    # to the load. Not part of what the spec says: equality compares the fields only.
    _resolved: dict = PrivateAttr(default_factory=dict)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ModelSpec) and self.model_dump() == other.model_dump()

    __hash__ = None  # type: ignore[assignment] -- mutable, like every pydantic model

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not _DEVICE_RE.match(v):
            raise _flexc_error(f"expected 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto'; found {v!r}")
        return v

    @field_validator("hub")
    @classmethod
    def _hub(cls, v: str | None) -> str | None:
        if v is not None and not _HUB_ID_RE.match(v):
            raise _flexc_error(f"expected a hub id like 'org/name'; found {v!r}")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSpec":
        _exactly_one(self, ("zoo", "path", "hub"), "model source — zoo (a flexc zoo name), path (a local "
                     "directory) or hub (an id in the local Hugging Face cache)")
        _only_with_hub(self, "revision", "model")
        return self

    @property
    def source(self) -> tuple[str, str]:
        """``("zoo"|"path"|"hub", value)``."""
        for kind in ("zoo", "path", "hub"):
            value = getattr(self, kind)
            if value is not None:
                return kind, value
        raise AssertionError("unreachable: validated ModelSpec has a source")


# --------------------------------------------------------------------------- data


class DataSource(_Strict):
    """A text source: exactly one of ``builtin``, ``hub`` or ``files``."""

    builtin: Literal["python-stdlib", "python-docs"] | None = Field(
        None, description="A corpus shipped with flexc: `python-stdlib` (the running Python's standard library sources) "
                          "or `python-docs` (English prose: its language reference's help topics and the standard "
                          "library's docstrings)."
    )
    hub: str | None = Field(None, description="A `datasets` dataset name, read from the local cache only.")
    files: list[str] | None = Field(
        None, description="Local files: `.txt` (one document per file), `.jsonl`/`.json` or `.parquet` (one per row)."
    )
    config: str | None = Field(None, description="With `hub`: the dataset configuration name.")
    split: str | None = Field(
        None,
        description="Split to read. Default: `train` for calibration; for evaluation `heldout` (builtin) or `test` (hub).",
    )
    text_field: str = Field("text", description="Column holding the text (hub, jsonl, json, parquet).")
    num_samples: int = Field(128, gt=0, description="Number of sequences to use.")
    seq_len: int = Field(512, gt=0, description="Tokens per sequence.")
    batch_size: int = Field(8, gt=0, description="Sequences per batch.")

    @field_validator("files", mode="before")
    @classmethod
    def _files_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("files")
    @classmethod
    def _file_kinds(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if not v:
            raise _flexc_error("expected at least one file; found an empty list")
        for i, f in enumerate(v):
            if Path(f).suffix.lower() not in DATA_FILE_SUFFIXES:
                raise _flexc_error(
                    f"expected a file ending in {', '.join(DATA_FILE_SUFFIXES)}; found {f!r}", subloc=(i,)
                )
        return v

    @model_validator(mode="after")
    def _one_source(self) -> "DataSource":
        _exactly_one(self, ("builtin", "hub", "files"), "data source — builtin (python-stdlib or python-docs), hub (a datasets "
                     "name) or files (local .txt/.jsonl/.parquet)")
        _only_with_hub(self, "config", "dataset")
        if self.split is not None and self.files is not None:
            raise _flexc_error("'split' does not apply to local files", subloc=("split",), at="key")
        if self.split is not None and self.builtin is not None and self.split not in BUILTIN_SPLITS:
            raise _flexc_error(
                f"the builtin corpus has splits {', '.join(map(repr, BUILTIN_SPLITS))}; found {self.split!r}",
                subloc=("split",),
            )
        return self

    def resolved_split(self, role: str) -> str | None:
        """The split to read for ``role`` (``calibration`` or ``evaluation``)."""
        if self.split is not None or self.files is not None:
            return self.split
        if role == "calibration":
            return "train"
        return "heldout" if self.builtin is not None else "test"


class DataSpec(_Strict):
    """Calibration data (used by passes that score or train) and evaluation data."""

    calibration: DataSource | None = Field(
        None,
        description="Data the passes calibrate on. Default, for a zoo model whose passes read data: its training "
        "corpus (builtin python-stdlib, 64 sequences of 128 tokens).",
    )
    evaluation: DataSource | None = Field(None, description="Held-out data: report.md measures perplexity per budget on it.")


# --------------------------------------------------------------------------- budgets


class BudgetSpec(_Strict):
    """Target sizes: ``keep`` ratios of routed-expert parameters, or ``prune`` ratios — never both."""

    keep: list[float] | None = Field(
        None, description="Fractions of routed-expert parameters kept, each in (0, 1], strictly decreasing."
    )
    prune: list[float] | None = Field(
        None, description="Fractions of routed-expert parameters removed, each in [0, 1), strictly increasing."
    )
    metric: Literal["params", "flops"] = Field(
        "params", description="What a ratio counts: `params`, or `flops` (routed-expert FLOPs weighted by routing load)."
    )
    grid: int | Literal["auto"] | None = Field(
        "auto", description="Every expert width is a multiple of this many channels (or the full width), as serving "
        "kernels want (vLLM: 32 on CPU, 64 for Marlin/NVFP4 on GPU). `auto`: 64 or 32, the coarsest leaving at least "
        "8 widths per expert, else the pass's granule; null: the pass's granule only.",
    )
    max_buckets: int | None = Field(
        4, description="At most this many distinct nonzero expert widths per MoE layer, so that a sliced checkpoint "
        "runs as that many fused-MoE calls per layer in vLLM (a removed expert is no bucket); null: unbounded.",
    )

    @field_validator("grid")
    @classmethod
    def _grid(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool) and v < 1:
            raise _flexc_error(f"grid must be a positive number of channels, 'auto' or null; found {v}")
        return v

    @field_validator("max_buckets")
    @classmethod
    def _max_buckets(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise _flexc_error(f"max_buckets must be at least 1 (null: no bound); found {v}")
        return v

    @field_validator("keep", "prune", mode="before")
    @classmethod
    def _scalar_to_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, (int, float)) and not isinstance(v, bool) else v

    @field_validator("keep")
    @classmethod
    def _keep(cls, v: list[float] | None) -> list[float] | None:
        if v is None:
            return v
        _check_ratios(v, "keep", low_open=True)
        return v

    @field_validator("prune")
    @classmethod
    def _prune(cls, v: list[float] | None) -> list[float] | None:
        if v is None:
            return v
        _check_ratios(v, "prune", low_open=False)
        return v

    @model_validator(mode="after")
    def _exactly_one(self) -> "BudgetSpec":
        if self.keep is not None and self.prune is not None:
            raise _flexc_error(
                "give either 'keep' or 'prune' ratios, not both (keep = 1 - prune); found both",
                subloc=("prune",),
                at="key",
            )
        if self.keep is None and self.prune is None:
            raise _flexc_error("give 'keep' ratios (fractions kept) or 'prune' ratios (fractions removed); found neither")
        return self

    @property
    def keep_ratios(self) -> tuple[float, ...]:
        """The budgets as keep ratios, sorted high to low (prune ratios converted)."""
        if self.keep is not None:
            ratios = list(self.keep)
        else:
            ratios = [round(1.0 - p, 12) for p in self.prune or ()]
        return tuple(sorted(ratios, reverse=True))


def _check_ratios(values: list[float], kind: str, low_open: bool) -> None:
    if not values:
        raise _flexc_error(f"expected at least one {kind} ratio; found an empty list")
    interval = "(0, 1]" if low_open else "[0, 1)"
    for i, v in enumerate(values):
        ok = (0 < v <= 1) if low_open else (0 <= v < 1)
        if not ok:
            extra = " (a ratio, not a percentage)" if v > 1 else ""
            raise _flexc_error(f"{kind} ratios must be in {interval}{extra}; found {v:g}", subloc=(i,))
    order = "decreasing (largest model first)" if kind == "keep" else "increasing (smallest cut first)"
    folders: dict[str, int] = {}  # artifact folders are named by the keep ratio to two decimals (keep_0.50)
    for i, v in enumerate(values):
        folder = f"keep_{(v if kind == 'keep' else 1 - v):.2f}"
        if folder in folders and values[folders[folder]] != v:
            raise _flexc_error(f"{kind} ratios {values[folders[folder]]:g} and {v:g} are one budget to two decimals "
                               f"(both would be written to {folder}/); expected ratios at least 0.01 apart",
                               subloc=(i,))
        folders.setdefault(folder, i)
    for i in range(1, len(values)):
        if values[i] == values[i - 1]:
            raise _flexc_error(f"duplicate {kind} ratio {values[i]:g} (also at position {i - 1})", subloc=(i,))
        if (values[i] > values[i - 1]) if kind == "keep" else (values[i] < values[i - 1]):
            raise _flexc_error(
                f"{kind} ratios must be strictly {order}; found {values[i]:g} after {values[i - 1]:g}", subloc=(i,)
            )


# --------------------------------------------------------------------------- pipeline


class PassEntry(_Strict):
    """One pipeline step: a pass name (built-in, plugin, or ``package.module:Class``) and its options.

    In YAML an entry is written as a bare name (``- fold_masks``), a one-key mapping
    (``- rank_channels: {score: taylor}``), or ``- name: my.mod:MyPass`` with ``options:``.
    ``options`` stays the plain mapping as written (the spec's YAML and fingerprint); the pass's
    Options model validates it once, when the entry is read, and :attr:`pass_options` keeps the result.
    """

    name: str = Field(description="Pass name, or `package.module:ClassName` for a pass of your own.")
    options: dict[str, Any] = Field(default_factory=dict, description="Options, validated by the pass's Options model.")
    _pass_options: PassOptions | None = PrivateAttr(None)

    @model_validator(mode="wrap")
    @classmethod
    def _normalise_and_check(cls, data: Any, handler: Any) -> "PassEntry":
        if isinstance(data, PassEntry):
            return data
        data, form = _normalise_entry(data)
        entry = handler(data)
        entry._pass_options = _check_pass(entry, form)
        return entry

    @property
    def pass_options(self) -> PassOptions:
        """The options as the pass's Options model read them (validated when the entry was)."""
        if self._pass_options is None:  # built with model_construct: nothing was validated
            from flexc.passes.registry import resolve_pass

            self._pass_options = resolve_pass(self.name).Options.model_validate(self.options)
        return self._pass_options

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: Any, handler: Any) -> dict[str, Any]:
        long_form = dict(handler.resolve_ref_schema(handler(core_schema)))
        long_form.pop("description", None)
        return {
            "title": "PassEntry",
            "description": "A pass: `name`, `name: {options}`, or `{name: ..., options: {...}}`.",
            "anyOf": [
                {"type": "string", "description": "A pass name, default options."},
                {
                    "type": "object",
                    "minProperties": 1,
                    "maxProperties": 1,
                    "additionalProperties": {"type": ["object", "null"]},
                    "description": "pass_name: {option: value}",
                },
                long_form,
            ],
        }

    @property
    def pass_class(self) -> Any:
        """The :class:`~flexc.passes.base.Pass` subclass this entry names."""
        from flexc.passes.registry import resolve_pass

        return resolve_pass(self.name)

    def build(self) -> Any:
        """Instantiate the pass with its validated options (a copy each: a pass may not change another's)."""
        return self.pass_class(self.pass_options.model_copy(deep=True))


def _normalise_entry(data: Any) -> tuple[dict[str, Any], str]:
    """The long form of a pipeline entry, and how it was written (bare, short or long)."""
    if isinstance(data, str):
        return {"name": data, "options": {}}, "bare"
    if isinstance(data, dict):
        keys = set(data)
        if "name" in keys and keys <= {"name", "options"}:
            out = dict(data)
            if out.get("options") is None:
                out["options"] = {}
            return out, "long"
        if len(data) == 1:
            ((name, options),) = data.items()
            if options is None:
                options = {}
            if not isinstance(options, dict):
                raise _flexc_error(
                    f"options of pass {name!r} must be a mapping of option: value; found {_found(options)}",
                    subloc=(name,),
                )
            return {"name": str(name), "options": options}, "short"
        if "name" in keys:
            extra = sorted(str(k) for k in keys - {"name", "options"})
            raise _flexc_error(
                f"a pipeline entry with 'name' takes only 'name' and 'options'; found also {', '.join(extra)} "
                "(put pass options under 'options:')",
                subloc=(extra[0],),
                at="key",
            )
        raise _flexc_error(
            "a pipeline entry is one pass: `- pass_name`, `- pass_name: {option: value}` or "
            f"`- name: pass_name` with `options:`; found a mapping with {len(data)} keys ({', '.join(map(str, data))})"
        )
    raise _flexc_error(f"expected a pass name or a mapping; found {_found(data)}")


def _check_pass(entry: PassEntry, form: str) -> PassOptions:
    """The entry's options validated by its pass's Options model; errors point at the spec's text."""
    from flexc.passes.registry import UnknownPassError, resolve_pass

    name_loc: tuple = ("name",) if form == "long" else (() if form == "bare" else (entry.name,))
    name_at = "value" if form != "short" else "key"
    try:
        cls = resolve_pass(entry.name)
    except UnknownPassError as exc:
        raise _flexc_error(str(exc), subloc=name_loc, at=name_at) from None
    options_loc: tuple = ("options",) if form == "long" else name_loc
    try:
        return cls.Options.model_validate(entry.options)
    except ValidationError as exc:
        issues = [
            (options_loc + tuple(loc), at, f"pass {entry.name!r}: {msg}")
            for loc, at, msg in describe_errors(exc.errors(), cls.Options)
        ]
        first_loc, first_at, first_msg = issues[0]
        raise _flexc_error(first_msg, subloc=first_loc, at=first_at, issues=issues) from None


# --------------------------------------------------------------------------- export


ExportFormat = Literal["nested", "sliced", "hf", "onnx", "graph"]


class ExportSpec(_Strict):
    """Where the run goes and what it writes."""

    dir: str | None = Field(
        None, description="Output directory. Default: `runs/<spec file name>` (`runs/flexc` for a spec built in Python)."
    )
    formats: list[ExportFormat] = Field(
        default_factory=list,
        description="Artifacts to write: nested, sliced, hf, onnx, graph (each needs its exporter); report.md is always written.",
    )

    @field_validator("formats", mode="before")
    @classmethod
    def _formats_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("formats")
    @classmethod
    def _available(cls, v: list[str]) -> list[str]:
        from flexc.compiler.exporters import available_exports, not_available_message

        have = set(available_exports())
        issues = []
        for i, fmt in enumerate(v):
            if v.index(fmt) != i:
                issues.append(((i,), "value", f"format {fmt!r} is listed twice; expected each format once: remove one"))
            elif fmt not in have:
                issues.append(((i,), "value", not_available_message(fmt)))
        if issues:
            raise _flexc_error(issues[0][2], subloc=issues[0][0], issues=issues)
        return v


# --------------------------------------------------------------------------- execution


class ExecutionSpec(_Strict):
    """How the compile runs: the whole model in memory (default) or streamed layer by layer."""

    stream: Literal["off", "layers", "auto"] = Field(
        "off",
        description="`off`: load the whole model into memory. `layers`: keep the weights memory-mapped in their "
        "safetensors shards and materialise one decoder layer at a time (models larger than memory); "
        "supports rank_channels, uniform, coverage, fold_masks and the nested and sliced exports "
        "(docs/scale.md). `auto`: in memory when the model fits the compute device's available memory "
        "(estimated from its size), else layers.",
    )


# --------------------------------------------------------------------------- spec


class Spec(_Strict):
    """A whole compile spec. Build it in Python or load it with :meth:`from_yaml`."""

    model: ModelSpec = Field(description="The model to compress.")
    data: DataSpec = Field(default_factory=DataSpec, description="Calibration and evaluation data.")
    budgets: BudgetSpec | None = Field(None, description="Target budgets (keep or prune ratios).")
    pipeline: list[PassEntry] = Field(default_factory=list, description="Passes, run in order. May be empty.")
    export: ExportSpec = Field(default_factory=ExportSpec, description="Output directory and formats.")
    execution: ExecutionSpec = Field(default_factory=ExecutionSpec,
                                     description="How the compile runs (in memory, or streamed layer by layer).")
    seed: int = Field(
        0, ge=0, le=MAX_SEED,
        description="Seed for every random choice (sampling, data order, initialisation); 0 to 2**63-1.",
    )

    @model_validator(mode="after")
    def _default_calibration(self) -> "Spec":
        # A zoo model was trained on a builtin corpus: calibrate on it when passes need data and
        # the spec names none (so `Spec(model={"zoo": "tiny"}, pipeline=["rank_channels"])` runs).
        if self.model.zoo is None or self.data.calibration is not None or not calibration_passes(self.pipeline):
            return self
        corpus = _zoo_corpus(self.model.zoo)
        if corpus is not None:
            calibration = DataSource(builtin=corpus, num_samples=64, seq_len=128, batch_size=8)
            self.data = DataSpec(calibration=calibration, evaluation=self.data.evaluation)
        return self

    @model_validator(mode="after")
    def _streamable(self) -> "Spec":
        if self.execution.stream != "layers":  # auto: decided when the compile starts
            return self
        from flexc.compiler.streamed import streaming_problems

        issues = [(loc, "value", msg) for loc, msg in streaming_problems(self)]
        if issues:
            raise _flexc_error(issues[0][2], subloc=issues[0][0], issues=issues)
        return self

    # ----------------------------------------------------------------- YAML
    @classmethod
    def from_yaml(cls, path: str | Path) -> "Spec":
        """Load and validate a spec file; raises :class:`SpecError` with file positions."""
        return load_spec_file(path)

    @classmethod
    def from_yaml_text(cls, text: str, filename: str = "<spec>") -> "Spec":
        return parse_spec(text, filename)[0]

    def to_dict(self) -> dict[str, Any]:
        """Plain data in YAML order, with pipeline entries in their short form."""
        out: dict[str, Any] = {"model": self.model.model_dump(mode="json", exclude_none=True)}
        data = self.data.model_dump(mode="json", exclude_none=True)
        if data:
            out["data"] = data
        if self.budgets is not None:
            out["budgets"] = self.budgets.model_dump(mode="json", exclude_none=True)
        out["pipeline"] = [{e.name: dict(e.options)} if e.options else e.name for e in self.pipeline]
        out["export"] = self.export.model_dump(mode="json", exclude_none=True)
        if self.execution.stream != "off":  # absent when default: older specs keep their fingerprint
            out["execution"] = self.execution.model_dump(mode="json")
        out["seed"] = self.seed
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=100)

    def budgets_for(self, index: int) -> tuple[list[float], tuple | None]:
        """The keep ratios pipeline entry ``index`` (or the next entry that takes budgets) works to, and
        where they are set (None: the spec's ``budgets``)."""
        for j in range(index, len(self.pipeline)):
            options = self.pipeline[j].pass_options
            if getattr(options, "budgets", None) is not None:
                return list(options.budgets), ("pipeline", j)
            if "budgets" in type(options).model_fields:
                break
        return (list(self.budgets.keep_ratios), None) if self.budgets is not None else ([], None)

    def fingerprint(self) -> str:
        """A hash of what the spec computes (the export directory excluded)."""
        import hashlib
        import json

        d = self.to_dict()
        d["export"] = {k: v for k, v in d["export"].items() if k != "dir"}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def calibration_passes(pipeline: list[PassEntry]) -> list[int]:
    """Indices of the pipeline entries that read calibration data."""
    from flexc.passes.registry import resolve_pass

    out, holds = [], frozenset()
    for i, entry in enumerate(pipeline):
        if entry.pass_options.needs_calibration(holds):
            out.append(i)
        holds |= frozenset(resolve_pass(entry.name).guarantees)
    return out


def _zoo_corpus(name: str) -> str | None:
    """The builtin corpus a zoo model was trained on (None for an unknown name or another corpus)."""
    try:
        from flexc.zoo.recipes import RECIPES
    except ImportError:
        return None
    recipe = RECIPES.get(name)
    corpus = getattr(recipe, "corpus", None)
    return corpus if corpus in ("python-stdlib", "python-docs") else None


# --------------------------------------------------------------------------- errors


def _found(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _unwrap_model(annotation: Any) -> Any:
    """The pydantic model class inside ``X | None`` or ``list[X]`` (else None)."""
    from typing import get_args

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _unwrap_model(arg)
        if found is not None:
            return found
    return None


def _model_at(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    current: Any = root
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or part not in current.model_fields:
            return None
        current = _unwrap_model(current.model_fields[part].annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


_TYPE_WORDS = {
    "int_parsing": "an integer",
    "int_type": "an integer",
    "int_from_float": "a whole number",
    "float_parsing": "a number",
    "float_type": "a number",
    "string_type": "a string",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "finite_number": "a finite number",
}


def describe_errors(errors: list[dict[str, Any]], root: type[BaseModel]) -> list[tuple[tuple, str, str]]:
    """Turn pydantic errors into ``(loc, at, message)`` triples; ``at`` is ``key`` or ``value``."""
    out: list[tuple[tuple, str, str]] = []
    for err in errors:
        etype, loc, ctx = err["type"], tuple(err["loc"]), err.get("ctx") or {}
        value = err.get("input")
        if etype == "flexc":
            if ctx.get("issues"):
                for sub, at, msg in ctx["issues"]:
                    out.append((loc + tuple(sub), at, msg))
            else:
                out.append((loc + tuple(ctx.get("subloc", ())), ctx.get("at", "value"), ctx["message"]))
            continue
        if etype == "extra_forbidden":
            key = str(loc[-1])
            model = _model_at(root, loc[:-1])
            valid = list(model.model_fields) if model is not None else []
            msg = f"unknown key {key!r}"
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
            if close:
                msg += f" — did you mean {close[0]!r}?"
            msg += f" (valid keys here: {', '.join(valid)})" if valid else "; expected no options here: remove it"
            out.append((loc, "key", msg))
            continue
        if etype in ("too_short", "too_long"):
            limit = ctx.get("min_length") if etype == "too_short" else ctx.get("max_length")
            bound = "at least" if etype == "too_short" else "at most"
            out.append((loc, "value", f"expected {bound} {limit} item(s); found {ctx.get('actual_length', '?')}"))
            continue
        if etype == "missing":
            out.append((loc[:-1], "value", f"missing required key {loc[-1]!r}"))
            continue
        if etype in ("literal_error", "enum"):
            expected = str(ctx.get("expected", ""))
            choices = re.findall(r"'([^']*)'", expected)
            msg = f"expected one of {', '.join(repr(c) for c in choices)}; found {_found(value)}"
            close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.5) if isinstance(value, str) else []
            if close:
                msg += f" — did you mean {close[0]!r}?"
            out.append((loc, "value", msg))
            continue
        if etype in ("model_type", "model_attributes_type", "dict_type"):
            out.append((loc, "value", f"expected a mapping (key: value); found {_found(value)}"))
            continue
        if etype == "list_type":
            out.append((loc, "value", f"expected a list; found {_found(value)}"))
            continue
        msg = str(err.get("msg", etype))
        if etype in _TYPE_WORDS:
            out.append((loc, "value", f"expected {_TYPE_WORDS[etype]}; found {_found(value)}"))
            continue
        if etype in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
            msg = msg.replace("Input should be ", "expected a number ")
            out.append((loc, "value", f"{msg}; found {_found(value)}"))
            continue
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        elif msg.startswith("Input should be "):
            msg = "expected " + msg[len("Input should be ") :] + f"; found {_found(value)}"
        else:
            msg = f"{msg}; found {_found(value)}"
        out.append((loc, "value", msg))
    return out


def issues_from_errors(
    errors: list[dict[str, Any]], index: PositionIndex | None, root: type[BaseModel] = Spec
) -> list[SpecIssue]:
    issues = []
    for loc, at, msg in describe_errors(errors, root):
        issues.append(locate(loc, msg, index, at))
    return issues


def locate(loc: tuple, message: str, index: PositionIndex | None, at: str = "value") -> SpecIssue:
    """A :class:`SpecIssue` for ``loc``, positioned at the nearest place the YAML document has."""
    if index is None:
        return SpecIssue(tuple(loc), message)
    found, pos = index.nearest(loc)
    position = None
    if pos is not None:
        position = pos.key if (at == "key" and found == tuple(loc) and pos.key is not None) else pos.value
    return SpecIssue(tuple(loc), message, position)


# --------------------------------------------------------------------------- parsing


def parse_spec(text: str, filename: str = "<spec>") -> tuple[Spec, PositionIndex]:
    """Validate YAML text as a spec; raise :class:`SpecError` listing every problem with its position."""
    try:
        data, index, dups = load_with_positions(text, filename)
    except YamlSyntaxError as exc:
        raise SpecError([SpecIssue((), f"YAML syntax error: {exc}", exc.position, show_field=False)], filename, text) from None
    if dups:
        issues = [
            SpecIssue(d.path, f"duplicate key {d.path[-1]!r} (first given at line {d.first.line}); expected each key "
                              "once: keep one of the two", d.again)
            for d in dups
        ]
        raise SpecError(issues, filename, text)
    if data is None:
        raise SpecError(
            [SpecIssue((), "the spec is empty; expected a mapping with at least a 'model' key", None)], filename, text
        )
    if not isinstance(data, dict):
        raise SpecError(
            [locate((), f"expected a mapping (model:, data:, budgets:, ...) at the top level; found {_found(data)}", index)],
            filename,
            text,
        )
    try:
        spec = Spec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(issues_from_errors(exc.errors(), index), filename, text) from None
    return spec, index


def read_spec_text(path: str | Path) -> str:
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > MAX_SPEC_BYTES:  # parsing megabytes of YAML takes minutes and gigabytes
            raise SpecError(
                [SpecIssue((), f"the spec file is {size:,} bytes; a spec is at most {MAX_SPEC_BYTES:,} bytes "
                               "(is this the right file?)", show_field=False)],
                str(path),
            )
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError([SpecIssue((), f"spec file not found: {p}", show_field=False)], str(path)) from None
    except UnicodeDecodeError as exc:
        raise SpecError([SpecIssue((), f"cannot read spec file: it is not UTF-8 YAML text (byte "
                                       f"{exc.object[exc.start]:#04x} at offset {exc.start:,}); expected a YAML spec "
                                       "saved as UTF-8 (is this the right file?)", show_field=False)], str(path)) from None
    except OSError as exc:
        raise SpecError([SpecIssue((), f"cannot read spec file: {exc}", show_field=False)], str(path)) from None


def load_spec_file(path: str | Path) -> Spec:
    return parse_spec(read_spec_text(path), str(path))[0]
