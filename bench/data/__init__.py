"""Edit records, dataset cards, data files, readers, seeded splits and tokenised edit batches, one module each:

- :mod:`bench.data.records`: ``EditRecord``, ``DataError``, split names;
- :mod:`bench.data.kinds`: one object per task kind (QA, completion, classification, generation), owning what
  differs by kind; a new kind is a subclass and ``register_kind``;
- :mod:`bench.data.cards`: dataset cards (``datasets/<name>.yaml``), validated with pydantic like sweep files;
- :mod:`bench.data.files`: the data root (the sweep's ``data_root``, else ``$EDITBENCH_DATA``, else the files
  embedded in ``datasets/data/``), file lookup and hashing, atomic writes, packing for cluster workers;
- :mod:`bench.data.sources`: embedded / local / Hub sources, every file read through Hugging Face ``datasets``;
- :mod:`bench.data.readers`: data file -> edit records through a card's field mapping;
- :mod:`bench.data.splits`: seeded train/val/test splits, overlap checks, locality prompt sources;
- :mod:`bench.data.batches`: tokenised ``EditBatch`` es, all that editors (``methods/``) need.

Everything is re-exported here, so ``from bench.data import X`` keeps working.
"""

from bench.data.batches import (
                                EditBatch,
                                collate,
                                edit_batch,
                                equiv_batch,
                                loc_batch,
                                stack_batches,
)
from bench.data.cards import (
                                CARDS_DIR,
                                EMBEDDED_ROOT,
                                HubFile,
                                HubSource,
                                REPO_ROOT,
                                DatasetCard,
                                LocalitySource,
                                available_cards,
                                load_card,
)
from bench.data.files import (
                                data_root_candidates,
                                file_sha256,
                                pack_files,
                                read_text,
                                resolve_file,
                                unpack_files,
                                write_atomic,
)
from bench.data.readers import (
                                READERS,
                                check_records,
                                read_fever,
                                read_mapped_json,
                                read_wikitext,
)
from bench.data.kinds import KINDS, TaskKind, kind_of, register_kind, task_kind
from bench.data.records import SPLITS, DataError, EditRecord
from bench.data.sources import SOURCES, DataRef, HubRef, dataset_root, hub_file, load_hub, local_ref
from bench.data.splits import (
                                TaskData,
                                apply_locality,
                                load_task,
                                locality_pool,
                                split_overlaps,
                                with_locality,
)

__all__ = [
    "KINDS", "kind_of", "register_kind", "task_kind", "CARDS_DIR", "EMBEDDED_ROOT", "SOURCES", "DataRef", "HubFile", "HubRef", "HubSource", "dataset_root",
    "hub_file", "load_hub", "local_ref", "READERS", "REPO_ROOT", "SPLITS", "DataError", "DatasetCard", "EditBatch", "EditRecord",
    "LocalitySource", "TaskData", "TaskKind", "apply_locality", "available_cards", "check_records", "collate",
    "data_root_candidates", "edit_batch", "equiv_batch", "file_sha256", "load_card", "load_task",
    "loc_batch", "locality_pool", "pack_files", "read_fever", "read_mapped_json", "read_text", "read_wikitext",
    "resolve_file", "split_overlaps", "stack_batches", "unpack_files", "with_locality", "write_atomic",
]
