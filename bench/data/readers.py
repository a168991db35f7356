"""Readers turning a data file into edit records through its card's field mapping."""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from bench.data.kinds import task_kind
from bench.data.records import DataError, EditRecord
from bench.data.sources import DataRef

if TYPE_CHECKING:  # cards read the readers' names; a card is only a type here
    from bench.data.cards import DatasetCard

log = logging.getLogger(__name__)


def _json_rows(ref: DataRef) -> list[dict]:
    """The records of a JSON / JSON-lines file or Hub split, read through ``datasets``."""
    if ref.is_text:
        raise DataError(f"{ref.where}: expected a .json or .jsonl file of records")
    return ref.rows()


def _get(row: dict, key: str, where: Any, idx: int, required: bool = True) -> Any:
    """``row[key]``; a missing (or null) required field is a :class:`DataError` naming the file and record."""
    if key in row and row[key] is not None:
        return row[key]
    if required:
        has = ", ".join(sorted(k for k, v in row.items() if v is not None))
        raise DataError(f"{where}: record {idx} is missing field {key!r} (has: {has})")
    return None


def read_mapped_json(ref: DataRef, card: DatasetCard, extra: Mapping[str, DataRef] | None = None
                     ) -> list[EditRecord]:
    """Reader for JSON / JSON-lines files whose fields map one-to-one onto EditRecord (zsRE MEND format,
    flattened CounterFact). ``card.fields`` maps record attributes to source keys; ``id`` may be absent."""
    f = card.fields
    required = ("prompt", "target", "loc_prompt", "loc_answer")
    for r in required:
        if r not in f:
            raise DataError(f"datasets/{card.name}.yaml: fields.{r} is required by reader {card.reader!r}")
    out = []
    path = ref.where
    for i, row in enumerate(_json_rows(ref)):
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

    return int(hashlib.sha256(f"{seed}:{key}".encode()).digest()[0] & 1)


def read_fever(ref: DataRef, card: DatasetCard, extra: Mapping[str, DataRef] | None = None) -> list[EditRecord]:
    """FEVER claims (JSON lines) as classification edits, following the MEND paper.

    NOT ENOUGH INFO is dropped; ``card.labels`` names the classes in id order. The edit label y_e is a seeded
    Bernoulli(0.5) draw per claim (``card.label_seed``); the gold label is the true answer. The equivalence input
    is a label-preserving FEVER 2.0 rewrite of the claim (``card.rephrase_file`` rows with ``transformation ==
    "label_preserving"`` and ``original_id`` equal to the claim's id) where one exists, else none (x_e stands
    in). Locality: the next claim of the file (cyclic) with its gold label. A claim id seen again (the Hub's
    FEVER rows repeat a claim once per evidence sentence) keeps its first row.
    """
    labels = list(card.labels)
    path = ref.where
    rows, seen = [], set()
    for r in _json_rows(ref):
        if r.get("label") in labels and r.get("id") not in seen:
            seen.add(r.get("id"))
            rows.append(r)
    for i, r in enumerate(rows):
        for key in ("id", "claim", "label"):
            _get(r, key, path, i)
    rephr: dict[int, list[str]] = {}
    if (extra or {}).get("rephrase") is not None:
        for r in _json_rows(extra["rephrase"]):  # type: ignore[index]
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


def read_wikitext(ref: DataRef, card: DatasetCard, extra: Mapping[str, DataRef] | None = None) -> list[EditRecord]:
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
    for line in ref.lines():
        t = line.strip()
        if not t or t.startswith("=") or not t.isascii() or len(t.split()) < min_words:
            continue
        paras.append(t)
    out = []
    for i, t in enumerate(paras):
        words = paras[(i + 1) % len(paras)].split()
        out.append(EditRecord(case_id=str(i), task=card.name, kind=card.kind, prompt=t, target="",
                              loc_prompt=words[0], loc_answer=" ".join(words[1 : 1 + loc_words])))
    return out


#: reader name -> reader(file, card, extra files by card key (``rephrase``)) -> records
READERS: dict[str, Callable[..., list[EditRecord]]] = {
    "mapped_json": read_mapped_json,
    "fever": read_fever,
    "wikitext": read_wikitext,
}


def check_records(records: Sequence[EditRecord], where: str) -> list[EditRecord]:
    """Drop records whose prompt or target is empty (the zsRE sample has two with an empty ``alt``), logging
    how many; a file left with no usable record is an error naming it."""
    kept = [r for r in records
            if r.prompt.strip() and (r.label is not None or not task_kind(r.kind).needs_target or r.target.strip())]
    if len(kept) < len(records):  # a handful (zsRE's sample has 2 of 800) is routine; more deserves a warning
        level = logging.INFO if len(records) - len(kept) <= 0.01 * len(records) else logging.WARNING
        log.log(level, "%s: dropped %d of %d records with an empty prompt or target", where,
                len(records) - len(kept), len(records))
    if records and not kept:
        raise DataError(f"{where}: no record has a non-empty prompt and target")
    return kept
