"""Sweep files: the schema, validation with one-line errors, and the trial plan (the grid).

A sweep is a grid over methods x models x datasets x seeds x edit batch sizes x each method's hyper-parameter
values (a YAML list is a grid axis), optionally with Tune search spaces (``{tune: loguniform, lower, upper}``)
sampled ``num_samples`` times. Everything here runs before Ray starts: a bad sweep never reaches a worker and
never leaves an MLflow run behind.

- :mod:`bench.config.schema`: the pydantic models (``Sweep``, ``TrialSpec``, ...) and :func:`load_sweep`;
- :mod:`bench.config.validate`: every check that needs no weights, returning the plan;
- :mod:`bench.config.plan`: grid points, drawn trials, digests, data shipped to cluster workers.
"""

from bench.config.plan import config_digest, data_files, dataset_files, digest, grid_axes, plan, sample, ship_data, trials
from bench.config.schema import (DatasetEntry, GenerateEntry, MethodEntry, ModelEntry, Resources, SchedulerEntry, Sweep,
                                 SweepError, TrialSpec, TuneSpec, load_sweep)
from bench.config.validate import validate

__all__ = [
    "DatasetEntry", "GenerateEntry", "MethodEntry", "ModelEntry", "Resources", "SchedulerEntry", "Sweep", "SweepError",
    "TrialSpec", "TuneSpec", "config_digest", "data_files", "dataset_files", "digest", "grid_axes", "load_sweep",
    "plan", "sample", "ship_data", "trials", "validate",
]
