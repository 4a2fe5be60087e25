"""One sample's bytes: checksums, the first format, values that would crash later."""

import json

import numpy as np
import pytest

from vilbert.data.errors import BadSample
from vilbert.data.sample_codec import decode_sample, encode_sample, validate_sample


def _sample(**changes):
    rng = np.random.default_rng(0)
    arrays = {"features": rng.normal(size=(3, 8)).astype(np.float16),
              "boxes": np.array([[0, 0, 10, 10], [5, 5, 50, 40], [90, 70, 100, 80]], np.float32),
              "cls_index": np.array([[0, 1], [2, 3], [4, 0]], np.uint16),
              "cls_prob": np.full((3, 2), 0.4, np.float16)}
    arrays.update(changes)
    return encode_sample("k", "k", ["a caption"], 100, 80, arrays)


# --- samples: integrity and values -------------------------------------------------------
def test_the_checksum_finds_a_flipped_payload_byte_and_can_be_skipped():
    data = bytearray(_sample())
    data[-5] ^= 0x01
    with pytest.raises(BadSample, match="checksum mismatch"):
        decode_sample(data)
    assert decode_sample(data, verify=False)["features"].shape == (3, 8)  # data.verify_checksums=false


def test_first_format_samples_are_still_read_unverified():
    data = _sample()
    length = int.from_bytes(data[4:8], "little")
    header = data[12:12 + length].rstrip(b"\0")
    legacy = b"VLB1" + len(header).to_bytes(4, "little") + header
    legacy += b"\0" * (-len(legacy) % 16) + data[12 + length:]  # VLB1: no checksum, arrays after the aligned header
    old, new = decode_sample(legacy), decode_sample(data)
    assert old["key"] == new["key"] and all(np.array_equal(old[k], new[k]) for k in ("features", "boxes", "cls_prob"))


@pytest.mark.parametrize("changes, reason", [
    ({"cls_index": np.array([[0, 1], [2, 9], [4, 0]], np.uint16)}, "class index 9 is past the 5 classes"),
    ({"boxes": np.array([[0, 0, 10, 10], [5, 5, 500, 40], [90, 70, 100, 80]], np.float32)}, "outside"),
    ({"boxes": np.zeros((2, 4), np.float32)}, "wrong box shape"),
    ({"cls_prob": np.full((2, 2), 0.4, np.float16)}, r"class distributions of shape \(2, 2\) for 3 regions"),
    ({"cls_index": np.zeros((3, 3), np.uint16)}, "does not match cls_prob"),
    ({"features": np.zeros((3, 8), np.int32)}, "not features"),
])
def test_values_that_would_crash_later_are_bad_samples(changes, reason):
    with pytest.raises(BadSample, match=reason):
        validate_sample(decode_sample(_sample(**changes)), feature_dim=8, num_classes=5)


def test_a_header_cannot_size_an_allocation():
    data = _sample()
    header = json.loads(data[12:12 + int.from_bytes(data[4:8], "little")].rstrip(b"\0"))
    for spec in ([["<f2", [2 ** 40, 8], 0]], [["|O", [3], 0]], [["<f2", [-1, 8], 0]], [["<f2", [3, 8], 2 ** 62]]):
        header["arrays"]["features"] = spec[0]
        body = json.dumps(header).encode()
        with pytest.raises(BadSample, match="features"):
            decode_sample(b"VLB1" + len(body).to_bytes(4, "little") + body + b"\0" * 64)
