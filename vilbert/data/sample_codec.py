"""One sample of the shard format: its bytes, and the checks a decoded sample must pass.

A sample is a single `<key>.vlb` tar member (fewer tar members per sample read faster):

    b"VLB2" | uint32 LE header length | uint32 CRC-32 | UTF-8 JSON header | arrays, each 16-byte aligned

The header holds `key`, `image_id`, `captions` (list of str), `image_w`, `image_h`,
`meta` (free-form: a toy-world scene, source ids) and `arrays`: name -> [dtype, shape,
offset]. Arrays:

    features   [N, F]  float16 (or float32)  detector region features
    boxes      [N, 4]  float32               x1, y1, x2, y2 in pixels
    cls_index  [N, k]  uint16                top-k classes of the detector's distribution
    cls_prob   [N, k]  float16               their probabilities; the remaining mass is spread
                                             evenly over the other classes (collate.py). With
                                             k = all classes: [N, C] and no cls_index.

Decoding is `json.loads` plus `np.frombuffer` views: no pickle anywhere, no copies. The
shard set around the samples: `shard_index.py`; reading them from tar shards: `tar_reader.py`.
"""

from __future__ import annotations

import json
import math
import struct
import zlib

import numpy as np

from vilbert.data.errors import BadSample

MAGIC = b"VLB2"  # preamble: magic, uint32 header length, uint32 CRC-32 of everything after the preamble
LEGACY_MAGIC = b"VLB1"  # the first format: no checksum (still read, unverified)
_PREAMBLE = struct.Struct("<4sII")
SAMPLE_SUFFIX = "vlb"
_ALIGN = 16
MAX_SAMPLE_BYTES = 64 << 20  # a tar member claiming more is damage (100 regions x 2048 float32 are 0.8 MB)
_ARRAY_KINDS = "biuf"  # booleans, integers, floats: never objects, strings or structured types
_HEADER_FIELDS = {"key": str, "image_id": str, "captions": list, "image_w": int, "image_h": int, "meta": dict,
                  "arrays": dict}


def encode_sample(key: str, image_id: str, captions: list[str], image_w: int, image_h: int,
                  arrays: dict[str, np.ndarray], meta: dict | None = None) -> bytes:
    specs, chunks, offset = {}, [], 0
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        pad = -offset % _ALIGN
        chunks += [b"\0" * pad, array.data.cast("B")]  # views: the one copy is the final join
        specs[name] = [array.dtype.str, list(array.shape), offset + pad]
        offset += pad + array.nbytes
    header = json.dumps({"key": key, "image_id": str(image_id), "captions": list(captions), "image_w": int(image_w),
                         "image_h": int(image_h), "meta": meta or {}, "arrays": specs},
                        separators=(",", ":")).encode()
    header += b"\0" * (-(_PREAMBLE.size + len(header)) % _ALIGN)  # so the payload (every array) starts aligned
    checksum = zlib.crc32(header)
    for chunk in chunks:
        checksum = zlib.crc32(chunk, checksum)
    return b"".join([_PREAMBLE.pack(MAGIC, len(header), checksum), header, *chunks])


def decode_sample(data: bytes, verify: bool = True) -> dict:
    """Header fields plus one numpy array per stored array (views of `data`). Every field
    is checked before it is used (no allocation or read is sized from an unchecked value);
    with `verify`, the CRC-32 of header and payload too. Raises BadSample."""
    view = memoryview(data)
    if len(data) >= _PREAMBLE.size and data[:4] == MAGIC:
        _, length, checksum = _PREAMBLE.unpack_from(data)
        start = _PREAMBLE.size
        if verify and zlib.crc32(view[start:]) != checksum:
            raise BadSample(f"checksum mismatch: the sample's bytes are damaged (stored {checksum:08x}, "
                            f"computed {zlib.crc32(view[start:]):08x})")
    elif len(data) >= 8 and data[:4] == LEGACY_MAGIC:
        (length,), start = struct.unpack_from("<I", data, 4), 8
    else:
        raise BadSample(f"not a vilbert sample (magic {bytes(data[:4])!r})")
    if start + length > len(data):
        raise BadSample(f"header length {length} runs past the sample's {len(data)} bytes")
    sample = _header(bytes(view[start:start + length]))
    payload = start + length + (-(start + length) % _ALIGN)
    for name, spec in sample.pop("arrays").items():
        if name in sample:
            raise BadSample(f"array {name!r} has the name of a header field")
        sample[name] = _array(view, payload, name, spec)
    return sample


def read_header(file, size: int) -> dict:
    """The header fields (arrays as descriptors, nothing checksummed) of the `size`-byte
    sample at a binary file's position, reading the header only. Raises BadSample."""
    preamble = file.read(_PREAMBLE.size)
    if len(preamble) < _PREAMBLE.size or preamble[:4] not in (MAGIC, LEGACY_MAGIC):
        raise BadSample(f"not a vilbert sample (magic {bytes(preamble[:4])!r})")
    (length,), start = struct.unpack_from("<I", preamble, 4), _PREAMBLE.size
    if preamble[:4] == LEGACY_MAGIC:  # magic and length only: the header starts at byte 8
        file.seek(8 - _PREAMBLE.size, 1)
        start = 8
    if start + length > size:
        raise BadSample(f"header length {length} runs past the sample's {size} bytes")
    return _header(file.read(length))


def _header(raw: bytes) -> dict:
    try:
        header = json.loads(raw.rstrip(b"\0"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadSample(f"undecodable header: {e}") from None
    if not isinstance(header, dict):
        raise BadSample(f"header is a JSON {type(header).__name__}, not an object")
    for name, kind in _HEADER_FIELDS.items():
        if not isinstance(header.get(name), kind) or isinstance(header[name], bool):
            raise BadSample(f"header field {name!r} is {header.get(name)!r:.40}, expected a {kind.__name__}")
    return header


def _array(view: memoryview, payload: int, name: str, spec) -> np.ndarray:
    if not (isinstance(spec, list) and len(spec) == 3 and isinstance(spec[0], str) and isinstance(spec[1], list)
            and all(type(n) is int and n >= 0 for n in [*spec[1], spec[2]])):
        raise BadSample(f"array {name!r}: descriptor {spec!r:.60} is not [dtype, shape, offset]")
    dtype, shape, offset = spec
    try:
        dtype = np.dtype(dtype)
    except (TypeError, ValueError):
        raise BadSample(f"array {name!r}: unknown dtype {dtype!r:.30}") from None
    if dtype.kind not in _ARRAY_KINDS or dtype.itemsize > 8 or len(shape) > 4:
        raise BadSample(f"array {name!r}: {dtype} of {len(shape)} dimensions is not a stored array type")
    count = math.prod(shape)
    if payload + offset + count * dtype.itemsize > len(view):
        raise BadSample(f"array {name!r} ({dtype}, shape {shape}, offset {offset}) runs past the sample's end")
    return np.frombuffer(view.obj, dtype=dtype, count=count, offset=payload + offset).reshape(shape)


def validate_sample(sample: dict, feature_dim: int | None = None, num_classes: int | None = None) -> None:
    """Raise BadSample for what would poison training or crash it later: missing or empty
    captions, zero boxes, shapes that disagree with each other or the index, NaN/inf, boxes
    outside the image, class indices past the class count."""
    if not sample["captions"] or not all(isinstance(c, str) and c.strip() for c in sample["captions"]):
        raise BadSample("empty caption")
    for name in ("features", "boxes"):
        if name not in sample:
            raise BadSample(f"missing array {name!r}")
    features, boxes = sample["features"], sample["boxes"]
    if features.ndim != 2 or features.shape[0] == 0 or features.dtype.kind != "f":
        raise BadSample(f"zero boxes or not features ({features.dtype} of shape {features.shape})")
    if feature_dim is not None and features.shape[1] != feature_dim:
        raise BadSample(f"wrong feature shape {features.shape}, expected [N, {feature_dim}]")
    if boxes.shape != (features.shape[0], 4):
        raise BadSample(f"wrong box shape {boxes.shape} for {features.shape[0]} regions")
    for name in ("features", "boxes", "cls_prob"):
        if name in sample and not _all_finite(sample[name]):
            raise BadSample(f"NaN or inf in {name}")
    width, height = sample["image_w"], sample["image_h"]
    if width <= 0 or height <= 0:
        raise BadSample(f"bad image size {width}x{height}")
    slack = 1 + 0.01 * max(width, height)  # detectors round and pad boxes a little past the border
    x1, y1, x2, y2 = boxes.astype(np.float32).T
    if (x1 < -slack).any() or (y1 < -slack).any() or (x2 > width + slack).any() or (y2 > height + slack).any() \
            or (x2 < x1).any() or (y2 < y1).any():
        raise BadSample(f"a box lies outside the {width}x{height} image or is inverted")
    _validate_classes(sample, features.shape[0], num_classes)


def _validate_classes(sample: dict, regions: int, num_classes: int | None) -> None:
    if "cls_prob" not in sample:
        if num_classes:
            raise BadSample(f"missing class distribution (the index says {num_classes} classes)")
        return
    prob = sample["cls_prob"]
    if prob.ndim != 2 or len(prob) != regions:
        raise BadSample(f"class distributions of shape {prob.shape} for {regions} regions")
    if "cls_index" in sample:
        index = sample["cls_index"]
        if index.shape != prob.shape or index.dtype.kind not in "iu":
            raise BadSample(f"cls_index ({index.dtype}, {index.shape}) does not match cls_prob {prob.shape}")
        if num_classes and index.size and int(index.max()) >= num_classes:
            raise BadSample(f"class index {int(index.max())} is past the {num_classes} classes")
    elif num_classes and prob.shape[1] != num_classes:
        raise BadSample(f"dense class distributions of {prob.shape[1]} classes, the index says {num_classes}")


def _all_finite(array: np.ndarray) -> bool:
    if array.dtype == np.float16:  # exponent bits all ones = inf/NaN; integer ops beat isfinite on halves
        return not ((array.view(np.uint16) & 0x7C00) == 0x7C00).any()
    return array.dtype.kind != "f" or bool(np.isfinite(array).all())


def compact_class_distribution(probs: np.ndarray, k: int) -> tuple[np.ndarray | None, np.ndarray]:
    """[N, C] distributions -> top-k (uint16 indices, float16 probabilities); with k >= C
    the whole distribution in float16 and no indices."""
    if k >= probs.shape[1]:
        return None, probs.astype(np.float16)
    index = np.argpartition(-probs, k - 1, axis=1)[:, :k]
    return index.astype(np.uint16), np.take_along_axis(probs, index, 1).astype(np.float16)
