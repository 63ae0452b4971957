"""Datasets for federated fine-tuning: load a source, split it across clients, tokenise it once."""

from fedpeft.data.partition import Partition, make_partition, partition_summary
from fedpeft.data.sources import DataError, DataSplits, TextDataset, load_source, subsample
from fedpeft.data.tokenize import TokenizedData, iter_batches, tokenize

__all__ = [
    "DataError",
    "DataSplits",
    "Partition",
    "TextDataset",
    "TokenizedData",
    "iter_batches",
    "load_source",
    "make_partition",
    "partition_summary",
    "subsample",
    "tokenize",
]
