"""Edit records, dataset cards, readers, seeded splits and tokenised edit batches.

A dataset is described by a card, ``datasets/<name>.yaml`` (reader, files relative to the data root, field
mapping, default split fractions, locality sources, public source, licence). Files are read from the data root:
the sweep's ``data_root``, else ``$EDITBENCH_DATA``, else ``../shared/data`` (relative to the working directory,
then to the repository).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
import yaml
from torch import Tensor

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
CARDS_DIR = REPO_ROOT / "datasets"
SPLITS = ("train", "val", "test")
TaskKind = Literal["qa", "completion", "classification", "generation"]


class DataError(ValueError):
    """A dataset card, file or record that cannot be used; the message names the file/field and what is valid."""


@dataclass(frozen=True)
class EditRecord:
    """One edit request and its probes; holds all four tasks.

    - ``prompt`` / ``target``: x_e and y_e (for classification, ``target`` is the label's name and ``label`` its id;
      for generation, ``target`` is the continuation).
    - ``rephrases``: equivalence inputs x'_e (empty when the source has none: x_e stands in, see ``equiv_prompt``).
    - ``loc_prompt`` / ``loc_answer``: a locality input and the answer it must keep (for generation the answer is
      empty and locality is the perplexity of the passage).
    - ``true_answer``: the fact before the edit, where known (zsRE ``pred``, CounterFact ``ground_truth``).
    """

    case_id: str
    task: str
    kind: TaskKind
    prompt: str
    target: str
    rephrases: tuple[str, ...] = ()
    loc_prompt: str = ""
    loc_answer: str = ""
    true_answer: str | None = None
    subject: str | None = None
    label: int | None = None
    loc_label: int | None = None

    @property
    def equiv_prompt(self) -> str:
        """The first equivalence input, or x_e itself when the record has no rephrase."""
        return self.rephrases[0] if self.rephrases else self.prompt

    @property
    def has_rephrase(self) -> bool:
        return bool(self.rephrases)


# ----------------------------------------------------------------------------------------------------- cards


@dataclass(frozen=True)
class LocalitySource:
    """Where locality prompts come from: the record's own (``record``), or another file of the data root.

    ``keep: base_correct`` keeps only prompts whose answer the unedited model already produces (teacher-forced
    argmax), so accuracy drawdown can move on small models.
    """

    name: str
    source: Literal["record", "file"] = "record"
    file: str | None = None
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    keep: Literal["all", "base_correct"] = "all"
    max_prompts: int = 2000


@dataclass(frozen=True)
class DatasetCard:
    """A parsed ``datasets/<name>.yaml``."""

    name: str
    reader: str
    kind: TaskKind
    files: dict[str, str]
    fields: dict[str, str]
    fractions: dict[str, float]
    locality: dict[str, LocalitySource]
    default_locality: str = "record"
    rome_neighbourhood: bool = False
    labels: tuple[str, ...] = ()
    label_seed: int = 0
    rephrase_file: str | None = None
    prepare: dict[str, Any] = field(default_factory=dict)
    generate: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    licence: str = ""
    citation: str = ""


def available_cards() -> list[str]:
    """Names of the dataset cards shipped in ``datasets/``."""
    return sorted(p.stem for p in CARDS_DIR.glob("*.yaml"))


def load_card(name: str) -> DatasetCard:
    """Parse and check the card of dataset ``name``."""
    path = CARDS_DIR / f"{name}.yaml"
    if not path.exists():
        raise DataError(f"unknown dataset {name!r}; valid: {', '.join(available_cards())}")
    raw = yaml.safe_load(path.read_text())
    if raw.get("reader") not in READERS:
        raise DataError(f"{path.name}: reader {raw.get('reader')!r} unknown; valid: {', '.join(READERS)}")
    files = raw.get("files") or {}
    if not files or not set(files) <= {"all", *SPLITS}:
        raise DataError(f"{path.name}: files must map some of all/train/val/test to paths, got {files!r}")
    loc: dict[str, LocalitySource] = {"record": LocalitySource(name="record")}
    for lname, lraw in (raw.get("locality") or {}).items():
        loc[lname] = LocalitySource(name=lname, **lraw)
    fractions = raw.get("fractions") or {"train": 0.8, "val": 0.1, "test": 0.1}
    return DatasetCard(
        name=name,
        reader=raw["reader"],
        kind=raw["kind"],
        files=files,
        fields=raw.get("fields") or {},
        fractions=fractions,
        locality=loc,
        default_locality=raw.get("default_locality", "record"),
        rome_neighbourhood=bool(raw.get("rome_neighbourhood", False)),
        labels=tuple(raw.get("labels") or ()),
        label_seed=int(raw.get("label_seed", 0)),
        rephrase_file=raw.get("rephrase_file"),
        prepare=raw.get("prepare") or {},
        generate=raw.get("generate") or {},
        source=raw.get("source") or {},
        licence=raw.get("licence", ""),
        citation=raw.get("citation", ""),
    )


def fetch_public(card: DatasetCard, split_key: str) -> Path:
    """Download the card's public file for ``split_key`` (``source.files``) into the cache once; needs internet.

    Used for ``datasets[].source: public`` in a sweep; raises :class:`DataError` naming the URL on failure.
    """
    import urllib.request

    from bench.cache import cache_root

    urls = (card.source or {}).get("files") or {}
    if split_key not in urls:
        raise DataError(f"datasets/{card.name}.yaml: source.files has no {split_key!r} URL (has: {', '.join(urls)})")
    url = urls[split_key]
    dest = cache_root() / "data" / card.name / Path(url).name
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            urllib.request.urlretrieve(url, dest.with_suffix(dest.suffix + ".part"))
        except OSError as e:
            raise DataError(f"could not download {url} for dataset {card.name}: {e}") from None
        dest.with_suffix(dest.suffix + ".part").replace(dest)
    return dest


def data_root_candidates(data_root: str | os.PathLike | None = None) -> list[Path]:
    """Places searched for the data root, in order: the sweep's value, $EDITBENCH_DATA, ../shared/data."""
    if data_root:
        return [Path(data_root).expanduser()]
    out = []
    if os.environ.get("EDITBENCH_DATA"):
        out.append(Path(os.environ["EDITBENCH_DATA"]).expanduser())
    out += [Path.cwd().parent / "shared" / "data", REPO_ROOT.parent / "shared" / "data"]
    return out


def resolve_file(rel: str, data_root: str | os.PathLike | None = None) -> Path:
    """Absolute path of a data file; a missing file raises :class:`DataError` naming every place tried."""
    p = Path(rel).expanduser()
    if p.is_absolute():
        if p.exists():
            return p
        raise DataError(f"data file not found: {p}")
    tried = []
    for root in data_root_candidates(data_root):
        cand = (root / rel).resolve()
        if cand.exists():
            return cand
        tried.append(str(cand))
    raise DataError(
        f"data file {rel!r} not found; tried: {'; '.join(tried)} (set data_root in the sweep or $EDITBENCH_DATA)"
    )


# ----------------------------------------------------------------------------------------------------- readers


def read_text(path: Path) -> str:
    """A data file's text; a file that is not UTF-8 (or cannot be read) is a :class:`DataError` naming it."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); data files must be UTF-8") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes (memoised per path, size and modification time)."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def write_atomic(path: Path, data: bytes) -> Path:
    """Write ``path`` whole or not at all (a temp file beside it, then a rename): a process killed mid-write
    leaves no truncated file for the next one to trust."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


def pack_files(files: dict[str, Path]) -> dict[str, bytes]:
    """The bytes of each file, by the relative path it will have under a data root (see :func:`unpack_files`).
    The driver reads the data once and ships it with the trials: workers need no shared file system."""
    out = {}
    for rel, path in files.items():
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ValueError(f"packed data path {rel!r} must be relative and stay inside the data root")
        out[rel] = path.read_bytes()
    return out


def unpack_files(bundle: dict[str, bytes], parent: Path | None = None) -> Path:
    """Write a :func:`pack_files` bundle under a data root named by its content (reused when already there,
    written atomically per file) and return that root, for ``data_root`` of a trial on any node."""
    import tempfile

    h = hashlib.sha256()
    for rel in sorted(bundle):
        h.update(rel.encode() + b"\0" + hashlib.sha256(bundle[rel]).digest())
    root = (parent or Path(tempfile.gettempdir())) / f"editbench-data-{h.hexdigest()[:16]}"
    for rel, blob in bundle.items():
        dest = root / rel
        if not (dest.exists() and dest.stat().st_size == len(blob)):
            write_atomic(dest, blob)
    return root


def _load_json_rows(path: Path) -> list[dict]:
    text = read_text(path)
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(rows).__name__}")
    return rows


def _get(row: dict, key: str, path: Path, idx: int, required: bool = True) -> Any:
    if key in row and row[key] is not None:
        return row[key]
    if required:
        raise DataError(f"{path}: record {idx} is missing field {key!r} (has: {', '.join(sorted(row))})")
    return None


def read_mapped_json(path: Path, card: DatasetCard, data_root: str | os.PathLike | None = None) -> list[EditRecord]:
    """Reader for JSON / JSON-lines files whose fields map one-to-one onto EditRecord (zsRE MEND format,
    flattened CounterFact). ``card.fields`` maps record attributes to source keys; ``id`` may be absent."""
    f = card.fields
    required = ("prompt", "target", "loc_prompt", "loc_answer")
    for r in required:
        if r not in f:
            raise DataError(f"datasets/{card.name}.yaml: fields.{r} is required by reader {card.reader!r}")
    out = []
    for i, row in enumerate(_load_json_rows(path)):
        if not isinstance(row, dict):
            raise DataError(f"{path}: record {i} is not an object")
        reph = _get(row, f["rephrase"], path, i) if "rephrase" in f else None
        rephrases = tuple([reph] if isinstance(reph, str) else (reph or []))
        loc_prompt = str(_get(row, f["loc_prompt"], path, i))
        true = _get(row, f["true_answer"], path, i, required=False) if "true_answer" in f else None
        out.append(
            EditRecord(
                case_id=str(_get(row, f["id"], path, i) if "id" in f else i),
                task=card.name,
                kind=card.kind,
                prompt=str(_get(row, f["prompt"], path, i)),
                target=str(_get(row, f["target"], path, i)),
                rephrases=rephrases,
                loc_prompt=loc_prompt,
                loc_answer=str(_get(row, f["loc_answer"], path, i)),
                true_answer=None if true is None else str(true),
                subject=_get(row, f["subject"], path, i, required=False) if "subject" in f else None,
            )
        )
    return out


def _seeded_bit(key: str, seed: int) -> int:
    """A Bernoulli(0.5) draw that depends only on (key, seed): the same claim gets the same label everywhere."""
    import hashlib

    return int(hashlib.sha256(f"{seed}:{key}".encode()).digest()[0] & 1)


def read_fever(path: Path, card: DatasetCard, data_root: str | os.PathLike | None = None) -> list[EditRecord]:
    """FEVER claims (JSON lines) as classification edits, following the MEND paper.

    NOT ENOUGH INFO is dropped; ``card.labels`` names the classes in id order. The edit label y_e is a seeded
    Bernoulli(0.5) draw per claim (``card.label_seed``); the gold label is the true answer. The equivalence input
    is a label-preserving FEVER 2.0 rewrite of the claim (``card.rephrase_file`` rows with ``transformation ==
    "label_preserving"`` and ``original_id`` equal to the claim's id) where one exists, else none (x_e stands
    in). Locality: the next claim of the file (cyclic) with its gold label.
    """
    labels = list(card.labels)
    rows = [r for r in _load_json_rows(path) if r.get("label") in labels]
    for i, r in enumerate(rows):
        for key in ("id", "claim", "label"):
            _get(r, key, path, i)
    rephr: dict[int, list[str]] = {}
    if card.rephrase_file:
        rp = resolve_file(card.rephrase_file, data_root)
        for r in _load_json_rows(rp):
            if r.get("transformation") == "label_preserving" and r.get("original_id") is not None:
                rephr.setdefault(int(r["original_id"]), []).append(str(r["claim"]))
    out = []
    for i, r in enumerate(rows):
        gold = labels.index(r["label"])
        new = _seeded_bit(str(r["id"]), card.label_seed)
        loc = rows[(i + 1) % len(rows)]
        out.append(EditRecord(
            case_id=str(r["id"]), task=card.name, kind="classification", prompt=str(r["claim"]),
            target=labels[new], label=new, rephrases=tuple(rephr.get(int(r["id"]), ())),
            loc_prompt=str(loc["claim"]), loc_answer=str(loc["label"]), loc_label=labels.index(loc["label"]),
            true_answer=labels[gold],
        ))
    return out


def read_wikitext(path: Path, card: DatasetCard, data_root: str | os.PathLike | None = None) -> list[EditRecord]:
    """WikiText paragraphs as generation edits (MEND's Wikitext task).

    Paragraphs are non-heading lines of at least ``card.fields['min_words']`` (default 50) words, ASCII only.
    ``prompt`` holds the whole paragraph; the trial turns it into x_e (at most 200 tokens), x'_e (x_e with a
    random-length prefix removed) and y_e (10 tokens sampled from the base model) with
    :func:`bench.prepare.generation_targets`. Locality: the next paragraph (cyclic), its first word as the prompt
    and up to ``loc_words`` (default 100) following words as the text whose perplexity must not rise.
    """
    min_words = int(card.fields.get("min_words", 50))
    loc_words = int(card.fields.get("loc_words", 100))
    paras = []
    for line in read_text(path).splitlines():
        t = line.strip()
        if not t or t.startswith("=") or not t.isascii() or len(t.split()) < min_words:
            continue
        paras.append(t)
    out = []
    for i, t in enumerate(paras):
        words = paras[(i + 1) % len(paras)].split()
        out.append(EditRecord(case_id=str(i), task=card.name, kind="generation", prompt=t, target="",
                              loc_prompt=words[0], loc_answer=" ".join(words[1 : 1 + loc_words])))
    return out


READERS: dict[str, Callable[..., list[EditRecord]]] = {
    "mapped_json": read_mapped_json,
    "fever": read_fever,
    "wikitext": read_wikitext,
}


def check_records(records: Sequence[EditRecord], where: str) -> list[EditRecord]:
    """Drop records whose prompt or target is empty (the zsRE sample has two with an empty ``alt``), logging
    how many; a file left with no usable record is an error naming it."""
    kept = [r for r in records
            if r.prompt.strip() and (r.label is not None or r.kind == "generation" or r.target.strip())]
    if len(kept) < len(records):  # a handful (zsRE's sample has 2 of 800) is routine; more deserves a warning
        level = logging.INFO if len(records) - len(kept) <= 0.01 * len(records) else logging.WARNING
        log.log(level, "%s: dropped %d of %d records with an empty prompt or target", where,
                len(records) - len(kept), len(records))
    if records and not kept:
        raise DataError(f"{where}: no record has a non-empty prompt and target")
    return kept


# ----------------------------------------------------------------------------------------------------- splits


@dataclass
class TaskData:
    """Train/val/test records of one dataset, plus the card they came from and the files read."""

    card: DatasetCard
    splits: dict[str, list[EditRecord]]
    files: dict[str, str]

    def __getitem__(self, split: str) -> list[EditRecord]:
        return self.splits[split]


def load_task(
    name: str,
    data_root: str | os.PathLike | None = None,
    seed: int = 0,
    sizes: dict[str, int | None] | None = None,
    paths: dict[str, str] | None = None,
    fractions: dict[str, float] | None = None,
    file_overrides: dict[str, str] | None = None,
) -> TaskData:
    """Read a dataset through its card and split it deterministically.

    A split with its own file (card ``files.<split>`` or ``paths[split]``) reads that file whole; the other splits
    are carved, by a permutation seeded with ``seed``, from ``files.all`` (or, without it, from the train file)
    in the card's fractions. ``sizes[split]`` then keeps the first N of a split. An empty split is an error.
    ``file_overrides`` replaces entries of the card's ``files`` (and, under ``rephrase``, its rephrase file), e.g.
    with downloaded public copies.
    """
    card = load_card(name)
    if file_overrides:  # e.g. downloaded public copies; "rephrase" replaces the card's rephrase file
        extra = {k: v for k, v in file_overrides.items() if k != "rephrase"}
        card = replace(card, files={**card.files, **extra},
                       rephrase_file=file_overrides.get("rephrase", card.rephrase_file))
    reader = READERS[card.reader]
    paths = dict(paths or {})
    for k in paths:
        if k not in SPLITS:
            raise DataError(f"datasets.{name}.paths: key {k!r} is not a split; valid: {', '.join(SPLITS)}")
    fractions = {**card.fractions, **(fractions or {})}
    own = {s: paths.get(s) or card.files.get(s) for s in SPLITS if paths.get(s) or card.files.get(s)}
    carved = [s for s in SPLITS if s not in own]
    read: dict[str, list[EditRecord]] = {}
    files: dict[str, str] = {}
    for s, rel in own.items():
        p = resolve_file(rel, data_root)
        read[s] = check_records(reader(p, card, data_root), str(p))
        files[s] = str(p)
    if carved:
        pool_key = "all" if "all" in card.files else "train"
        if pool_key == "train" and "train" in own:
            carved = ["train", *carved]
            pool = read.pop("train")
            pool_file = files["train"]
        else:
            if pool_key not in card.files:
                raise DataError(f"datasets/{name}.yaml: no file for splits {carved} and no files.all to carve them from")
            p = resolve_file(card.files[pool_key], data_root)
            pool, pool_file = check_records(reader(p, card, data_root), str(p)), str(p)
        order = list(range(len(pool)))
        random.Random(seed).shuffle(order)
        total = sum(fractions.get(s, 0.0) for s in carved)
        if total <= 0:
            raise DataError(f"datasets.{name}: fractions for {carved} sum to {total}; give positive fractions")
        start = 0
        for j, s in enumerate(carved):
            n = len(pool) - start if j == len(carved) - 1 else int(round(len(pool) * fractions.get(s, 0.0) / total))
            read[s] = [pool[i] for i in order[start : start + n]]
            files[s] = pool_file
            start += n
    sizes = sizes or {}
    for s in SPLITS:
        n = sizes.get(s)
        if n is not None:
            read[s] = read[s][:n]
        if not read[s]:
            raise DataError(f"dataset {name!r}: split {s!r} is empty (file {files.get(s)}); check its size/fraction")
    return TaskData(card=card, splits={s: read[s] for s in SPLITS}, files=files)


def split_overlaps(task: TaskData, own: Sequence[str]) -> list[tuple[str, str, str, str, int]]:
    """For each split in ``own`` (given its own file by a sweep's ``paths``): the other splits sharing records
    with it, as (split, its file, other split, other file, shared count). A record is its (prompt, target,
    label); the other splits are compared whole, before any size cut (the pool training draws from)."""
    def key(r: EditRecord) -> tuple:
        return (r.prompt, r.target, r.label)

    out = []
    for s in own:
        mine = {key(r) for r in task.splits[s]}
        for o in SPLITS:
            if o == s:
                continue
            n = len(mine & {key(r) for r in task.splits[o]})
            if n:
                out.append((s, task.files.get(s, "?"), o, task.files.get(o, "?"), n))
    return out


def locality_pool(card: DatasetCard, source: str, data_root: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """(prompt, answer) pairs of a file-based locality source named on the card."""
    if source not in card.locality:
        raise DataError(f"datasets.{card.name}.locality: {source!r} unknown; valid: {', '.join(card.locality)}")
    src = card.locality[source]
    if src.source == "record":
        return []
    p = resolve_file(src.file or "", data_root)
    rows = _load_json_rows(p)
    out = []
    for i, row in enumerate(rows[: src.max_prompts]):
        out.append((str(_get(row, src.prompt_field, p, i)), str(_get(row, src.answer_field, p, i))))
    return out


def with_locality(records: Sequence[EditRecord], pairs: Sequence[tuple[str, str]], seed: int) -> list[EditRecord]:
    """Give each record a locality prompt drawn (seeded, without repeats while the pool lasts) from ``pairs``."""
    if not pairs:
        raise DataError("locality pool is empty: no prompt kept (is the base model right on any of them?)")
    order = list(range(len(pairs)))
    random.Random(seed + 7919).shuffle(order)
    return [replace(r, loc_prompt=pairs[order[i % len(order)]][0], loc_answer=pairs[order[i % len(order)]][1])
            for i, r in enumerate(records)]


# ----------------------------------------------------------------------------------------------------- batches


@dataclass
class EditBatch:
    """Tokenised (prompt, target) pairs ready for :meth:`EditableModel.logits`.

    ``labels`` is aligned with the logits position by position: ``logits[b, t]`` predicts ``labels[b, t]``; -100
    marks positions that are not target tokens (prompt, padding). For classifiers labels are (B, 1).
    ``records`` are the edit requests the batch was built from (may be empty for probe batches).
    """

    inputs: dict[str, Tensor]
    labels: Tensor
    records: list[EditRecord] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str) -> "EditBatch":
        return EditBatch({k: v.to(device) for k, v in self.inputs.items()}, self.labels.to(device), self.records)

    @property
    def target_mask(self) -> Tensor:
        return self.labels != -100


def _with_space(text: str) -> str:
    """Targets follow the prompt after a space; BPE tokenizers encode that space into the first target token."""
    return text if text[:1].isspace() else " " + text


def collate(model: "EditableModel", prompts: Sequence[str], targets: Sequence[str] | Sequence[int],  # noqa: F821
            records: Sequence[EditRecord] = (), max_length: int = 256,
            space: bool | Sequence[bool] = True) -> EditBatch:
    """Tokenise prompt/target pairs for the model's kind.

    - causal: ``prompt + " " + target`` as ids of the prompt followed by ids of the spaced target (tokenised
      apart so the boundary is exact), right-padded; labels on target tokens only, shifted to align with logits.
      ``space=False`` keeps the target as given (generated continuations carry their own leading space, or none
      when they continue a word); a sequence gives the flag per row.
    - seq2seq: encoder gets the prompt, decoder the target (teacher forcing from the model's decoder start).
    - classifier: text and an integer label.
    """
    tok = model.tokenizer
    pad = tok.pad_token_id
    dev = model.device
    if len(prompts) != len(targets):
        raise ValueError(f"collate: {len(prompts)} prompts but {len(targets)} targets")
    spaces = [space] * len(prompts) if isinstance(space, bool) else list(space)
    if len(spaces) != len(prompts):
        raise ValueError(f"collate: {len(prompts)} prompts but {len(spaces)} space flags")
    if model.kind == "classifier":
        enc = tok(list(prompts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        labels = torch.tensor([int(t) for t in targets], dtype=torch.long).unsqueeze(1)
        return EditBatch({k: v.to(dev) for k, v in enc.items()}, labels.to(dev), list(records))
    if model.kind == "seq2seq":
        enc = tok(list(prompts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        tgt = tok([str(t).strip() for t in targets], padding=True, truncation=True, max_length=max_length,
                  return_tensors="pt")
        labels = tgt["input_ids"].masked_fill(tgt["attention_mask"] == 0, -100)
        dec_in = model.model.prepare_decoder_input_ids_from_labels(labels=labels)
        inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                  "decoder_input_ids": dec_in, "decoder_attention_mask": tgt["attention_mask"]}
        return EditBatch({k: v.to(dev) for k, v in inputs.items()}, labels.to(dev), list(records))
    rows, labs = [], []
    for p, t, sp in zip(prompts, targets, spaces):
        p_ids = tok(p, add_special_tokens=False)["input_ids"]
        t_ids = tok(_with_space(str(t)) if sp else str(t), add_special_tokens=False)["input_ids"]
        if not t_ids:
            raise DataError(f"target {t!r} tokenises to nothing")
        p_ids = p_ids[-(max_length - len(t_ids)):] if len(p_ids) + len(t_ids) > max_length else p_ids
        ids = p_ids + t_ids
        # logits at position j predict token j+1: the target tokens are predicted at positions
        # len(p)-1 .. len(ids)-2.
        lab = [-100] * len(ids)
        for j, tid in enumerate(t_ids):
            lab[len(p_ids) - 1 + j] = tid
        rows.append(ids)
        labs.append(lab)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows, labs)):
        input_ids[i, : len(r)] = torch.tensor(r)
        attn[i, : len(r)] = 1
        labels[i, : len(lab)] = torch.tensor(lab)
    return EditBatch({"input_ids": input_ids.to(dev), "attention_mask": attn.to(dev)}, labels.to(dev), list(records))


def stack_batches(a: EditBatch, b: EditBatch, pad_id: int) -> EditBatch:
    """One batch holding ``a``'s rows then ``b``'s, right-padded to a common width (ids with ``pad_id``, masks
    and type ids with 0, labels with -100), so two probes can share one forward pass. Slicing the result's
    logits to ``[:len(a), :a.labels.shape[1]]`` gives exactly ``a``'s logits (padding is masked)."""

    def pad(x: Tensor, width: int, value: int) -> Tensor:
        if x.dim() < 2 or x.shape[1] == width:
            return x
        return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)

    inputs = {}
    for k in a.inputs:
        value = pad_id if k.endswith("input_ids") else 0
        w = max(a.inputs[k].shape[-1], b.inputs[k].shape[-1])
        inputs[k] = torch.cat([pad(a.inputs[k], w, value), pad(b.inputs[k], w, value)])
    w = max(a.labels.shape[1], b.labels.shape[1])
    labels = torch.cat([pad(a.labels, w, -100), pad(b.labels, w, -100)])
    return EditBatch(inputs, labels, [*a.records, *b.records])


def spaced(records: Sequence[EditRecord]) -> bool:
    """Answers follow their prompt after a space; generated continuations are kept verbatim."""
    return not records or records[0].kind != "generation"


def edit_batch(model: "EditableModel", records: Sequence[EditRecord]) -> EditBatch:  # noqa: F821
    """x_e -> y_e for each record."""
    tgts = [r.label for r in records] if model.kind == "classifier" else [r.target for r in records]
    return collate(model, [r.prompt for r in records], tgts, records, space=spaced(records))


def equiv_batch(model: "EditableModel", records: Sequence[EditRecord]) -> EditBatch:  # noqa: F821
    """x'_e -> y_e (x_e itself where the record has no rephrase)."""
    tgts = [r.label for r in records] if model.kind == "classifier" else [r.target for r in records]
    return collate(model, [r.equiv_prompt for r in records], tgts, records, space=spaced(records))


def loc_batch(model: "EditableModel", records: Sequence[EditRecord]) -> EditBatch:  # noqa: F821
    """x_loc -> its answer."""
    tgts = [r.loc_label for r in records] if model.kind == "classifier" else [r.loc_answer for r in records]
    return collate(model, [r.loc_prompt for r in records], tgts, records)
