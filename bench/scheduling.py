"""Early stopping that compares like with like: ASHA run separately over the samples of each grid point.

Ray Tune's ``ASHAScheduler`` ranks every trial of a Tuner against every other at each rung. A sweep that tunes
several editors at once (``sweeps/tune_lr.yaml``: MEND, ENN and KE learning rates) would then stop a KE sample
because MEND's samples validate better, not because another KE learning rate did. :class:`PerPointASHA` keeps
one ASHA bracket per grid point (the trials drawn from one method x model x dataset x ... configuration, told
apart by ``TrialSpec.point_digest``), so a sample is only ever stopped by samples of the same point.

Imported by ``bench.run`` only when a sweep has a scheduler (it needs Ray Tune).
"""

from __future__ import annotations

from typing import Any, Callable

from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler


class PerPointASHA(FIFOScheduler):
    """ASHA (asynchronous successive halving) per group of trials; ``group_of(trial)`` names a trial's group.

    Promises: a trial's CONTINUE/STOP decision depends only on results of trials of its own group, exactly as a
    separate ``ASHAScheduler(**asha)`` over that group alone would decide; trials run first-come first-served.
    Results without the metric (editors that never validate) always continue, as in ASHA.
    """

    def __init__(self, group_of: Callable[[Trial], str], *, metric: str, mode: str, **asha: Any) -> None:
        super().__init__()
        self._group_of = group_of
        self._asha_args = {"metric": metric, "mode": mode, **asha}
        self._metric = metric
        self._mode = mode
        self._groups: dict[str, ASHAScheduler] = {}

    def _of(self, trial: Trial) -> ASHAScheduler:
        group = self._group_of(trial)
        if group not in self._groups:
            self._groups[group] = ASHAScheduler(**self._asha_args)
        return self._groups[group]

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        """Metric and mode are fixed at construction; Tune's own (none in this suite) must not contradict them."""
        return (metric in (None, self._metric)) and (mode in (None, self._mode))

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        self._of(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict) -> str:
        return self._of(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: dict) -> None:
        self._of(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller: Any, trial: Trial) -> None:
        self._of(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        stopped = sum(s._num_stopped for s in self._groups.values())
        return f"ASHA per grid point: {len(self._groups)} point(s), {stopped} trial(s) stopped"
