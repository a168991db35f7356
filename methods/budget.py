"""A learned editor's training budget (steps, time, validation cadence, patience) and how a checkpoint is chosen
(lowest validation loss, or highest validation ES with a locality floor); the budget fields that name a training."""

from __future__ import annotations

from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator


class Budget(BaseModel):
    """Training budget of a learned editor (ignored by editors that need no training); the sweep file's
    ``methods[].budget`` is validated against this model (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    max_steps: PositiveInt = 1000
    max_seconds: float | None = Field(default=None, gt=0)
    val_every: PositiveInt = 50
    val_edits: PositiveInt = 50
    patience: PositiveInt = 5
    batch_size: PositiveInt = 1
    grad_accum: PositiveInt = 1
    #: Which validation chooses the checkpoint the editor keeps (and what patience counts).
    select: Literal["val_loss", "val_es"] = Field(
        default="val_loss",
        description="val_loss: the lowest c_edit * L_e + c_loc * L_loc, the authors' early-stop key (it keeps "
                    "an editor that does nothing whenever the edit term gains less than the locality term, zero "
                    "at step 0, loses); val_es: the highest validation ES (ties: lower val_loss) among "
                    "validations whose locality agreement is at least loc_floor")
    loc_floor: float | None = Field(
        default=None, ge=0.0, le=1.0,
        description="with select: val_es, the least validation locality agreement (share of locality positions "
                    "whose argmax is unchanged) a checkpoint needs to be chosen")

    @model_validator(mode="after")
    def _floor_needs_es(self) -> "Budget":
        if self.loc_floor is not None and self.select != "val_es":
            raise ValueError(f"loc_floor applies to select: val_es only (select is {self.select!r}): set select: "
                             "val_es or drop loc_floor")
        return self

    def selection(self) -> str:
        """The checkpoint selection in words, as runs record it (``editbench.fit_select``)."""
        if self.select == "val_loss":
            return "val_loss (lowest; the authors' key)"
        floor = f", loc_agree >= {self.loc_floor:g}" if self.loc_floor is not None else ""
        return f"val_es (highest{floor}; ties: lower val_loss)"

    def better(self, cur: Mapping[str, float], best: Mapping[str, float]) -> bool:
        """Whether validation ``cur`` is a better checkpoint than ``best`` under :attr:`select`."""
        if self.select == "val_es" and self.loc_floor is not None and cur.get("val_loc_agree", 1.0) < self.loc_floor:
            return False
        return selection_rank(self.select, cur) > selection_rank(self.select, best)


def selection_rank(select: str, validation: Mapping[str, float]) -> tuple[float, ...]:
    """How good a validation is as a checkpoint under ``select`` (``val_loss`` or ``val_es``; a
    :meth:`Budget.selection` text works too): higher is better."""
    if select.startswith("val_loss"):
        return (-validation["val_loss"],)
    return (validation["val_es"], -validation["val_loss"])


#: Budget fields added after digests were first taken: left out of a digest while at their default, so sweeps
#: that do not set them keep their config digests (``--resume``).
SELECTION_DEFAULTS: dict[str, Any] = {"select": "val_loss", "loc_floor": None}


def budget_digest_fields(budget: Mapping[str, Any]) -> dict[str, Any]:
    """``budget`` (a :class:`Budget` dump) without the selection fields that are at their default."""
    return {k: v for k, v in budget.items() if not (k in SELECTION_DEFAULTS and v == SELECTION_DEFAULTS[k])}
