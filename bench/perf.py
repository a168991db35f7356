"""``python -m bench.perf``: speed and memory of editors as ratios measured in one run.

```
python -m bench.perf --model smollm2-135m [--batch-size B] [--repeats N] [--ft-steps K] --out perf.json
python -m bench.perf --model smollm2-135m --values 10 [--repeats N] --out values.json
```

Reports (JSON keys in brackets), medians of ``--repeats`` repetitions after warm-up:
- MEND edit latency / one full forward+backward of the base model (every parameter) on the same tokens
  [``ratio.mend_edit``], target <= 1.0;
- a MEND training step / the sum of its component passes (edit fwd+bwd, edited fwd+bwd on x'_e, fwd on x_loc
  before and after) [``ratio.mend_train_step``], target <= 1.25;
- FT edit latency with K steps / K forward+backwards to the edited weights [``ratio.ft_edit``], target <= 1.1;
- peak memory of a MEND training step and of an edit [``mem.mend_train_mb``, ``mem.mend_edit_mb``], and for
  every other learned editor its training step [``mem.<name>_train_mb``] with ratios to MEND, each measured in a
  fresh subprocess (CPU: resident high-water mark above the start; CUDA: max_memory_allocated).

With ``--values N`` it measures only the value optimisation of ROME / MEMIT (``methods.values``) on N CounterFact
facts, at ROME's settings for the model: the authors' one-fact-at-a-time loop against all N facts optimised together,
per fact [``abs.values_loop_per_fact_s``, ``abs.values_batched_per_fact_s``, ``ratio.values_batched_speedup``,
target >= 5], with the largest relative difference between the two results' vectors and whether every fact took
the same steps [``values_max_rel_diff``, ``values_same_steps``].
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console
from rich.table import Table

from bench import cli
from bench.data import edit_batch, equiv_batch, load_task, loc_batch
from bench.losses import kl_div, loc_mask, nll
from bench.memory import PeakMemory, keep_freed_memory
from bench.models import ModelSpecError, load_model, resolve_model_source
from methods import REGISTRY, get_editor
from methods.base import gradient_factors
from methods.ft import FT
from methods.learned import make_adam

log = logging.getLogger("bench.perf")

TARGETS = {"ratio.mend_edit": 1.0, "ratio.mend_train_step": 1.25, "ratio.ft_edit": 1.1}
#: Targets a measurement must reach or exceed.
MIN_TARGETS = {"ratio.values_batched_speedup": 5.0}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_time(fn: Callable[[], Any], repeats: int, warmup: int, device: torch.device) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls after ``warmup`` calls."""
    return timed(fn, repeats, warmup, device)[0]


def timed(fn: Callable[[], Any], repeats: int, warmup: int, device: torch.device) -> tuple[float, Any]:
    """:func:`median_time` of ``fn`` and the result of its last call."""
    for _ in range(warmup):
        fn()
    times, out = [], None
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _setup(model_name: str, batch_size: int, device: str, method: str = "mend", hparams: dict | None = None
           ) -> tuple[Any, list, Any, Any, Any, Any]:
    """The model, the first ``batch_size`` zsRE test records, an untrained ``method`` editor and the records'
    edit, equivalence and locality batches."""
    model = load_model(model_name, device=device)
    recs = load_task("zsre", seed=0)["test"][:batch_size]
    editor = get_editor(method)(model, hparams or {})
    return model, recs, editor, edit_batch(model, recs), equiv_batch(model, recs), loc_batch(model, recs)


def _train_step_fn(editor: Any, recs: list) -> Callable[[], None]:
    """One Alg. 1 step exactly as LearnedEditor.fit takes it (loss, backward, clipping, Adam)."""
    params = [p for g in editor.param_groups() for p in g["params"]]
    opt = make_adam(editor.param_groups())
    editor.train(True)

    def step() -> None:
        loss = editor._losses(recs)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, editor.hparams.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def memory_child(model_name: str, method: str, what: str, batch_size: int, device: str) -> float:
    """Peak MB of one MEND/ENN/KE training step (``what='train'``) or one edit (``'edit'``) in this process."""
    model, recs, editor, eb, _, _ = _setup(model_name, batch_size, device, method)
    if what == "train":
        fn = _train_step_fn(editor, recs)
    else:
        editor.train(False)

        def fn() -> None:
            editor.edit(eb)

    fn()  # warm-up: allocator pools, optimizer state
    with PeakMemory(model.device) as mem:
        fn()
    return mem.mb


def _memory_subprocess(model: str, method: str, what: str, batch_size: int, device: str) -> float:
    out = subprocess.run(
        [sys.executable, "-m", "bench.perf", "--model", model, "--batch-size", str(batch_size), "--device", device,
         "--memory-child", f"{method}:{what}"],
        capture_output=True, text=True, timeout=1800,
    )
    if out.returncode != 0:
        raise RuntimeError(f"memory probe {method}:{what} failed: {out.stderr.strip().splitlines()[-1:]}")
    return float(out.stdout.strip().splitlines()[-1])


def _edit_times(model: Any, mend: Any, eb: Any, repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds of a full forward+backward, one over the edited weights only (deltas), and a MEND edit."""
    dev = model.device

    def full_fwd_bwd() -> None:
        params = list(model.model.parameters())
        for p in params:
            p.requires_grad_(True)
        try:
            nll(model.logits(eb.inputs), eb.labels).backward()
        finally:
            for p in params:
                p.requires_grad_(False)
                p.grad = None

    deltas0 = {n: torch.zeros_like(w) for n, w in model.weights().items()}
    out = {"full": median_time(full_fwd_bwd, repeats, warmup, dev),
           "edit_fb": median_time(lambda: nll(model.logits(eb.inputs, {n: d.clone().requires_grad_() for n, d
                                                                        in deltas0.items()}), eb.labels).backward(),
                                  repeats, warmup, dev)}
    mend.train(False)
    out["mend_edit"] = median_time(lambda: mend.edit(eb), repeats, warmup, dev)
    return out


def _training_times(model: Any, mend: Any, recs: Any, eb: Any, qb: Any, lb: Any, repeats: int, warmup: int
                    ) -> dict[str, float]:
    """Median seconds of a MEND training step and of the passes it is made of (the edit's factor capture, the
    equivalence pass, the locality passes before and after)."""
    dev = model.device
    deltas0 = {n: torch.zeros_like(w) for n, w in model.weights().items()}
    with torch.no_grad():
        pre = model.logits(lb.inputs)
    lmask = loc_mask(lb.inputs, lb.labels, model.kind)
    out = {"step": median_time(_train_step_fn(mend, recs), repeats, warmup, dev)}
    mend.train(False)

    def fwd_bwd(batch: Any) -> None:
        nll(model.logits(batch.inputs, {n: d.clone().requires_grad_() for n, d in deltas0.items()}),
            batch.labels).backward()

    def loc_before() -> None:
        with torch.no_grad():
            model.logits(lb.inputs)

    def loc_after_fwd_bwd() -> None:
        ds = {n: d.clone().requires_grad_() for n, d in deltas0.items()}
        kl_div(pre, model.logits(lb.inputs, ds), lmask).backward()

    out["capture"] = median_time(lambda: gradient_factors(model, eb), repeats, warmup, dev)
    out["equiv"] = median_time(lambda: fwd_bwd(qb), repeats, warmup, dev)
    out["loc_pre"] = median_time(loc_before, repeats, warmup, dev)
    out["loc_post"] = median_time(loc_after_fwd_bwd, repeats, warmup, dev)
    return out


def run(model_name: str, batch_size: int, repeats: int, warmup: int, ft_steps: int, device: str) -> dict[str, Any]:
    """Every absolute time and ratio of :data:`TARGETS` on ``model_name``, measured in this one run, and the
    training and edit memory of each learned editor (one subprocess each)."""
    model, recs, mend, eb, qb, lb = _setup(model_name, batch_size, device)
    dev = model.device
    res: dict[str, Any] = {"model": model_name, "batch_size": batch_size, "repeats": repeats,
                           "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else f"cpu x{torch.get_num_threads()}",
                           "n_edit_tokens": int(eb.inputs["attention_mask"].sum())}
    t = _edit_times(model, mend, eb, repeats, warmup)
    c = _training_times(model, mend, recs, eb, qb, lb, repeats, warmup)
    components = c["capture"] + c["equiv"] + c["loc_pre"] + c["loc_post"]
    ft = FT(model, {"optimizer": "rmsprop", "lr": 1e-5, "max_steps": ft_steps, "early_stop": False})
    t_ft = median_time(lambda: ft.edit(eb), repeats, warmup, dev)
    res.update({
        "abs.full_fwd_bwd_s": t["full"],
        "abs.edit_params_fwd_bwd_s": t["edit_fb"],
        "abs.mend_edit_s": t["mend_edit"],
        "abs.mend_train_step_s": c["step"],
        "abs.mend_components_s": components,
        "abs.component.edit_fwd_bwd_s": c["capture"],
        "abs.component.equiv_fwd_bwd_s": c["equiv"],
        "abs.component.loc_fwd_before_s": c["loc_pre"],
        "abs.component.loc_fwd_bwd_after_s": c["loc_post"],
        "abs.ft_edit_s": t_ft,
        "ft_steps": ft_steps,
        "ratio.mend_edit": t["mend_edit"] / t["full"],
        "ratio.mend_train_step": c["step"] / components,
        "ratio.ft_edit": t_ft / (ft_steps * t["edit_fb"]),
    })
    del mend, ft
    res["mem.mend_train_mb"] = _memory_subprocess(model_name, "mend", "train", batch_size, device)
    res["mem.mend_edit_mb"] = _memory_subprocess(model_name, "mend", "edit", batch_size, device)
    for name, cls in sorted(REGISTRY.items()):
        if cls.learned and name != "mend":
            res[f"mem.{name}_train_mb"] = _memory_subprocess(model_name, name, "train", batch_size, device)
            res[f"ratio.mend_over_{name}_train_mem"] = res["mem.mend_train_mb"] / max(res[f"mem.{name}_train_mb"], 1e-9)
    return res


def value_times(model_name: str, n: int, repeats: int, warmup: int, device: str) -> dict[str, Any]:
    """The value optimisation of ``n`` CounterFact facts at ROME's settings for the model: one fact at a time
    (the authors' loop, :func:`methods.values.optimise_value`) against all together
    (:func:`methods.values.optimise_values`), per fact, and how far the two results' vectors differ."""
    from methods.values import optimise_value, optimise_values

    model = load_model(model_name, device=device)
    recs = list(load_task("counterfact", seed=0, sizes={"test": n})["test"][:n])
    rome = get_editor("rome")(model, {})
    module, templates, hp = model.mlp_out(rome.layer), rome.templates(), rome.hparams
    dev = model.device
    loop, alone = timed(lambda: [optimise_value(model, module, r, templates, hp) for r in recs], repeats, warmup, dev)
    batched, together = timed(lambda: optimise_values(model, module, recs, templates, hp), repeats, warmup, dev)
    diff = max(float((a.target - b.target).norm() / a.target.norm()) for a, b in zip(alone, together))
    return {"model": model_name, "batch_size": n, "repeats": repeats,
            "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else f"cpu x{torch.get_num_threads()}",
            "values_templates": len(templates), "values_steps": sum(v.steps + 1 for v in alone),
            "abs.values_loop_per_fact_s": loop / n, "abs.values_batched_per_fact_s": batched / n,
            "ratio.values_batched_speedup": (loop / n) / (batched / n), "values_max_rel_diff": diff,
            "values_same_steps": [v.steps for v in alone] == [v.steps for v in together]}


def _print(res: dict[str, Any]) -> None:

    t = Table(title=f"bench.perf: {res['model']}, batch {res['batch_size']}, {res['device']}")
    for c in ("key", "value", "target"):
        t.add_column(c)
    for k, v in res.items():
        target = TARGETS.get(k)
        val = f"{v:.4g}" if isinstance(v, float) else str(v)
        floor = MIN_TARGETS.get(k)
        if floor is not None:
            t.add_row(k, val, f">= {floor}" + (" ok" if v >= floor else " MISSED"))
            continue
        t.add_row(k, val, "" if target is None else f"<= {target}" + (" ok" if v <= target else " MISSED"))
    Console(width=120).print(t)


def check_device(device: str) -> str | None:
    """None when torch can run on ``device`` here, else why not (one line)."""
    if device == "cpu":
        return None
    m = re.fullmatch(r"cuda(?::(\d+))?", device)
    if m is None:
        return f"--device {device!r}: unknown; valid: cpu, cuda, cuda:N"
    if not torch.cuda.is_available():
        return f"--device {device}: no CUDA device is visible here; use --device cpu"
    if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
        return f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here (cuda:0..)"
    return None


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser("python -m bench.perf", __doc__,
                    {0: "measured (targets missed are marked MISSED, not an error)",
                     2: "unknown model or device, a bad count, or an unwritable --out (one line, before measuring)"},
                    "python -m bench.perf --model smollm2-135m --batch-size 1 --repeats 5 --out perf.json")
    ap.add_argument("--model", default="smollm2-135m", help="alias, local folder or Hugging Face id")
    ap.add_argument("--batch-size", type=int, default=1, help="edits per request")
    ap.add_argument("--repeats", type=int, default=7, help="timed repetitions (the median is reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed repetitions first")
    ap.add_argument("--ft-steps", type=int, default=5, help="FT optimiser steps per edit")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--values", type=int, default=0, metavar="N",
                    help="measure only ROME/MEMIT's value optimisation: N facts batched against one at a time "
                         "(default 0: the editors' ratios instead)")
    ap.add_argument("--out", type=Path, default=None, help="JSON file for the results (default: print only)")
    ap.add_argument("-v", "--verbose", action="store_true", help="show tracebacks of errors")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for name in ("batch_size", "repeats", "ft_steps"):
        if getattr(args, name) < 1:
            return cli.fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        return cli.fail(f"--warmup must be >= 0, got {args.warmup}")
    if args.values < 0:
        return cli.fail(f"--values must be >= 0 (0: the editors' ratios instead), got {args.values}")
    bad_device = check_device(args.device)
    if bad_device:
        return cli.fail(bad_device)
    try:
        resolve_model_source(args.model)
        if args.out is not None:  # checked before minutes of measuring, not after
            cli.check_writable_file(args.out, "--out")
    except (ModelSpecError, cli.UserError) as e:
        return cli.report_user_error(e, args.verbose)

    keep_freed_memory()  # as in a trial: the ratios measure the allocator the sweeps run with
    if args.memory_child:
        method, what = args.memory_child.split(":")
        print(memory_child(args.model, method, what, args.batch_size, args.device))
        return 0
    try:
        res = (value_times(args.model, args.values, args.repeats, args.warmup, args.device) if args.values else
               run(args.model, args.batch_size, args.repeats, args.warmup, args.ft_steps, args.device))
    except (ModelSpecError, OSError) as e:  # a Hub id that cannot be fetched offline, say
        return cli.report_user_error(e, args.verbose)
    _print(res)
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
