"""Datasets of token-based embeddings (256 x 16 x 16) for the bias IEMs, as the seed's ``dataset.py``.

The readers live once in ``cortex.data.formats`` (shared with ``VQGAN_explanation``); this module keeps the
seed's import path: ``from dataset import EmbeddingDataset``. Data of a bias type live in
``datasets/{bias_type}/embeddings/`` (``cortex.paths.ExperimentPaths(experiment="dalle", bias_type=...)``).
"""
from cortex.analysis.bias import read_neutral_set  # noqa: F401
from cortex.data.formats import (  # noqa: F401
    EmbeddingDataset,
    Record,
    TokenLookup,
    ids_to_embedding,
    image_path,
    load_codebook,
    load_token_indices,
    read_split,
)
from cortex.data.writer import DatasetWriter  # noqa: F401
