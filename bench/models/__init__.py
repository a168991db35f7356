"""Models: what an editor edits, and where it comes from.

``load_model(name)`` returns an :class:`EditableModel`: the Hugging Face model (frozen, eval mode), its tokenizer,
its family and kind (causal / seq2seq / classifier), and the names of the weights an editor may change. The model
is run with replaced weights through :meth:`EditableModel.logits`, which uses ``torch.func.functional_call`` so
the module itself is never mutated.

- :mod:`bench.models.families`: the per-family table of kinds and edited weights;
- :mod:`bench.models.editable`: ``EditableModel`` and the digest of its weights;
- :mod:`bench.models.adaptors`: module adaptors, edits that are not weight deltas (GRACE's codebook);
- :mod:`bench.models.weights`: SmolLM2 (GGUF, converted once), MiniLM, the tiny test models;
- :mod:`bench.models.loading`: aliases, folders and Hub ids -> ``load_model``, checks before any trial.
"""

from bench.models.adaptors import Adaptor, Change, compose, load_adaptor, split
from bench.models.editable import EditableModel, LayerIO, StopForward, weights_digest
from bench.models.families import FAMILIES, FamilySpec, Kind, ModelSpecError, family_of, select_edit_params
from bench.models.loading import (ALIASES, BARE_HUB_IDS, check_model_folder, load_model, model_kind_hint,
                                  resolve_model_source)
from bench.models.weights import SMOLLM2_GGUF, SMOLLM2_HUB_ID, TINY_ALIASES, minilm_dir, smollm2_dir

__all__ = [
    "Adaptor", "Change", "compose", "load_adaptor", "split", "ALIASES", "BARE_HUB_IDS", "FAMILIES", "SMOLLM2_GGUF", "SMOLLM2_HUB_ID", "TINY_ALIASES", "EditableModel",
    "FamilySpec", "Kind", "LayerIO", "ModelSpecError", "StopForward", "check_model_folder", "family_of",
    "load_model", "minilm_dir", "model_kind_hint", "resolve_model_source", "select_edit_params", "smollm2_dir",
    "weights_digest",
]
