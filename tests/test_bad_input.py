"""Every user error of the five commands is one line on stderr naming the culprit, exit code 2, no traceback, no
MLflow run left RUNNING and no store created where there was none. One parametrised case per bad input."""

from __future__ import annotations

import importlib
import json
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

from bench.data import EMBEDDED_ROOT
from tests.conftest import REPO

DATA = EMBEDDED_ROOT
BASE = {
    "name": "bad",
    "n_edits": 2,
    "models": ["tiny-gpt2"],
    "datasets": [{"name": "zsre", "n_train": 8, "n_val": 4}],
    "methods": [{"name": "ft", "hparams": {"lr": 1.0e-2, "max_steps": 2}}],
}
NO_GPU = not torch.cuda.is_available()


def sweep(**kw: object) -> dict:
    d = json.loads(json.dumps(BASE))
    d.update(kw)
    return d


def method(name: str = "ft", **hp: object) -> list[dict]:
    return [{"name": name, "hparams": hp}]


def write(tmp: Path, doc: object = None, raw: str | bytes | None = None, name: str = "sweep.yaml") -> str:
    p = tmp / name
    if isinstance(raw, bytes):
        p.write_bytes(raw)
    else:
        p.write_text(raw if raw is not None else yaml.safe_dump(doc))
    return str(p)


def _folder(tmp: Path, files: dict[str, str]) -> str:
    """A model folder holding ``files`` (name -> text), named by its content."""
    d = tmp / f"model-{abs(hash(tuple(sorted(files.items())))) % 10**8}"
    d.mkdir(exist_ok=True)
    for name, text in files.items():
        (d / name).write_text(text)
    return str(d)


def _records_file(tmp: Path, rows: list[dict]) -> dict:
    """A zsRE dataset entry whose test split is ``rows``, written to a file in ``tmp``."""
    f = tmp / "recs.json"
    f.write_text(json.dumps(rows))
    return {"name": "zsre", "n_train": 8, "n_val": 4, "paths": {"test": str(f)}}


def zsre_rows(n: int) -> list[dict]:
    return json.loads((DATA / "zsre" / "zsre_mend_800.json").read_text())[:n]


@dataclass
class Case:
    command: str                       # bench.<command>
    argv: Callable[[Path, str], list[str]]  # (tmp dir, existing store uri) -> arguments
    pattern: str                       # what the one line must say (regex)
    code: int = 2
    skip: bool = False


def run_case(doc: object = None, raw: str | bytes | None = None, extra: tuple[str, ...] = ()) -> Callable:
    return lambda tmp, store: [write(tmp, doc, raw), *extra]


# 532 bytes of YAML that expand to 9^6 strings: the value must be echoed clipped, not as megabytes.
BOMB = "description: [&a [x, x, x, x, x, x, x, x, x], " + ", ".join(
    f"&{c} [{', '.join([f'*{p}'] * 9)}]" for p, c in zip("abcde", "bcdef")) + "]\n"

CASES: dict[str, Case] = {
    # ---------------------------------------------------------------- bench.run: the sweep file itself
    "run: sweep is a directory": Case("run", lambda t, s: [str(t)], r"is a directory; give a sweep YAML file"),
    "run: sweep missing": Case("run", lambda t, s: [str(t / "none.yaml")], r"sweep file not found: .*none.yaml"),
    "run: sweep not UTF-8": Case("run", run_case(raw=b"name: caf\xe9\n"), r"sweep.yaml: not UTF-8 text \(byte 9"),
    "run: YAML nested 5000 deep": Case("run", run_case(raw="name: " + "[" * 5000 + "]" * 5000 + "\n"),
                                       r"sweep.yaml: .*nested too deeply"),
    "run: invalid YAML": Case("run", run_case(raw="name: [unclosed\n"), r"sweep.yaml: line \d+ invalid YAML"),
    "run: duplicate key": Case("run", run_case(raw=yaml.safe_dump(BASE) + "n_edits: 3\n"),
                               r"line \d+ invalid YAML: duplicate key 'n_edits'"),
    "run: top level not a mapping": Case("run", run_case(raw="- a\n- b\n"), r"expected a mapping at the top level"),
    "run: empty name": Case("run", run_case(sweep(name="")), r"name: String should have at least 1 character"),
    "run: blank name": Case("run", run_case(sweep(name="   ")), r"name: must not be blank"),
    "run: n_edits yes": Case("run", run_case(raw=yaml.safe_dump(sweep()).replace("n_edits: 2", "n_edits: yes")),
                             r"n_edits: Input should be a valid integer \(got True\)"),
    "run: n_edits a string": Case("run", run_case(sweep(n_edits="3")), r"n_edits: Input should be a valid integer"),
    "run: n_edits zero": Case("run", run_case(sweep(n_edits=0)), r"n_edits: Input should be greater than 0"),
    "run: n_edits over the test split": Case("run", run_case(sweep(n_edits=5000)),
                                             r"n_edits \(5000\) is more than the test split holds \(\d+ records"),
    "run: batch larger than n_edits": Case("run", run_case(sweep(edit_batch_size=[1, 5])),
                                           r"edit_batch_size 5 is larger than n_edits \(2\)"),
    "run: unknown top-level key": Case("run", run_case(sweep(colour="red")),
                                       r"colour: unknown key; valid: name, description, .*methods"),
    "run: unknown nested key": Case("run", run_case(sweep(resources={"gpus": 1})),
                                    r"resources.gpus: unknown key; valid: cpu, gpu"),
    "run: unknown method": Case("run", run_case(sweep(methods=[{"name": "rome2"}])),
                                r"methods.0.name: unknown method 'rome2'; valid: .*ft"),
    "run: unknown model": Case("run", run_case(sweep(models=["not a model"])),
                               r"models.0.name: unknown model 'not a model'"),
    "run: unknown dataset": Case("run", run_case(sweep(datasets=["squad"])), r"unknown dataset 'squad'; valid: "),
    "run: unknown locality": Case("run", run_case(sweep(datasets=[{"name": "zsre", "locality": "mars"}])),
                                  r"locality 'mars' unknown for zsre; valid: record"),
    "run: unknown hparam": Case("run", run_case(sweep(methods=method(lrate=1))),
                                r"methods.0.hparams.lrate: unknown key for ft; valid: .*lr"),
    "run: hparam of the wrong type": Case("run", run_case(sweep(methods=method(lr="fast"))),
                                          r"methods.0.hparams.lr: Input should be a valid number.*'fast'"),
    "run: hparam bool as int": Case("run", run_case(sweep(methods=method(max_steps=True))),
                                    r"methods.0.hparams.max_steps: Input should be a valid integer"),
    "run: empty grid axis": Case("run", run_case(sweep(methods=method(lr=[]))),
                                 r"methods.0.hparams.lr: an empty list is an empty grid axis"),
    "run: search space bound": Case("run", run_case(sweep(methods=method(
        lr={"tune": "loguniform", "lower": 0, "upper": 1}))), r"methods.0.hparams.lr: loguniform needs lower > 0"),
    "run: search space kind": Case("run", run_case(sweep(methods=method(lr={"tune": "gaussian"}))),
                                   r"methods.0.hparams.lr.tune: Input should be 'uniform'"),
    "run: search space key": Case("run", run_case(sweep(methods=method(
        lr={"tune": "uniform", "lower": 0.1, "upper": 1, "step": 2}))),
        r"methods.0.hparams.lr.step: unknown key; valid: tune, lower, upper, values, q"),
    "run: scheduler metric unknown": Case("run", run_case(sweep(scheduler={"metric": "es"})),
                                          r"scheduler.metric: 'es' is not reported during training; valid: "),
    "run: scheduler mode against the metric": Case("run", run_case(sweep(scheduler={"metric": "val_loss"})),
                                                   r"scheduler.mode: val_loss is better when lower; use mode: min"),
    "run: scheduler with editors that never report": Case(
        "run", run_case(sweep(scheduler={"metric": "val_es"})),
        r"scheduler: no method here reports val_es \(ft never do"),
    "run: scheduler max_t too small": Case("run", run_case(sweep(
        scheduler={"metric": "val_es", "max_t": 3},
        methods=[{"name": "mend", "budget": {"max_steps": 10, "val_every": 2}}])),
        r"scheduler.max_t \(3\) is below the 7 reports of methods.0 \(mend"),
    "run: device cuda without a GPU": Case("run", run_case(sweep(device="cuda")),
                                           r"device: cuda, but this machine has no visible GPU", skip=not NO_GPU),
    "run: a GPU per trial without one": Case("run", run_case(sweep(resources={"gpu": 1})),
                                             r"resources.gpu: 1.0 per trial, but this machine has 0 GPU",
                                             skip=not NO_GPU),
    "run: more CPUs than the machine": Case("run", run_case(sweep(resources={"cpu": 4096})),
                                            r"resources.cpu: 4096.0 per trial, but this machine has \d+ CPU"),
    "run: alias bomb is echoed short": Case("run", run_case(raw=BOMB + yaml.safe_dump(BASE)),
                                            r"description: Input should be a valid string \(got \[\['x', "),
    "run: an empty paths entry": Case(
        "run", run_case(sweep(datasets=[{"name": "zsre", "paths": {"test": ""}}])),
        r"datasets.0.paths: test: an empty path; name the file that replaces the card's test split"),
    "run: a paths entry that is a folder": Case(
        "run", lambda t, s: [write(t, sweep(datasets=[{"name": "zsre", "paths": {"test": str(t)}}]))],
        r"datasets.0 \(zsre\): data file '.*': .* is a folder; name a file in it"),
    "run: paths file shares records with training": Case(
        "run", lambda t, s: [write(t, sweep(datasets=[{"name": "zsre", "paths": {
            "test": write(t, raw=json.dumps(zsre_rows(5)), name="test.json")}}]))],
        r"paths.test \(.*test.json\) shares \d record\(s\) with the (train|val) split \(.*zsre_mend_800.json\)"),
    "run: data file not UTF-8": Case(
        "run", lambda t, s: [write(t, sweep(datasets=[{"name": "zsre", "paths": {
            "test": write(t, raw=b'[{"src": "caf\xe9"}]', name="latin1.json")}}]))],
        r"latin1.json: not UTF-8 text \(byte 13\)"),
    "run: experiment name with a NUL": Case("run", run_case(sweep(name="exp\x00x")),
                                            r"name: holds control characters \('\\x00'\); use printable text"),
    "run: --experiment with a newline": Case("run", run_case(sweep(), extra=("--experiment", "a\nb")),
                                             r"--experiment holds control characters \('\\n'\)"),
    "run: model folder without a model": Case(
        "run", lambda t, s: [write(t, sweep(models=[str((t / "empty").mkdir() or t / "empty")]))],
        r"models.0.name: model folder .*/empty: no config.json"),
    "run: model folder config without model_type": Case(
        "run", lambda t, s: [write(t, sweep(models=[_folder(t, {"config.json": "{}"})]))],
        r"models.0.name: model folder .*: config.json has no model_type transformers knows \(got None\)"),
    "run: model folder without weights": Case(
        "run", lambda t, s: [write(t, sweep(models=[_folder(t, {"config.json": '{"model_type": "gpt2"}'})]))],
        r"model folder .*: no weights \(one of model.safetensors"),
    "run: model folder without a tokenizer": Case(
        "run", lambda t, s: [write(t, sweep(models=[_folder(t, {"config.json": '{"model_type": "gpt2"}',
                                                                 "model.safetensors": ""})]))],
        r"model folder .*: no tokenizer \(one of tokenizer.json"),
    "run: model neither alias nor folder nor Hub id": Case(
        "run", run_case(sweep(models=["../no/such/model"])),
        r"unknown model '../no/such/model': not an alias \(smollm2-135m.*\), no folder at /.*no/such/model, and not "
        r"a Hugging Face id"),
    "run: Hub id with a dot-dot part": Case("run", run_case(sweep(models=["org/.."])), r"unknown model 'org/..'"),
    "run: checkpoint past the stream": Case(
        "run", run_case(sweep(edit_mode=["sequential"], checkpoints=[1, 50], n_edits=4)),
        r"checkpoints: 50 is past the end of the stream \(n_edits 4\); use checkpoints <= 4"),
    "run: checkpoint 0": Case("run", run_case(sweep(edit_mode=["sequential"], checkpoints=[0, 2])),
                              r"checkpoints.0: Input should be greater than 0"),
    "run: checkpoint twice": Case("run", run_case(sweep(edit_mode=["sequential"], checkpoints=[1, 1])),
                                  r"checkpoints: 1 is given twice"),
    "run: checkpoints without a sequential stream": Case("run", run_case(sweep(checkpoints=[1])),
                                                         r"checkpoints score a sequential stream"),
    "run: missing data file": Case("run", run_case(sweep(data_root="/nonexistent-root")),
                                   r"zsre/zsre_mend_800.json' not found; tried"),
    "run: a record without a field": Case("run", lambda t, s: [write(t, sweep(datasets=[_records_file(
        t, [{k: v for k, v in r.items() if k != "loc"} if i == 1 else r for i, r in enumerate(zsre_rows(4))])]))],
        r"record 1 is missing field 'loc'"),
    "run: an empty split": Case("run", lambda t, s: [write(t, sweep(datasets=[_records_file(t, [])]))],
                                r"split 'test' is empty"),
    "run: non-positive lr": Case("run", run_case(sweep(methods=method(lr=0))),
                                 r"methods.0.hparams.lr: Input should be greater than 0"),
    "run: generate on a QA dataset": Case("run", run_case(sweep(datasets=[{"name": "zsre", "generate": {
        "max_prompt_tokens": 50}}])), r"datasets.0 \(zsre\): generate is only for datasets whose targets are generated \(generation\); zsre is qa"),
    "run: generation prompt over 200 tokens": Case("run", run_case(sweep(datasets=[{"name": "wikitext", "generate": {
        "max_prompt_tokens": 500}}])), r"datasets.0.generate.max_prompt_tokens: Input should be less than or equal"),
    "run: --address without a Ray auth token": Case("run", run_case(sweep(), extra=(
        "--address", "127.0.0.1:9", "--tracking-uri", "http://127.0.0.1:9")), r"--address: no Ray auth token"),
    "run: --address with a store other nodes cannot reach": Case("run", lambda t, s: [
        write(t, sweep()), "--address", "127.0.0.1:9", "--tracking-uri", f"sqlite:///{t}/local.db"],
        r"--address: trials on other nodes cannot reach sqlite"),
    "run: tracking URI with an unknown scheme": Case("run", run_case(sweep(), extra=("--tracking-uri", "foo://x")),
                                                     r"tracking URI 'foo://x': unknown scheme 'foo'"),
    "run: tracking URI a plain path": Case("run", run_case(sweep(), extra=("--tracking-uri", "runs.db")),
                                           r"tracking URI 'runs.db': not a store MLflow 3 uses"),
    "run: tracking store in a missing folder": Case(
        "run", lambda t, s: [write(t, sweep()), "--tracking-uri", f"sqlite:///{t}/no/such/dir/x.db"],
        r"folder .*no/such/dir does not exist"),
    "run: tracking store on a read-only file system": Case(
        "run", run_case(sweep(), extra=("--tracking-uri", "sqlite:////proc/editbench.db")),
        r"tracking store folder /proc: not writable"),
    "run: --max-concurrent 0": Case("run", run_case(sweep(), extra=("--max-concurrent", "0")),
                                    r"--max-concurrent must be >= 1, got 0"),
    "run: --max-concurrent not a number": Case("run", run_case(sweep(), extra=("--max-concurrent", "many")),
                                               r"argument --max-concurrent: invalid int value: 'many'"),
    "run: unknown option": Case("run", run_case(sweep(), extra=("--frobnicate",)),
                                r"unrecognized arguments: --frobnicate"),
    "run: --address with a local store": Case("run", run_case(sweep(), extra=("--address", "127.0.0.1:1")),
                                              r"--address: trials on other nodes cannot reach sqlite:///.*mlruns.db; "
                                              r"pass --tracking-uri http://HOST:PORT"),
    "run: --address without a Ray token": Case(
        "run", run_case(sweep(), extra=("--address", "127.0.0.1:1", "--tracking-uri", "http://127.0.0.1:1")),
        r"--address: no Ray auth token \(RAY_AUTH_TOKEN_PATH=/nonexistent/token has none\)"),
    # ---------------------------------------------------------------- bench.report
    "report: store does not exist": Case("report", lambda t, s: ["--experiment", "x", "--tracking-uri",
                                                                  f"sqlite:///{t}/mlruns.db"],
                                         r"no MLflow store at .*mlruns.db; run a sweep first"),
    "report: default store does not exist": Case("report", lambda t, s: ["--experiment", "x"],
                                                 r"no MLflow store at .*mlruns.db"),
    "report: unknown experiment": Case("report", lambda t, s: ["--experiment", "nope", "--tracking-uri", s],
                                       r"unknown experiment 'nope'"),
    "report: unknown format": Case("report", lambda t, s: ["--experiment", "x", "--format", "pdf"],
                                   r"--format pdf unknown; valid: md, csv, tex, html"),
    "report: blank experiment": Case("report", lambda t, s: ["--experiment", " "], r"--experiment must not be blank"),
    "report: unwritable --out": Case("report", lambda t, s: ["--experiment", "empty", "--tracking-uri", s, "--out",
                                                             "/proc/editbench-report"],
                                     r"--out /proc/editbench-report: not writable"),
    "report: missing --experiment": Case("report", lambda t, s: [], r"the following arguments are required: "
                                                                    r"--experiment"),
    # ---------------------------------------------------------------- bench.edit
    "edit: empty prompt": Case("edit", lambda t, s: ["--run", "r", "--prompt", "", "--target", "x"],
                               r"--prompt/--target: the prompt is empty"),
    "edit: empty target": Case("edit", lambda t, s: ["--run", "r", "--prompt", "p", "--target", " "],
                               r"--prompt/--target: the target is empty"),
    "edit: --then without =": Case("edit", lambda t, s: ["--run", "r", "--prompt", "p", "--target", "x", "--then",
                                                         "no equals"], r"--then 'no equals' must be PROMPT=TARGET"),
    "edit: --then with an empty target": Case("edit", lambda t, s: ["--run", "r", "--prompt", "p", "--target", "x",
                                                                    "--then", "q="], r"--then #1: the target is empty"),
    "edit: store does not exist": Case("edit", lambda t, s: ["--run", "r", "--prompt", "p", "--target", "x"],
                                       r"no MLflow store at .*mlruns.db"),
    "edit: unknown run": Case("edit", lambda t, s: ["--run", "0" * 32, "--prompt", "p", "--target", "x",
                                                    "--tracking-uri", s], r"unknown run id '0{32}'"),
    "edit: --max-new-tokens 0": Case("edit", lambda t, s: ["--run", "r", "--prompt", "p", "--target", "x",
                                                           "--max-new-tokens", "0"],
                                     r"--max-new-tokens must be >= 1, got 0"),
    # ---------------------------------------------------------------- bench.ui
    "ui: port out of range": Case("ui", lambda t, s: ["--tracking-uri", s, "--port", "99999"],
                                  r"--port 99999: not a TCP port; use 1-65535"),
    "ui: port not a number": Case("ui", lambda t, s: ["--port", "http"], r"argument --port: invalid int value"),
    "ui: store does not exist": Case("ui", lambda t, s: [], r"no MLflow store at .*mlruns.db"),
    "ui: port taken": Case("ui", lambda t, s: ["--tracking-uri", s, "--port", str(_TAKEN.getsockname()[1])],
                           r"--host 127.0.0.1 --port \d+: cannot listen there \(Address already in use\)"),
    # ---------------------------------------------------------------- bench.perf
    "perf: unknown model": Case("perf", lambda t, s: ["--model", "not a model"], r"unknown model 'not a model'"),
    "perf: unknown device": Case("perf", lambda t, s: ["--model", "tiny-gpt2", "--device", "tpu"],
                                 r"--device 'tpu': unknown; valid: cpu, cuda, cuda:N"),
    "perf: cuda without a GPU": Case("perf", lambda t, s: ["--model", "tiny-gpt2", "--device", "cuda"],
                                     r"--device cuda: no CUDA device is visible here", skip=not NO_GPU),
    "perf: unwritable --out": Case("perf", lambda t, s: ["--model", "tiny-gpt2", "--out", "/proc/perf.json"],
                                   r"--out /proc/perf.json: not writable"),
    "perf: --out is a directory": Case("perf", lambda t, s: ["--model", "tiny-gpt2", "--out", str(t)],
                                       r"--out .*: is a directory; give a file name"),
    "perf: --repeats 0": Case("perf", lambda t, s: ["--model", "tiny-gpt2", "--repeats", "0"],
                              r"--repeats must be >= 1, got 0"),
}

_TAKEN = socket.socket()
_TAKEN.bind(("127.0.0.1", 0))
_TAKEN.listen(1)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An existing store with an experiment 'empty' (no runs), for the commands that read one."""
    from bench.tracking import prepare_experiment

    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'runs.db'}"
    prepare_experiment(uri, "empty")
    return uri


def _running(uri: str) -> int:
    from bench.tracking import client

    c = client(uri)
    exps = [e.experiment_id for e in c.search_experiments()]
    return len(c.search_runs(exps, filter_string="attributes.status = 'RUNNING'")) if exps else 0


def test_there_are_at_least_forty_cases_over_all_five_commands() -> None:
    assert len(CASES) >= 40
    assert {c.command for c in CASES.values()} == {"run", "report", "edit", "ui", "perf"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_exit_2(name: str, tmp_path: Path, store: str, capsys, monkeypatch) -> None:
    case = CASES[name]
    if case.skip:
        pytest.skip("needs a machine without a GPU")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", "/nonexistent/token")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    argv = case.argv(tmp_path, store)
    main = importlib.import_module(f"bench.{case.command}").main
    try:
        code = main(argv)
    except SystemExit as e:  # argparse errors
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == case.code, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    assert len(err) < 1000, err[:300]  # values are echoed clipped
    assert re.search(case.pattern, err), err
    assert not (tmp_path / "mlruns.db").exists()  # no store created where there was none
    assert _running(store) == 0


def test_verbose_shows_the_traceback_too(tmp_path: Path, capsys, monkeypatch) -> None:
    from bench.run import main

    monkeypatch.chdir(tmp_path)
    assert main([write(tmp_path, sweep()), "--tracking-uri", "foo://x", "-v"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: tracking URI 'foo://x'")


@pytest.mark.parametrize("command", ["run", "report", "edit", "ui", "perf"])
def test_help_lists_every_option_default_exit_codes_and_an_example(command: str, capsys) -> None:
    mod = importlib.import_module(f"bench.{command}")
    with pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "exit codes:" in out and "  2  " in out and "example:\n  python -m bench." in out
    parser_opts = re.findall(r"^  (--[\w-]+)", out, flags=re.M)
    assert parser_opts, out
    for line in re.split(r"\n(?=  -)", out.split("options:")[1].split("exit codes:")[0]):
        if not line.strip():
            continue
        opt = line.split()[0].rstrip(",")
        if opt in ("-h", "-v", "--dry-run", "--resume", "--no-mlflow") or "required" in line:
            continue
        if opt in ("--run", "--prompt", "--target", "--experiment", "--probe", "--then"):
            continue  # required, or repeatable with nothing by default
        assert "default" in " ".join(line.split()), line

