"""The shard format: one tar member per sample, and an index per shard set.

A sample is a single `<key>.vlb` member (fewer tar members per sample read faster):

    b"VLB1" | uint32 LE header length | UTF-8 JSON header | arrays, each 16-byte aligned

The header holds `key`, `image_id`, `captions` (list of str), `image_w`, `image_h`,
`meta` (free-form: a toy-world scene, source ids) and `arrays`: name -> [dtype, shape,
offset]. Arrays:

    features   [N, F]  float16 (or float32)  detector region features
    boxes      [N, 4]  float32               x1, y1, x2, y2 in pixels
    cls_index  [N, k]  uint16                top-k classes of the detector's distribution
    cls_prob   [N, k]  float16               their probabilities; the remaining mass is spread
                                             evenly over the other classes (collate.py). With
                                             k = all classes: [N, C] and no cls_index.

Decoding is `json.loads` plus `np.frombuffer` views: no pickle anywhere, no copies.

Every shard set has an `index.json` beside its shards: shard names and sample counts,
feature dim, class count, top-k, source, and for a task's shard set the task's own
metadata (`task`: its name, example count, e.g. VQA's answer vocabulary). `select_fraction` picks a reproducible subset
of shards for the pretraining data-size ablation (a smaller fraction is always a
subset of a larger one).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import struct
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from vilbert.data.errors import BadSample, ShardError

MAGIC = b"VLB2"  # preamble: magic, uint32 header length, uint32 CRC-32 of everything after the preamble
LEGACY_MAGIC = b"VLB1"  # the first format: no checksum (still read, unverified)
_PREAMBLE = struct.Struct("<4sII")
SAMPLE_SUFFIX = "vlb"
INDEX_NAME = "index.json"
INDEX_FORMAT = "vilbert-shards/1"
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
    try:
        sample = json.loads(bytes(view[start:start + length]).rstrip(b"\0"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadSample(f"undecodable header: {e}") from None
    if not isinstance(sample, dict):
        raise BadSample(f"header is a JSON {type(sample).__name__}, not an object")
    for name, kind in _HEADER_FIELDS.items():
        if not isinstance(sample.get(name), kind) or isinstance(sample[name], bool):
            raise BadSample(f"header field {name!r} is {sample.get(name)!r:.40}, expected a {kind.__name__}")
    payload = start + length + (-(start + length) % _ALIGN)
    for name, spec in sample.pop("arrays").items():
        if name in sample:
            raise BadSample(f"array {name!r} has the name of a header field")
        sample[name] = _array(view, payload, name, spec)
    return sample


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


@dataclass
class ShardInfo:
    name: str
    samples: int
    bytes: int = 0


@dataclass
class ShardIndex:
    shards: list[ShardInfo]
    feature_dim: int
    num_classes: int
    class_topk: int
    feature_dtype: str = "float16"
    max_regions: int = 36
    source: str = ""
    class_names: list[str] = field(default_factory=list)
    task: dict = field(default_factory=dict)  # task shard sets: name, examples, and e.g. VQA's answer vocabulary
    format: str = INDEX_FORMAT

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def write(self, directory: str | Path) -> Path:
        path = Path(directory) / INDEX_NAME
        fields = asdict(self)
        fields["num_samples"] = self.num_samples
        path.write_text(json.dumps(fields, indent=1))
        return path

    @classmethod
    def read(cls, path: str | Path) -> ShardIndex:
        path = Path(path)
        if path.is_dir():
            path = path / INDEX_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path.parent} has no {INDEX_NAME}: not a shard set (`python -m shards write` "
                                    "makes them), or a write that did not finish")
        try:
            fields = json.loads(path.read_text())
            if not isinstance(fields, dict) or fields.get("format") != INDEX_FORMAT:
                raise ValueError(f"not a {INDEX_FORMAT} index")
            fields.pop("num_samples", None)
            fields["shards"] = [ShardInfo(**s) for s in fields["shards"]]
            index = cls(**fields)
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: unreadable shard index ({type(e).__name__}: {e})") from None
        for shard in index.shards:
            if not isinstance(shard.name, str) or "/" in shard.name or type(shard.samples) is not int \
                    or shard.samples < 0:
                raise ValueError(f"{path}: bad shard entry {asdict(shard)}")
        for name in ("feature_dim", "num_classes", "class_topk", "max_regions"):
            if type(getattr(index, name)) is not int or getattr(index, name) < 0:
                raise ValueError(f"{path}: {name} must be a non-negative integer, not {getattr(index, name)!r}")
        return index

    def select_fraction(self, fraction: float, seed: int = 0) -> list[ShardInfo]:
        """Whole shards, in a seeded order, until `fraction` of the samples is covered.
        The order does not depend on `fraction`, so 25% is a subset of 50%."""
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        order = list(self.shards)
        random.Random(seed).shuffle(order)
        chosen, covered = [], 0
        for shard in order:
            if covered >= fraction * self.num_samples:
                break
            chosen.append(shard)
            covered += shard.samples
        return chosen


UNREADABLE = "unreadable shard"


def open_url(url: str):
    """A readable binary stream for a local path, `pipe:COMMAND` (object stores: `pipe:aws s3
    cp s3://... -`) or any URL webdataset's gopen understands."""
    import webdataset as wds

    stream = wds.gopen(str(url), "rb")
    return stream if hasattr(stream, "readinto") else _ReadInto(stream)


class _ReadInto:
    """`readinto` for webdataset's Pipe, which has only `read` (and checks the command's exit
    status on close, so a failed download is an error, not a short shard)."""

    def __init__(self, stream):
        self.stream = stream

    def read(self, size: int = -1) -> bytes:
        return self.stream.read(size)

    def readinto(self, buffer) -> int:
        data = self.stream.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stream.close()


def read_shard(url: str):
    """Yield (key, bytes, None) for every `<key>.vlb` sample member of a shard, streaming;
    any other member, or one followed by damaged padding, comes as (key or name, None, why).
    Damage that stops the reading (a bad tar header, a size past the file's end, an early
    end) raises ShardError naming the member and its byte offset. The bytes are a bytearray,
    so decoded arrays are writable views (torch wants those).

    Reads the tar blocks directly (512-byte header, payload padded to 512): tarfile's
    streaming mode copies every payload through small buffers and costs more than the rest
    of decoding. GNU long names and pax `path` records are honoured."""
    import tarfile

    block, suffix, long_name, position, number = tarfile.BLOCKSIZE, "." + SAMPLE_SUFFIX, None, 0, 0
    try:
        stream = open_url(url)
    except OSError as e:
        raise ShardError(f"cannot open: {e}") from None
    with stream:
        file_size = _file_size(stream)
        while True:
            header = stream.read(block)
            if header == tarfile.NUL * block:  # end of archive: only zero blocks may follow
                while rest := stream.read(1 << 16):
                    if rest.strip(b"\0"):
                        raise ShardError(f"non-zero bytes after the end-of-archive marker at byte {position}")
                return
            where = f"member {number} at byte {position}"
            if len(header) < block:
                raise ShardError(f"{where}: the shard ends without an end-of-archive marker (truncated)")
            try:
                name, size, kind = _parse_tar_header(header)
            except ValueError as e:
                raise ShardError(f"{where}: bad tar header ({e})") from None
            where = f"member {number} {name!r:.80} at byte {position}"
            position += block
            if size > MAX_SAMPLE_BYTES or (file_size is not None and position + size > file_size):
                raise ShardError(f"{where}: size {size} runs past the end of the shard or the "
                                 f"{MAX_SAMPLE_BYTES >> 20} MiB a sample may have")
            data = bytearray(size)
            if stream.readinto(data) != size:
                raise ShardError(f"{where}: truncated (the shard ends inside it)")
            padding = stream.read(-size % block)
            position, number = position + size + (-size % block), number + 1
            damaged = padding.strip(b"\0") != b""
            if kind == tarfile.GNUTYPE_LONGNAME:
                long_name = data.rstrip(b"\0").decode("utf-8", "replace")
            elif kind in (tarfile.XHDTYPE, tarfile.XGLTYPE):
                records = data.decode("utf-8", "replace").split("\n")
                long_name = next((r.split("=", 1)[1] for r in records if " path=" in r), None)
            else:
                name, long_name = long_name or name, None
                if not (kind in (tarfile.REGTYPE, tarfile.AREGTYPE) and name.endswith(suffix)):
                    yield name, None, f"not a sample: member {name!r:.80} is not a regular .{SAMPLE_SUFFIX} file"
                elif damaged:
                    yield name[:-len(suffix)], None, "non-zero bytes in the tar padding after it: the file is damaged"
                else:
                    yield name[:-len(suffix)], data, None


def _file_size(stream) -> int | None:
    try:
        return os.fstat(stream.fileno()).st_size
    except (AttributeError, OSError, ValueError):
        return None  # a pipe or remote stream: the per-sample limit bounds allocations


_OCTAL = re.compile(rb"[0-7]*")


def _parse_tar_header(header: bytes) -> tuple[str, int, bytes]:
    """(name, size, type flag) of a ustar/GNU header block, checksum verified. Raises
    ValueError for a bad checksum or a field that is not a number."""
    stored = header[148:156].split(b"\0", 1)[0].strip()
    if not _OCTAL.fullmatch(stored) or int(stored, 8) != sum(header) - sum(header[148:156]) + 256:
        raise ValueError("checksum mismatch")  # (the checksum field itself counts as spaces)
    name = header[:100].split(b"\0", 1)[0]
    prefix = header[345:500].split(b"\0", 1)[0] if header[257:263] == b"ustar\x00" else b""
    size_field = header[124:136]
    if size_field[0] & 0x80:  # GNU base-256 (0xff: negative)
        size = int.from_bytes(size_field[1:], "big") if size_field[0] == 0x80 else -1
    else:
        digits = size_field.split(b"\0", 1)[0].strip()
        size = int(digits or b"0", 8) if _OCTAL.fullmatch(digits) else -1
    if size < 0:
        raise ValueError(f"size field {size_field!r} is not a size")
    return (prefix + b"/" + name if prefix else name).decode("utf-8", "replace"), size, header[156:157]


def read_checked_samples(url: str, feature_dim: int | None = None, num_classes: int | None = None,
                         verify: bool = True):
    """Yield (key, sample, problem) for every member of a shard: the decoded, valid sample
    and None, or None and why the member is bad. Damage that stops the reading ends the
    shard with one last problem, keyed `after <last key>`, that starts with UNREADABLE and
    names the member and byte offset."""
    key = None
    try:
        for key, data, problem in read_shard(url):
            if problem is not None:
                yield key, None, problem
                continue
            try:
                sample = decode_sample(data, verify)
                if sample["key"] != key:
                    raise BadSample(f"the member is named {key!r:.80} but holds sample {sample['key']!r:.80}")
                validate_sample(sample, feature_dim, num_classes)
            except BadSample as e:
                yield key, None, str(e)
                continue
            yield key, sample, None
    except (OSError, EOFError) as e:  # ShardError, and a `pipe:` command that failed
        yield (f"after {key}" if key is not None else "(start)"), None, f"{UNREADABLE}: {e}"
