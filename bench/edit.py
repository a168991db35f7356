"""``python -m bench.edit``: the paper's Table 2, interactive, from a trained editor logged by a sweep.

```
python -m bench.edit --run RUN_ID --prompt "Who is the UK PM?" --target "Boris Johnson" \\
    [--probe "Who leads the UK government?"]... [--then "PROMPT=TARGET"]... [--tracking-uri URI]
```

Loads the run's model and editor (with its checkpoint, for learned editors), prints the model's output for the
prompt and every probe before the edit, applies the edit, and prints them after it (greedy generation for
causal/seq2seq models, the label for classifiers). ``--then`` chains further edits in sequence: each is computed
on the already-edited model (``EditableModel.applying``, as sequential sweeps do; no weight is modified in place)
and composed with the previous ones.
"""

from __future__ import annotations

import ast
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from bench import cli
from bench.data import DataError, EditRecord, TaskKind, collate, load_card, task_kind
from bench.generation import greedy
from bench.models import ModelSpecError, load_model
from bench.schema import Param
from bench.tracking import TrackingError, check_tracking_uri, client, default_tracking_uri
from methods import get_editor
from methods.base import Edit

log = logging.getLogger(__name__)


class EditCliError(ValueError):
    """A run that cannot be used for interactive editing; the message says why."""


@torch.no_grad()
def generate(model: Any, prompt: str, deltas: Mapping[str, Tensor] | None, max_new_tokens: int = 20) -> str | int:
    """Greedy output of the (edited) model: generated text, or the label id of a classifier (its output head
    gives one label per text, decoders generate; causal models through :func:`bench.generation.greedy`)."""
    tok = model.tokenizer
    if model.kind == "classifier":
        enc = tok([prompt], return_tensors="pt").to(model.device)
        return int(model.logits(dict(enc), deltas)[0, 0].argmax())
    eos = tok.eos_token_id
    if model.kind == "seq2seq":
        enc = tok([prompt], return_tensors="pt").to(model.device)
        start = model.model.config.decoder_start_token_id
        dec = torch.tensor([[start]], device=model.device)
        for _ in range(max_new_tokens):
            logits = model.logits({**enc, "decoder_input_ids": dec}, deltas)
            nxt = int(logits[0, -1].argmax())
            if nxt == eos:
                break
            dec = torch.cat([dec, torch.tensor([[nxt]], device=model.device)], 1)
        return tok.decode(dec[0, 1:], skip_special_tokens=True).strip()
    return greedy(model, [prompt], max_new_tokens, deltas, stops=())[0]  # KV-cached, stops at EOS only


def _run_params(c: Any, uri: str, run_id: str) -> tuple[dict[str, str], Any]:
    """The params of trial run ``run_id`` and its editor class; :class:`EditCliError` for an unknown run or one
    that is not a trial."""
    from mlflow.exceptions import MlflowException  # heavy: MLflow loads only when a run is read

    try:
        run = c.get_run(run_id)
    except MlflowException:
        raise EditCliError(f"unknown run id {cli.clip(run_id)} in {uri}") from None
    p = dict(run.data.params)
    if Param.METHOD_CLASS not in p:
        raise EditCliError(f"run {run_id} is not a trial run (no method param)")
    return p, get_editor(p[Param.METHOD_CLASS])


def _typed(v: str) -> Any:
    """A param as logged (``str(value)``) back to its value: numbers, booleans and lists (ROME's layers) are
    Python literals; anything else stays text."""
    try:
        return ast.literal_eval(v)
    except (ValueError, SyntaxError):
        return v


def _check_subject(cls: Any, chain: list[tuple[str, str]] | None, subject: str | None) -> None:
    """Editors that locate a subject (ROME, MEMIT) need ``--subject``, and it must occur in every edited prompt."""
    if not cls.needs_subject or chain is None:
        return
    if not subject:
        raise EditCliError(f"--subject: {cls.name} needs the subject of the edit (the words of --prompt it is "
                           f"about, e.g. --subject 'UK')")
    lost = [pr for pr, _ in chain if subject.lower() not in pr.lower()]
    if lost:
        raise EditCliError(f"--subject {cli.clip(subject)} does not occur in {cli.clip(lost[0])}; every edited "
                           f"prompt must contain it")


def load_editor_from_run(uri: str, run_id: str, chain: list[tuple[str, str]] | None = None,
                         subject: str | None = None) -> tuple[Any, Any, TaskKind]:
    """(EditableModel, editor, the run's task kind) rebuilt from an MLflow trial run and its ``editor`` checkpoint
    artifact. For editors that locate a subject (``needs_subject``: ROME, MEMIT), ``subject`` must be given and
    occur in every prompt of ``chain`` (checked before any weight is loaded)."""
    c = client(uri)
    p, cls = _run_params(c, uri, run_id)
    has_ckpt = any(a.path == "editor" for a in c.list_artifacts(run_id))
    if cls.learned and not has_ckpt:
        raise EditCliError(f"run {run_id} ({cls.name}) has no editor checkpoint artifact to load")
    _check_subject(cls, chain, subject)
    try:
        kind = task_kind(load_card(p.get(Param.DATASET, "")).kind)
    except DataError as e:
        raise EditCliError(f"run {run_id}: its dataset's task kind is unknown here ({e})") from None
    if cls.uses_training_data_at_edit_time:
        raise EditCliError(f"run {run_id}: {cls.name} needs training data at edit time; use ft or a "
                           "learned editor's run")
    edit_params = p[Param.EDIT_PARAMS].split(",") if p.get(Param.EDIT_PARAMS) else None
    try:  # tasks with a prepared base model (FEVER) edit that model, not the raw alias
        model = load_model(p.get(Param.BASE_MODEL_PATH, p[Param.MODEL]), edit_params)
    except (ModelSpecError, OSError) as e:
        raise EditCliError(f"run {run_id}: its model cannot be loaded here ({e})") from None
    model.name = p[Param.MODEL]
    prefix = f"{Param.HPARAMS}."
    hparams = {k[len(prefix):]: _typed(v) for k, v in p.items() if k.startswith(prefix)}
    editor = cls(model, hparams)  # pydantic turns the logged strings back into typed values
    if has_ckpt:
        with tempfile.TemporaryDirectory() as tmp:
            editor.load(Path(c.download_artifacts(run_id, "editor", tmp)))
    elif cls.has_fit_step:  # not learned: the fit step prepares what every edit reads (ROME's statistics, cached)
        log.info("%s: running its fit step (statistics are cached after the first time)", cls.name)
        editor.fit([], [])
    return model, editor, kind


def _parse(argv: list[str] | None) -> Any:
    ap = cli.parser("python -m bench.edit", __doc__,
                    {0: "edits shown", 2: "unknown run, no store, a run without a usable editor, or a bad option "
                                          "(one line)"},
                    'python -m bench.edit --run 0123abcd --prompt "Who is the UK PM?" --target "Boris Johnson"')
    ap.add_argument("--run", required=True, help="MLflow run id of a trial (see the MLflow UI)")
    ap.add_argument("--prompt", required=True, help="the edit input x_e")
    ap.add_argument("--target", required=True, help="new answer y_e (a label id for classifiers)")
    ap.add_argument("--probe", action="append", default=[], help="another input to show before/after (repeatable)")
    ap.add_argument("--then", action="append", default=[], metavar="PROMPT=TARGET",
                    help="a further edit, in order (repeatable)")
    ap.add_argument("--subject", default=None,
                    help="the subject the prompt is about (ROME/MEMIT locate it in every prompt of the chain); "
                         "default: none (needed by rome and memit runs)")
    ap.add_argument("--tracking-uri", default=None, help="MLflow store; default: sqlite:///./mlruns.db")
    ap.add_argument("--max-new-tokens", type=int, default=20, help="greedy tokens generated per output")
    ap.add_argument("-v", "--verbose", action="store_true", help="show tracebacks of errors")
    return ap.parse_args(argv)


def _chain(args: Any) -> list[tuple[str, str]]:
    """The edits asked for, in order: ``--prompt/--target`` then each ``--then``; :class:`cli.UserError` for an
    empty prompt, target or probe, a ``--then`` without ``=`` or a bad ``--max-new-tokens``."""
    chain = [(args.prompt, args.target)]
    for item in args.then:
        if "=" not in item:
            raise cli.UserError(f"--then {cli.clip(item)} must be PROMPT=TARGET")
        p, t = item.rsplit("=", 1)
        chain.append((p.strip(), t.strip()))
    for i, (p, t) in enumerate(chain):
        flag = "--prompt/--target" if i == 0 else f"--then #{i}"
        if not p.strip():
            raise cli.UserError(f"{flag}: the prompt is empty; give the text to edit")
        if not t.strip():
            raise cli.UserError(f"{flag}: the target is empty; give the new answer")
    if any(not p.strip() for p in args.probe):
        raise cli.UserError("--probe: an empty probe; give the text to show")
    if args.max_new_tokens < 1:
        raise cli.UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    return chain


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        chain = _chain(args)
    except cli.UserError as e:
        return cli.fail(str(e))
    try:
        uri = check_tracking_uri(args.tracking_uri or default_tracking_uri(), must_exist=True, writable=False)
        model, editor, kind = load_editor_from_run(uri, args.run, chain, args.subject)
        targets = []
        for _, t in chain:  # as the run's task kind takes a target (a label id for classification)
            try:
                targets.append(kind.parse_target(t, model))
            except ValueError as e:
                raise EditCliError(f"--target {cli.clip(t)}: {e}") from None
    except (EditCliError, TrackingError) as e:
        return cli.report_user_error(e, args.verbose)
    shown = [args.prompt, *args.probe, *[p for p, _ in chain[1:]]]

    def show(deltas: Mapping[str, Tensor] | None) -> None:
        for text in shown:
            print(f"  {text!r} -> {kind.show_answer(model, generate(model, text, deltas, args.max_new_tokens))!r}")

    print("before the edit:")
    show(None)
    total = Edit({})
    for i, ((prompt, target), tgt) in enumerate(zip(chain, targets)):
        rec = EditRecord(case_id=f"cli-{i}", task="cli", kind=kind.name, prompt=prompt, target=str(target),
                         subject=args.subject, label=tgt if isinstance(tgt, int) else None)
        batch = collate(model, [prompt], [tgt], records=[rec])  # typed answers follow the prompt after a space
        with model.applying(total.changes):  # sequential: edit the already-edited model (weights untouched)
            step = editor.edit(batch).detach()
        total = total + step
        print(f"after edit {i + 1} ({prompt!r} -> {target!r}):")
        show(total.changes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
