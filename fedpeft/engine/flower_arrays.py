"""Tensors in a Flower message: all of them packed into one ``Array``.

Flower 1.41 sends each ``Array`` of a message as objects of its own (the array, its chunks), and
every object is one request on each hop: ServerApp to SuperLink, SuperLink to SuperNode,
SuperNode to ClientApp, and back. MiniLM's LoRA tensors (26) make a message of 55 objects; packed
into one safetensors blob they make 5. The SuperLink, the nodes and their ClientApps share the
cores the clients train on, so fewer requests is less time per round. The encoding is lossless
(dtypes, shapes and values as sent), and a record of separate arrays is still read as such.

numpy, safetensors and Flower only: a node's ClientApp imports this without torch.
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np
from flwr.app import Array, ArrayRecord
from safetensors.numpy import load, save

PACKED = "fedpeft.safetensors"  # the one Array of a packed record
PACK_ENV = "FEDPEFT_FLOWER_PACK"
ORDER = "order"  # its metadata: the tensors' names in the order given (some callers need it)

Arrays = dict[str, np.ndarray]


def packing() -> bool:
    """Whether the ServerApp packs what it sends: yes unless ``FEDPEFT_FLOWER_PACK=0`` is set
    where it runs (one Array per tensor, as Flower's own ``ArrayRecord`` has it: the benchmark's
    baseline). A ClientApp answers in the form it was sent (``packed``)."""
    return os.environ.get(PACK_ENV, "1") != "0"


def packed(record: ArrayRecord) -> bool:
    return list(record.keys()) == [PACKED]


def pack(arrays: Arrays, one_array: bool = True) -> ArrayRecord:
    """Tensors -> a record of one Array, their safetensors encoding (empty: an empty record);
    with ``one_array`` False, an Array per tensor."""
    if not one_array:
        return ArrayRecord({name: Array.from_numpy_ndarray(a) for name, a in arrays.items()})
    if not arrays:
        return ArrayRecord()
    tensors = {name: np.require(a, requirements="C") for name, a in arrays.items()}
    blob = save(tensors, metadata={ORDER: json.dumps(list(arrays))})
    return ArrayRecord({PACKED: Array.from_numpy_ndarray(np.frombuffer(blob, np.uint8))})


def unpack(record: ArrayRecord) -> Arrays:
    """A record's tensors by name, in the order they were packed: a packed record's, else each
    Array's (writable copies)."""
    if not packed(record):
        return {name: np.array(array.numpy()) for name, array in record.items()}
    blob = record[PACKED].numpy().tobytes()  # a copy: the tensors decoded from it are writable
    tensors = load(blob)  # in no particular order
    (size,) = struct.unpack("<Q", blob[:8])  # safetensors: header length, then the JSON header
    order = json.loads(json.loads(blob[8 : 8 + size])["__metadata__"][ORDER])
    return {name: tensors[name] for name in order}
