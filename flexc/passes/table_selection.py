"""The held-out check that chooses each budget's width table in ``anneal``'s track schedule.

The candidates (the trained table, fitted to the budget, and the one-shot tables: the warm start
and the unconstrained ``coverage`` table where it nests) are scored on held-out text from
documents no training batch came from (:func:`split_by_document`, :func:`held_out_text`). The
one-shot candidate with the lower held-out loss is the fallback; the trained table replaces it
only if its loss is lower by more than ``z`` standard errors of the per-sequence paired
difference (and, ``loss: both``, its next-token loss is not higher). The text is read in parts
(:func:`look_ends`): the check stops at the first look that decides it at ``early_z`` standard
errors. Options: :class:`flexc.passes.anneal_options.Selection`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from flexc.passes.action_gates import set_modes
from flexc.passes.anneal_options import EARLY_LOOKS, Selection
from flexc.passes.distill import TeacherTargets, distill_kl
from flexc.utils import distributed


def held_out_text(calibration, count: int, required: bool, logger) -> list[torch.Tensor]:
    """``selection.samples``: ``count`` sequences from the documents after the calibration set's in its own source
    (``required``: set in the spec, so a source without them is an error; else what there is)."""
    following = getattr(calibration, "following", None)  # a CalibrationSet, or one loaded into memory
    if following is None:
        if not required:  # batches given directly (an API caller's): nothing to read past them
            return []
        raise ValueError("anneal: selection.samples reads the sequences that follow the calibration set in "
                         "data.calibration; this run's calibration batches were given directly, with no source "
                         "to read more from")
    batches = following(count, strict=required)
    found = sum(len(b) for b in batches)
    if found < count:
        logger.warning("anneal: the calibration source has %d sequences after the calibration set, not the %d "
                       "selection.samples asks for; the held-out check reads those %d", found, count, found)
    return batches


def split_by_document(batches: list[torch.Tensor], training: int, calibration, logger) -> list[torch.Tensor]:
    """The calibration batches with the held-out ones (``batches[training:]``) cut to the windows whose
    documents no training batch touched. Batches given directly (no document record), or a set that
    is one document (a single text file), are split by contiguous spans as they are."""
    spans = getattr(calibration, "window_documents", None)
    spans = spans() if spans is not None else None
    if not spans or spans[-1][1] == spans[0][0]:
        return batches
    boundary = spans[sum(len(b) for b in batches[:training]) - 1][1]  # the last training window's last document
    out, offset, dropped = list(batches[:training]), sum(len(b) for b in batches[:training]), 0
    for batch in batches[training:]:
        keep = [r for r in range(len(batch)) if spans[offset + r][0] > boundary]
        offset += len(batch)
        dropped += len(batch) - len(keep)
        if keep:
            out.append(batch[keep])
    if dropped:
        logger.info("anneal: %d held-out calibration sequences share a document with a training batch; the "
                    "held-out check leaves them out", dropped)
    return out


def sequence_losses(kind: str, student: torch.Tensor, teacher: TeacherTargets | None,
                    ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[batch]`` each: the quality loss and the next-token loss of every sequence (means over its
    positions), from one normalisation of the logits (the vocabulary-wide work of a held-out check)."""
    logp = F.log_softmax(student.float(), dim=-1)
    next_token = -logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1).mean(-1)
    return (next_token if kind == "next_token" else distill_kl(logp, teacher, reduction="none").mean(-1)), next_token


def look_ends(sizes: list[int], shares) -> list[int]:
    """The held-out check's looks, for batches of ``sizes`` sequences: the number of batches that
    first hold each of ``shares`` of the sequences (increasing, short of all), then all of them."""
    total, ends = sum(sizes), []
    for share in shares:
        seen, k = 0, 0
        while seen < share * total:
            seen, k = seen + sizes[k], k + 1
        if (not ends or k > ends[-1]) and k < len(sizes):
            ends.append(k)
    return ends + [len(sizes)]


class HeldOutCheck:
    """Scores a phase's candidate tables on its held-out batches and chooses one."""

    def __init__(self, options: Selection, quality: str):
        self.options = options
        self.quality = quality  # the anneal's quality term: "distill" or "next_token"

    def choose(self, setup, record: dict, trained: torch.Tensor, one_shot: dict, same: str | None,
               val: list[int]) -> dict:
        """``record`` (the trained table's) completed with the choice among ``trained`` and the one-shot
        tables ``one_shot`` (``same``: the one the trained table equals, if any) on the held-out
        batches ``val``: the chosen ``levels``, ``how`` it was chosen and the held-out losses."""
        opts = self.options
        scored = list(one_shot) + (["trained"] if same is None else [])
        tables = {**one_shot, "trained": trained}
        held_out: dict = {}
        done = 0
        for end in self.looks(setup, val):  # read the held-out batches up to each look until one decides
            part = {name: self.table_losses(setup, tables[name], val[done:end]) for name in scored}
            held_out = {name: {k: torch.cat([held_out[name][k], v]) if held_out else v for k, v in losses.items()}
                        for name, losses in part.items()}
            done = end
            final = end == len(val)
            verdict = self.verdict(held_out, list(one_shot), same,
                                    opts.z if final else opts.early_z, final=final)
            if verdict is not None:
                break
        read = len(next(iter(held_out.values()))["quality"])
        if same is not None:
            held_out["trained"] = held_out[same]
        ranked_on = "next_token" if opts.loss == "next_token" else "quality"
        losses = {name: float(v[ranked_on].mean()) for name, v in held_out.items()}
        record["validation_loss"] = losses
        record["held_out_read"] = read
        record["validation_next_token"] = {name: float(v["next_token"].mean()) for name, v in held_out.items()}
        # Each candidate's widths, so an evaluation on other documents can score the same tables
        # (flexc.compiler.held_out_check: how far the check and the evaluation text disagree).
        record["candidate_widths"] = {name: setup.widths(tables[name]).tolist() for name in held_out}
        if "difference" in verdict:
            record["validation_difference"] = verdict["difference"]
        choice = record["chosen"] = verdict["choice"]
        early = f" on the first {read} of {record['held_out_sequences']} held-out sequences" if read < \
            record["held_out_sequences"] else ""
        labels = {"trained": "trained table", "warm_start": "warm start", "coverage": "unconstrained coverage table"}
        if choice == "trained":
            notes = [] if same is None else [f"same table as the {labels[same]}"]
            if early:
                notes.append(f"{'won' if same is None else 'decided'}{early}")
            record["how"] = f"trained ({'; '.join(notes)})" if notes else "trained"
        else:
            names = {"warm_start": "warm start", "coverage": "coverage, unconstrained"}
            beaten = [labels[n] for n in losses if n != choice and losses[n] > losses[choice]]
            if len(beaten) == len(losses) - 1:
                why = f"lower held-out loss than the {' and the '.join(beaten)}{early}"
            elif verdict.get("lost_on_text"):
                why = f"the trained table's held-out next-token loss was higher{early}"
            else:
                why = f"the trained table's held-out loss was not lower by {opts.z:g} standard errors"
            record.update(levels=one_shot[choice], how=f"{names[choice]} ({why})")
        return record

    def table_losses(self, setup, levels: torch.Tensor, batches: list[int]) -> dict[str, torch.Tensor]:
        """Per-sequence held-out losses of the given calibration batches under the fixed table ``levels``:
        ``"quality"`` (the loss's quality term) and ``"next_token"``, every rank's sequences in one
        process's order (each rank fills its own places; the sum over ranks fills them all)."""
        widths = setup.widths(levels).to(torch.int32)
        for gate, row in zip(setup.gates, widths):
            gate.table = row
        set_modes(setup.gates, "table")
        out = torch.zeros(2, sum(setup.rows[i][1] for i in batches), dtype=torch.float64)
        offset = 0
        with torch.no_grad():
            for i, logits in zip(batches, setup.model.logits(setup.batches[i] for i in batches)):
                ids, (share, rows) = setup.batches[i], setup.rows[i]
                mine = slice(offset + share.start, offset + share.stop)
                quality, next_token = sequence_losses(self.quality, logits, setup.teachers[i], ids)
                out[0, mine], out[1, mine] = quality.double(), next_token.double()
                offset += rows
        for gate in setup.gates:
            gate.table = None
        distributed.all_reduce_sum(out, "the held-out losses")
        return {"quality": out[0], "next_token": out[1]}

    def looks(self, setup, val: list[int]) -> list[int]:
        """How many of the held-out batches ``val`` are read at each look of the check (see
        :func:`look_ends`; one look at the end without ``early_z``)."""
        if self.options.early_z is None:
            return [len(val)]
        return look_ends([setup.rows[i][1] for i in val], EARLY_LOOKS)

    def verdict(self, held_out: dict, one_shot: list[str], same: str | None, z: float,
                 final: bool = False) -> dict | None:
        """The held-out check on the sequences read so far: ``{"choice": name, ...}``, or (not
        ``final``: an early look) None where they do not decide it at ``z`` standard errors yet.

        The fallback is the one-shot candidate with the lower loss; the trained table replaces it if
        its loss is lower by more than ``z`` standard errors of the per-sequence paired difference
        and (``loss: both``) its next-token loss is not higher. At an early look a choice
        needs every comparison it rests on to be past ``z`` standard errors: between the one-shot
        candidates, and the trained table against the fallback (winning on both losses, or losing
        on one)."""
        opts = self.options
        ranked_on = "next_token" if opts.loss == "next_token" else "quality"

        def paired(a: str, b: str, loss: str) -> tuple[float, float]:  # mean and standard error of a - b
            diff = held_out[a][loss] - held_out[b][loss]
            return float(diff.mean()), float(diff.std() / math.sqrt(len(diff))) if len(diff) > 1 else 0.0

        fallback = min(one_shot, key=lambda name: float(held_out[name][ranked_on].mean()))  # ties: the warm start
        if not final and len(one_shot) > 1:
            mean, se = paired(one_shot[0], one_shot[1], ranked_on)
            if abs(mean) <= z * se:
                return None
        if same is not None:
            return {"choice": "trained" if same == fallback else fallback}
        mean, se = paired("trained", fallback, ranked_on)
        out = {"difference": {"against": fallback, "mean": mean, "standard_error": se}}
        wins = mean < min(0.0, -z * se)
        loses = mean > z * se
        if opts.loss == "both":  # it must not lose on the text itself either
            text_mean, text_se = paired("trained", fallback, "next_token")
            if final:
                out["lost_on_text"] = wins and text_mean > 0
                wins = wins and not out["lost_on_text"]
            else:
                out["lost_on_text"] = text_mean > z * text_se
                wins, loses = wins and text_mean < 0, loses or out["lost_on_text"]
        if wins:
            return {**out, "choice": "trained"}
        if final or loses:
            return {**out, "choice": fallback}
        return None
