"""Tensors packed into one Array per message (``fedpeft.engine.flower_arrays``)."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_object_tree, iterate_object_tree

from fedpeft.engine.flower_arrays import PACKED, pack, packed, packing, unpack


def lora_like() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {f"layer.{i}.lora_A": rng.standard_normal((8, 384), np.float32) for i in range(24)}
    arrays["classifier.weight"] = rng.standard_normal((4, 384)).astype(np.float16)
    arrays["update.int8"] = rng.integers(-128, 128, (5, 3), dtype=np.int8)
    arrays["scale"] = np.array(0.25, np.float32)  # 0-d
    arrays["transposed"] = np.arange(6, dtype=np.float32).reshape(2, 3).T  # not C-contiguous
    return arrays


def objects(record: ArrayRecord) -> int:
    content = RecordDict({"arrays": record, "config": ConfigRecord({"round": 1})})
    return sum(1 for _ in iterate_object_tree(get_object_tree(content)))


def test_round_trip_keeps_names_dtypes_shapes_and_values():
    arrays = lora_like()
    record = pack(arrays)
    assert list(record.keys()) == [PACKED]
    back = unpack(record)
    assert list(back) == list(arrays)  # SecAgg+ sums the clients' tensors by position
    for name, array in arrays.items():
        assert back[name].dtype == array.dtype and back[name].shape == array.shape, name
        np.testing.assert_array_equal(back[name], array)
        assert back[name].flags.writeable  # the worker trains from them in place


def test_order_is_kept_whatever_the_names():
    names = ["z", "a", "m", "b.weight", "b.bias"]
    arrays = {name: np.full(i + 1, i, np.float32) for i, name in enumerate(names)}
    for _ in range(5):  # the decoder's own order is not the packing order
        assert list(unpack(pack(arrays))) == names


def test_a_packed_message_is_a_handful_of_objects():
    arrays = lora_like()
    separate = ArrayRecord({k: Array.from_numpy_ndarray(a) for k, a in arrays.items()})
    assert objects(separate) == 2 * len(arrays) + 3  # an array and its chunk each
    assert objects(pack(arrays)) == 5


def test_separate_arrays_are_still_read():
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2, np.int8)}
    record = ArrayRecord({k: Array.from_numpy_ndarray(a) for k, a in arrays.items()})
    back = unpack(record)
    assert set(back) == {"a", "b"}
    np.testing.assert_array_equal(back["a"], arrays["a"])
    assert back["b"].dtype == np.int8


def test_empty():
    assert len(pack({})) == 0 and unpack(ArrayRecord()) == {}


def test_unpacked_on_request(monkeypatch):
    arrays = {"a": np.ones((2, 2), np.float32), "b": np.zeros(3, np.float32)}
    separate = pack(arrays, one_array=False)
    assert list(separate.keys()) == ["a", "b"] and not packed(separate)
    assert packed(pack(arrays))
    monkeypatch.setenv("FEDPEFT_FLOWER_PACK", "0")  # the benchmark's baseline
    assert not packing()
    monkeypatch.delenv("FEDPEFT_FLOWER_PACK")
    assert packing()
