"""vLLM model classes for flexc artifacts: vLLM's own MoE models with flexc's MoE block.

``FlexcQwen3MoeForCausalLM`` (and the other families') derives from vLLM's model class. For a
flexc artifact it builds :class:`flexc.serving.moe.FlexcMoeBlock` wherever the decoder layer
would build vLLM's fused-MoE block (the block class the decoder layer looks up is swapped for
the duration of ``__init__``, so vLLM's block is never allocated), loads the experts itself and
everything else through vLLM's loader. For a stock checkpoint it is vLLM's class, unchanged:
the plugin registers these classes under the stock architecture names, so that
``LLM(model="runs/x/nested")`` just works.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from flexc.export.nested import QUANT_KEY_PREFIX as QUANT_SCALES_PREFIX
from flexc.ir.tables import BudgetError
from flexc.serving.artifact import Artifact, detect
from flexc.serving.families import FAMILIES, ServedFamily, ServingError
from flexc.serving.moe import BlockPlan, FlexcMoeBlock, building

logger = logging.getLogger("flexc.serving")

# The nested artifact's width-table file holds one tensor under this name; vLLM's loader reads
# every *.safetensors file of the model directory, this one included.
_WIDTHS_TENSOR = "widths"


class BudgetControl:
    """The served model's budget: which width row every flexc MoE block reads."""

    def __init__(self, artifact: Artifact, blocks: dict[int, FlexcMoeBlock], graphs: bool = False):
        self.kind = artifact.kind
        self.graphs = graphs  # CUDA graphs may replay the routed experts: per-pair widths need eager mode there
        self.blocks = blocks
        self.directory = artifact.directory
        self.budget: float | None = None
        self.rows: dict[float, list[torch.Tensor]] = {}
        self._position = {layer: i for i, layer in enumerate(sorted(blocks))}
        self._warned: set = set()  # requested budgets (and "adaptive") already warned about
        self._groups, self._groups_for = None, None
        self._token_rows = None  # [T]: each token's position in this pass's groups (pair_widths)
        self.most_budgets_in_a_pass = 1  # the most budgets (or modes of one) a forward pass ran (per-request)
        self.policy = artifact.policy  # the token-adaptive policy (nested artifacts that have one)
        self.adaptive = False  # whether the engine's budget runs it
        self._rules: dict[float, list] = {}  # budget -> each layer's AdaptiveLayer
        self._pieces_packed = False  # the experts packed in pieces for vLLM's kernel (pack_pieces)
        self._warned_memory: set = set()  # what was not packed for want of memory (logged once)
        if artifact.kind == "sliced":
            self.budget = artifact.sliced.get("budget")
            return
        tables = artifact.tables
        layers = sorted(blocks)
        if tables.layers != layers or tables.full != [blocks[i].full for i in layers]:
            raise ServingError(f"{artifact.directory}: the width tables cover MoE layers {tables.layers} "
                               f"(full widths {tables.full}) but the model has {layers}; re-export the artifact")
        most = max(blocks[layer].experts.num_experts for layer in layers)
        if tables.tables.shape[2] < most:
            raise ServingError(f"{artifact.directory}: width tables for {tables.tables.shape[2]} experts per layer; "
                               f"the model has {most}: re-export the artifact")
        self.policy_tables = tables
        device = blocks[layers[0]].experts.widths.device
        full = [torch.full((blocks[i].experts.num_experts,), blocks[i].full, dtype=torch.int32) for i in layers]
        self.rows[1.0] = [row.to(device) for row in full]
        for b in tables.budgets:  # exported budgets; a 1.0 table (if exported) replaces the full one
            self.rows[b] = [tables.table(b)[i, : blocks[layer].experts.num_experts].to(device)
                            for i, layer in enumerate(layers)]

    @property
    def budgets(self) -> list[float]:
        return sorted(self.rows, reverse=True) if self.rows else [self.budget]

    def set(self, keep: float, adaptive: bool = False) -> float:
        """Switch to budget ``keep`` (a keep ratio; ``adaptive``: on the artifact's token-adaptive policy);
        returns the seconds the switch took."""
        if self.kind == "sliced":
            if adaptive:
                raise ServingError(f"{self.directory} is a sliced checkpoint: its widths are fixed; serve the nested "
                                   "artifact for token-adaptive widths")
            if self.budget is not None and abs(float(keep) - self.budget) < 1e-6:
                return 0.0
            raise ServingError(f"{self.directory} is a sliced checkpoint of keep {self.budget}: its budget is fixed. "
                               "Serve the nested artifact to switch budgets.")
        key = next((b for b in self.rows if abs(b - float(keep)) < 1e-6), None)
        if key is None:
            raise BudgetError(f"no width table for keep {keep:g} in {self.directory}; available: "
                              f"{', '.join(f'{b:g}' for b in self.budgets)}")
        start = time.perf_counter()
        if adaptive:
            if self.graphs:
                raise ServingError("flexc's token-adaptive widths under CUDA graphs have not run yet (a captured "
                                   "graph would keep the branch it saw); serve with enforce_eager=True / --enforce-eager")
            self._adaptive_rules(key)  # before anything changes: a budget without a policy is refused
            self.pack_pieces()
        # Packed for vLLM's CPU kernel only where the engine's budget runs on the width buffer (not on the
        # adaptive policy's widths per pair) and where the copy fits in memory. (Compiled engines too: their
        # routed experts run as an opaque op, flexc.serving.moe.compiled_op_name.)
        pack = (not adaptive or key == 1.0) and self._fits(self._packed_nbytes(key), key)
        for layer, row in zip(sorted(self.blocks), self.rows[key]):
            self.blocks[layer].experts.widths.copy_(row)
            self.blocks[layer].experts.widths_set(pack=pack)
        if row.is_cuda:
            torch.cuda.synchronize(row.device)
        self.budget, self.adaptive = key, adaptive and key != 1.0
        return time.perf_counter() - start

    def _packed_nbytes(self, budget: float) -> int:
        """Bytes of ``budget``'s kept prefixes packed for vLLM's CPU kernel (0 where nothing is packed)."""
        from flexc.serving.packed import packed_nbytes

        return sum(packed_nbytes(self.row(budget, layer).tolist(), block.experts.hidden, block.experts.down_proj.dtype)
                   for layer, block in self.blocks.items() if block.experts.packs())

    def _fits(self, needed: int, what, held: bool = True) -> bool:
        """Whether a packed copy of ``needed`` bytes fits in memory (``held``: replacing the engine budget's
        copy); logs why not, once per budget."""
        from flexc.serving.packed import fits_in_memory

        experts = [self.blocks[layer].experts for layer in sorted(self.blocks)]
        if not needed:
            return True  # not on vLLM's CPU kernel (flexc_experts_kernel: flexc, CUDA, ...): nothing is packed
        replaced = sum(e.packed_bytes() for e in experts) if held else 0
        if fits_in_memory(needed, replaced):
            return True
        if what not in self._warned_memory:
            self._warned_memory.add(what)
            logger.warning("flexc: packing %s for vLLM's CPU experts kernel needs %.1f GB, more than the memory it may "
                           "take; flexc's op runs it instead (slower; flexc_experts_kernel: flexc says so up front)",
                           f"keep {what:g}" if isinstance(what, float) else what, needed / 1e9)
        return False

    def _adaptive_rules(self, budget: float) -> list:
        """Per MoE layer (in order): the policy's :class:`~flexc.ir.adaptive.AdaptiveLayer` at ``budget``."""
        if self.policy is None:
            raise ServingError(f"{self.directory} has no token-adaptive policy: compile it with the adaptive_widths "
                               "pass (docs/adaptive.md)")
        if budget not in self._rules and budget != 1.0:
            from flexc.ir.adaptive import policy_layers

            self._rules[budget] = policy_layers(self.policy, self.policy_tables, budget, self.rows[budget][0].device)
        return self._rules.get(budget, [])

    def adaptive_widths(self, layer: int, ids: torch.Tensor, weights: torch.Tensor,
                        budget: float | None = None) -> torch.Tensor:
        """The width of every routed pair at ``layer`` (``[T, k]``) under the adaptive policy of ``budget`` (default:
        the engine's)."""
        return self._rules[self.budget if budget is None else budget][self._position[layer]].pair_widths(ids, weights)

    def state(self) -> dict[str, Any]:
        widths = {layer: self.blocks[layer].experts.widths.tolist() for layer in sorted(self.blocks)}
        state = {"kind": self.kind, "budget": self.budget, "budgets": self.budgets, "widths": widths,
                 "most_budgets_in_a_pass": self.most_budgets_in_a_pass, "adaptive": self.adaptive,
                 "adaptive_policy": self.policy is not None}
        if self.kind == "sliced":
            state["buckets"] = {layer: [[w, len(ids)] for w, ids in self.blocks[layer].experts.buckets]
                                for layer in sorted(self.blocks)}
        else:  # the copies packed for vLLM's kernel, if any: the engine budget's kept prefixes, the experts in pieces
            state["packed_bytes"] = sum(self.blocks[layer].experts.packed_bytes() for layer in self.blocks)
            state["pieces_bytes"] = sum(self.blocks[layer].experts.pieces_bytes() for layer in self.blocks)
        # which kernels run each layer's (engine budget's) experts
        state["experts_kernel"] = sorted({self.blocks[layer].experts.kernel for layer in self.blocks})
        return state

    # -- per-request budgets (flexc.serving.requests) ---------------------------------------

    def request_key(self, requested: tuple[float | None, bool | None]) -> tuple[float, bool]:
        """How a request runs, from what it asked for (:func:`flexc.serving.requests.requested_budget`): its
        budget (:meth:`resolve`; the engine's if it names none) and whether on the adaptive policy (as asked, else
        as the engine runs; never at full width, which has no policy; never without a policy, with a warning)."""
        keep, adaptive = requested
        budget = self.budget if keep is None else self.resolve(keep)
        adaptive = (self.adaptive if adaptive is None else adaptive) and budget != 1.0
        if adaptive and self.policy is None:
            if "adaptive" not in self._warned:
                self._warned.add("adaptive")
                logger.warning("flexc: a request asks for the token-adaptive policy, which %s does not have; it runs "
                               "its budget's static table", self.directory)
            adaptive = False
        if adaptive:
            self._adaptive_rules(budget)
        return budget, adaptive

    def resolve(self, requested: float) -> float:
        """The exported budget a request asking for ``requested`` runs at: the same one, else the largest
        below it (the smallest if none is), with a warning."""
        key = next((b for b in self.rows if abs(b - requested) < 1e-6), None)
        if key is not None:
            return key
        below = [b for b in self.rows if b <= requested]
        key = max(below) if below else min(self.rows)
        if requested not in self._warned:
            self._warned.add(requested)
            logger.warning("flexc: a request asks for keep %g, which %s does not export; it runs at keep %g "
                           "(budgets: %s)", requested, self.directory, key, self.budgets)
        return key

    def groups(self, num_tokens: int) -> list[tuple[tuple[float, bool], torch.Tensor]] | None:
        """This forward pass's tokens by (budget, adaptive) (None: all as the engine runs); computed once per
        pass, by the first MoE block that asks."""
        from flexc.serving.requests import active, current_pass, token_groups

        if self.kind != "nested" or active() is None:  # no per-request budgets: every block's fast path
            return None
        context = current_pass()
        if context is None or self._groups_for is not context:
            self._groups = token_groups((self.budget, self.adaptive), num_tokens, self.request_key)
            self._groups_for, self._token_rows = context, None
            self.most_budgets_in_a_pass = max(self.most_budgets_in_a_pass, len(self._groups or [None]))
            if self._groups:  # (None where every token runs at the engine's budget)
                self.pack_pieces()
        return self._groups

    def pack_pieces(self) -> None:
        """Once, at the first call with widths of its own (budgets mixed in a pass, the adaptive policy), each
        block's experts are packed in pieces for vLLM's CPU kernel (where it runs; memory: one copy of the
        experts, :class:`flexc.serving.packed.PackedPieces`)."""
        if self._pieces_packed:
            return
        self._pieces_packed = True
        start = time.perf_counter()
        budgets = sorted(self.rows, reverse=True)
        rows = {layer: [self.row(b, layer).tolist() for b in budgets] for layer in self.blocks}
        if not self._fits(sum(self.blocks[layer].experts.pieces_nbytes(r) for layer, r in rows.items()),
                          "the experts in pieces", held=False):
            return
        for layer, r in rows.items():
            self.blocks[layer].experts.pack_pieces(r)
        packed = sum(self.blocks[layer].experts.pieces_bytes() for layer in self.blocks)
        if packed:
            logger.info("flexc: experts packed in pieces for vLLM's CPU experts kernel in %.2f s (%.1f MB)",
                        time.perf_counter() - start, packed / 1e6)

    def row(self, budget: float, layer: int) -> torch.Tensor:
        return self.rows[budget][self._position[layer]]

    def pair_widths(self, layer: int, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """This pass's width of every routed pair at ``layer`` (``[T, k]``, like ``ids``): each token's experts at
        its request's budget, on that budget's table or its adaptive policy (from the pair's routing weight in
        ``weights``), for one op call over the whole mixed batch (one static budget in the pass: its row ``[E]``)."""
        if len(self._groups) == 1:
            (budget, adaptive), _ = self._groups[0]
            return self.adaptive_widths(layer, ids, weights, budget) if adaptive else self.row(budget, layer)
        if self._token_rows is None:  # once per pass, by the first block that asks
            rows = torch.empty(ids.shape[0], dtype=torch.long)
            for i, (_, tokens) in enumerate(self._groups):
                rows[tokens] = i
            self._token_rows = rows.to(ids.device)
        stacked = torch.stack([self.row(budget, layer) for (budget, _), _ in self._groups])  # [groups, E]
        widths = stacked[self._token_rows[:, None], ids]
        for (budget, adaptive), tokens in self._groups:
            if adaptive:
                tokens = tokens.to(ids.device)
                widths[tokens] = self.adaptive_widths(layer, ids[tokens], weights[tokens], budget).to(widths.dtype)
        return widths


@contextmanager
def _swapped(module, name: str, replacement) -> Iterator[None]:
    original = getattr(module, name)
    setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, original)


def _check_parallel(vllm_config) -> None:
    parallel = vllm_config.parallel_config
    if parallel.tensor_parallel_size > 1 or parallel.pipeline_parallel_size > 1:
        raise ServingError("flexc artifacts are served on one device for now (tensor_parallel_size and "
                           f"pipeline_parallel_size 1); got tensor {parallel.tensor_parallel_size}, pipeline "
                           f"{parallel.pipeline_parallel_size}. Use data parallelism (several engines) to scale out.")
    if getattr(parallel, "enable_eplb", False) or getattr(parallel, "enable_expert_parallel", False):
        raise ServingError("flexc artifacts do not support expert parallelism or EPLB yet; drop "
                           "--enable-expert-parallel / --enable-eplb")
    if vllm_config.quant_config is not None:
        raise ServingError("flexc artifacts are served unquantised; drop the quantization option")


def _flexc_init(self, base: type, family: ServedFamily, vllm_config, prefix: str) -> None:
    model_config = vllm_config.model_config
    artifact = detect(model_config.model, model_config.hf_config)
    if artifact is None:
        base.__init__(self, vllm_config=vllm_config, prefix=prefix)
        self.flexc = None
        return
    _check_parallel(vllm_config)
    module = importlib.import_module(family.vllm_module)
    plan = BlockPlan(family, model_config.hf_text_config, artifact)
    with building(plan), _swapped(module, family.block_name, FlexcMoeBlock):
        base.__init__(self, vllm_config=vllm_config, prefix=prefix)
    if not plan.blocks:
        raise ServingError(f"{artifact.directory}: no MoE layer was built; is this a {family.display} checkpoint?")
    device = next(iter(plan.blocks.values())).experts.device
    from flexc.ir.backends import use_backend

    use_backend("auto", device)  # Triton kernels on CUDA, the op's CPU path elsewhere
    from flexc.serving.moe import replays_graphs

    self.flexc = BudgetControl(artifact, plan.blocks, graphs=replays_graphs(vllm_config))
    for block in plan.blocks.values():
        block.control = self.flexc
    self._flexc_prefixes = {block.prefix + ".": block for block in plan.blocks.values()}
    self._flexc_initial = artifact.budget


def _flexc_load_weights(self, base: type, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
    if self.flexc is None:
        return base.load_weights(self, weights)
    loaded: set[str] = set()

    def others() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            if name == _WIDTHS_TENSOR and self.flexc.kind == "nested":
                continue  # flexc_widths.safetensors: read from the artifact by BudgetControl
            if name.startswith(QUANT_SCALES_PREFIX) and self.flexc.kind == "nested":
                continue  # a quantized nested artifact's scales: its weights are stored dequantized
            block = next((b for p, b in self._flexc_prefixes.items() if name.startswith(p)), None)
            if block is None:
                yield name, tensor
            else:
                filled = block.load(name[len(block.prefix) + 1:], tensor, name)
                loaded.add(f"{block.prefix}.{filled}")

    loaded |= set(base.load_weights(self, others()))
    loaded |= {f"{b.prefix}.experts.{name}" for b in self._flexc_prefixes.values()
               for name in getattr(b.experts, "filled", ())}
    missing = [f"{b.prefix}.experts: {m}" for b in self._flexc_prefixes.values() for m in b.experts.missing()]
    if missing:
        raise ServingError(f"{self.flexc.directory}: the checkpoint lacks expert weights: {missing[:6]}"
                           + (f" and {len(missing) - 6} more" if len(missing) > 6 else ""))
    if self.flexc.kind == "nested":
        keep = 1.0 if self._flexc_initial is None else self._flexc_initial
        seconds = self.flexc.set(keep)
        logger.info("flexc: serving %s at keep %g (budgets %s; switched in %.2f ms)", self.flexc.directory, keep,
                    self.flexc.budgets, seconds * 1e3)
    return loaded


def _model_class(family: ServedFamily) -> type:
    module = importlib.import_module(family.vllm_module)
    base = getattr(module, family.architecture)

    def __init__(self, *, vllm_config, prefix: str = ""):
        _flexc_init(self, base, family, vllm_config, prefix)

    def load_weights(self, weights):
        return _flexc_load_weights(self, base, weights)

    name = "Flexc" + family.architecture
    return type(base)(name, (base,), {
        "__init__": __init__,
        "load_weights": load_weights,
        "__module__": __name__,
        "__qualname__": name,
        "__doc__": f"vLLM's {family.architecture} serving flexc nested/sliced artifacts (stock otherwise).",
    })


class FlexcUnservedSliced(torch.nn.Module):
    """Registered for sliced checkpoints of MoE families the plugin does not serve: vLLM would
    otherwise load them through its Transformers backend and drop the packed experts."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        served = ", ".join(f.display for f in FAMILIES.values())
        raise ServingError(f"{vllm_config.model_config.model}: a flexc sliced checkpoint of "
                           f"{getattr(config, 'model_type', '?')!r}, which flexc's vLLM plugin does not serve "
                           f"(it serves {served}); vLLM cannot load its packed experts. Load it with flexc.load "
                           "or transformers (trust_remote_code=True) instead.")

    # vLLM checks a text-generation model's interface before building it; __init__ refuses.
    def embed_input_ids(self, input_ids):
        raise ServingError("unreachable: FlexcUnservedSliced refuses to load")

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        raise ServingError("unreachable: FlexcUnservedSliced refuses to load")

    def compute_logits(self, hidden_states):
        raise ServingError("unreachable: FlexcUnservedSliced refuses to load")


def __getattr__(name: str):
    # FlexcQwen3MoeForCausalLM etc., built on first use (importing vLLM's model modules is slow).
    for family in FAMILIES.values():
        if name == "Flexc" + family.architecture:
            cls = _model_class(family)
            globals()[name] = cls
            return cls
    raise AttributeError(name)


__all__ = ["BudgetControl", "FlexcUnservedSliced"] + ["Flexc" + f.architecture for f in FAMILIES.values()]
