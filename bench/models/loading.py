"""``load_model``: an alias, a local folder or a Hub id -> :class:`~bench.models.EditableModel`; what a name
resolves to and the checks of a model folder that run before any trial (one-line errors)."""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import torch

from bench.cache import rng_kept
from bench.models.editable import EditableModel
from bench.models.families import FAMILIES, Kind, ModelSpecError, family_of, select_edit_params
from bench.models.weights import TINY_ALIASES, minilm_dir, smollm2_dir, tiny_model

log = logging.getLogger(__name__)


ALIASES = ("smollm2-135m", "minilm-l6", *TINY_ALIASES)


# Hub ids of the paper's models that carry no organisation prefix.
BARE_HUB_IDS = frozenset({"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2", "bert-base-uncased", "t5-small"})


def resolve_model_source(name: str) -> str:
    """Validate a model name without loading weights: an alias, an existing local folder, or a Hub id.

    Returns a short description of the source; raises :class:`ModelSpecError` naming what would be valid.
    """
    if name in ALIASES:
        return "alias"
    folder = Path(name).expanduser()
    try:
        is_dir = folder.is_dir()
    except (OSError, ValueError):  # a name too long for a path, or with a NUL: not a folder
        is_dir = False
    if is_dir:
        check_model_folder(folder)
        return "local folder"
    parts = name.split("/")
    if (len(parts) == 2 and all(re.fullmatch(r"[\w][\w.\-]*", p) and ".." not in p for p in parts)
            and len(name) <= 96) or name in BARE_HUB_IDS:
        return "hub id"
    shown = repr(name) if len(name) <= 120 else repr(name[:120]) + "..."
    raise ModelSpecError(
        f"unknown model {shown}: not an alias ({', '.join(ALIASES)}), no folder at {_shown_path(folder)}, and not a "
        "Hugging Face id like 'org/name'"
    )


def _shown_path(p: Path) -> str:
    """``p`` made absolute for a message, cut to 200 characters (never raising on a name a path cannot hold)."""
    try:
        s = str(p.resolve())
    except (OSError, ValueError):
        s = str(p)
    return s if len(s) <= 200 else s[:200] + "..."


#: Files one of which a loadable model folder holds, per part (``save_pretrained`` / a Hub snapshot).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "tokenizer.model")


def check_model_folder(folder: Path) -> None:
    """A local model folder holds what loading it needs: a ``config.json`` naming a ``model_type`` transformers
    knows, weights (safetensors, a PyTorch bin, or a GGUF file) and a tokenizer; otherwise a
    :class:`ModelSpecError` in one line naming the folder and what is missing."""
    cfg = folder / "config.json"
    if not cfg.is_file():
        gguf = sorted(folder.glob("*.gguf"))
        if gguf:
            return  # a GGUF file carries its config and tokenizer (transformers' gguf_file=)
        raise ModelSpecError(f"model folder {folder}: no config.json (a model saved with save_pretrained, a Hub "
                             f"snapshot, or a .gguf file)")
    try:
        model_type = json.loads(cfg.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, AttributeError, OSError) as e:
        raise ModelSpecError(f"model folder {folder}: config.json is not a JSON object ({e})") from None
    from transformers import CONFIG_MAPPING  # heavy (seconds): a folder check needs it

    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise ModelSpecError(f"model folder {folder}: config.json has no model_type transformers knows "
                             f"(got {model_type!r})")
    if not any((folder / f).is_file() for f in WEIGHT_FILES) and not any(folder.glob("*.safetensors")):
        raise ModelSpecError(f"model folder {folder}: no weights (one of {', '.join(WEIGHT_FILES)})")
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ModelSpecError(f"model folder {folder}: no tokenizer (one of {', '.join(TOKENIZER_FILES)})")


_ALIAS_KINDS: dict[str, Kind] = {"smollm2-135m": "causal", "minilm-l6": "classifier", "tiny-gpt2": "causal",
                                 "tiny-llama": "causal", "tiny-t5": "seq2seq", "tiny-bart": "seq2seq",
                                 "tiny-bert": "classifier"}


def model_kind_hint(name: str) -> Kind | None:
    """The kind of a model known without loading weights: aliases, and local folders by their config.json;
    ``None`` for a Hub id (known once loaded)."""
    if name in _ALIAS_KINDS:
        return _ALIAS_KINDS[name]
    cfg = Path(name).expanduser() / "config.json"
    if cfg.is_file():
        try:
            return FAMILIES[family_of(json.loads(cfg.read_text()).get("model_type", ""))].kind
        except (ModelSpecError, ValueError):
            return None
    return None


def load_model(
    name: str,
    edit_params: list[str] | None = None,
    num_labels: int = 2,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> EditableModel:
    """Load a model by alias, local folder or Hub id; freeze it; choose its edited weights.

    Never runs remote code. ``edit_params`` globs override the family default.
    """
    import transformers as tf  # heavy (seconds): when weights load

    resolve_model_source(name)
    t0 = time.time()
    meta: dict = {}
    if name in TINY_ALIASES:
        with rng_kept():  # seeded to 0 inside: the same weights always, the caller's random state untouched
            model, tok = tiny_model(name, num_labels)
    else:
        if name == "smollm2-135m":
            path = str(smollm2_dir())
        elif name == "minilm-l6":
            path = str(minilm_dir())
        else:
            path = str(Path(name).expanduser()) if Path(name).expanduser().is_dir() else name
        cfg = tf.AutoConfig.from_pretrained(path, trust_remote_code=False)
        fam = family_of(cfg.model_type)
        kind = FAMILIES[fam].kind
        cls = {
            "causal": tf.AutoModelForCausalLM,
            "seq2seq": tf.AutoModelForSeq2SeqLM,
            "classifier": tf.AutoModelForSequenceClassification,
        }[kind]
        extra = {"num_labels": num_labels} if kind == "classifier" else {}
        model = cls.from_pretrained(path, dtype=dtype, trust_remote_code=False, **extra)
        tok = tf.AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        meta["path"] = path
    fam = family_of(model.config.model_type)
    spec = FAMILIES[fam]
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = model.to(dtype=dtype)
    if device is not None:
        model = model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, _ in model.named_parameters()]
    chosen = select_edit_params(names, fam, edit_params)
    meta["n_params"] = sum(p.numel() for p in model.parameters())
    meta["load_s"] = round(time.time() - t0, 3)
    log.info("loaded %s (%s, %.1fM params) in %.1fs; editing %d weights", name, fam, meta["n_params"] / 1e6,
             meta["load_s"], len(chosen))
    return EditableModel(name=name, model=model, tokenizer=tok, family=fam, kind=spec.kind, edit_params=chosen,
                         conv1d=spec.conv1d, meta=meta)
