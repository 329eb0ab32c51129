"""Relation datasets and clean/corrupt prompt pairs.

``load_dataset`` gives a validated :class:`RelationDataset` (bundled name or a .json/.csv file);
``build_prompts`` turns it into same-length clean/corrupt :class:`PromptPair` objects for
activation patching, counting every candidate it had to skip.
"""

from kcircuits.data.datasets import (
    CATEGORIES,
    RelationDataset,
    dataset_info,
    list_datasets,
    load_dataset,
    split_samples,
)
from kcircuits.data.prompts import (
    PromptPair,
    PromptSet,
    answer_token_ids,
    build_prompts,
    cap_pairs,
    encode_text,
    parse_template_specs,
)

__all__ = [
    "CATEGORIES",
    "PromptPair",
    "PromptSet",
    "RelationDataset",
    "answer_token_ids",
    "build_prompts",
    "cap_pairs",
    "encode_text",
    "parse_template_specs",
    "dataset_info",
    "list_datasets",
    "load_dataset",
    "split_samples",
]
