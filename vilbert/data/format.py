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
import random
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

MAGIC = b"VLB1"
SAMPLE_SUFFIX = "vlb"
INDEX_NAME = "index.json"
INDEX_FORMAT = "vilbert-shards/1"
_ALIGN = 16


class BadSample(ValueError):
    """A sample that cannot be used; the message says why."""


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
    head = MAGIC + struct.pack("<I", len(header)) + header
    head += b"\0" * (-len(head) % _ALIGN)  # so the payload (and every array) starts aligned
    return b"".join([head, *chunks])


def decode_sample(data: bytes) -> dict:
    """Header fields plus one numpy array per stored array. Raises BadSample."""
    if len(data) < 8 or data[:4] != MAGIC:
        raise BadSample("not a vilbert sample (bad magic)")
    (length,) = struct.unpack_from("<I", data, 4)
    try:
        sample = json.loads(data[8:8 + length])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadSample(f"undecodable header: {e}") from None
    start = 8 + length + (-(8 + length) % _ALIGN)
    for name, (dtype, shape, offset) in sample.pop("arrays").items():
        count = int(np.prod(shape))
        try:
            sample[name] = np.frombuffer(data, dtype=np.dtype(dtype), count=count,
                                         offset=start + offset).reshape(shape)
        except (ValueError, TypeError) as e:
            raise BadSample(f"undecodable array {name!r}: {e}") from None
    return sample


def validate_sample(sample: dict, feature_dim: int | None = None) -> None:
    """Raise BadSample for what would poison training: missing or empty captions, zero
    boxes, wrong shapes, NaN/inf features or boxes."""
    if not sample.get("captions") or not all(isinstance(c, str) and c.strip() for c in sample["captions"]):
        raise BadSample("empty caption")
    for name in ("features", "boxes"):
        if name not in sample:
            raise BadSample(f"missing array {name!r}")
    features, boxes = sample["features"], sample["boxes"]
    if features.ndim != 2 or features.shape[0] == 0:
        raise BadSample(f"zero boxes (features of shape {features.shape})")
    if feature_dim is not None and features.shape[1] != feature_dim:
        raise BadSample(f"wrong feature shape {features.shape}, expected [N, {feature_dim}]")
    if boxes.shape != (features.shape[0], 4):
        raise BadSample(f"wrong box shape {boxes.shape} for {features.shape[0]} regions")
    if "cls_index" in sample and sample["cls_prob"].shape != sample["cls_index"].shape:
        raise BadSample("cls_prob and cls_index shapes differ")
    if "cls_prob" in sample and len(sample["cls_prob"]) != features.shape[0]:
        raise BadSample(f"class distributions for {len(sample['cls_prob'])} of {features.shape[0]} regions")
    for name in ("features", "boxes", "cls_prob"):
        if name in sample and not _all_finite(sample[name]):
            raise BadSample(f"NaN or inf in {name}")
    if sample["image_w"] <= 0 or sample["image_h"] <= 0:
        raise BadSample(f"bad image size {sample['image_w']}x{sample['image_h']}")


def _all_finite(array: np.ndarray) -> bool:
    if array.dtype == np.float16:  # exponent bits all ones = inf/NaN; integer ops beat isfinite on halves
        return not ((array.view(np.uint16) & 0x7C00) == 0x7C00).any()
    return bool(np.isfinite(array).all())


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
        fields = json.loads(path.read_text())
        if fields.get("format") != INDEX_FORMAT:
            raise ValueError(f"{path}: not a {INDEX_FORMAT} index (format={fields.get('format')!r})")
        fields.pop("num_samples", None)
        fields["shards"] = [ShardInfo(**s) for s in fields["shards"]]
        return cls(**fields)

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
    """Yield (key, member bytes) for every sample member of a shard, streaming. A truncated
    or corrupt tar raises `tarfile.TarError` or `EOFError` at the point of damage. The bytes
    are a bytearray, so decoded arrays are writable views (torch wants those).

    Reads the tar blocks directly (512-byte header, payload padded to 512): tarfile's
    streaming mode copies every payload through small buffers and costs more than the rest
    of decoding. GNU long names and pax `path` records are honoured."""
    import tarfile

    suffix, long_name = "." + SAMPLE_SUFFIX, None
    with open_url(url) as stream:
        while True:
            header = stream.read(tarfile.BLOCKSIZE)
            if len(header) < tarfile.BLOCKSIZE or header == tarfile.NUL * tarfile.BLOCKSIZE:
                if header.strip(tarfile.NUL):
                    raise EOFError("truncated tar header")
                return  # end of archive
            name, size, kind = _parse_tar_header(header)
            data = bytearray(size)
            if stream.readinto(data) != size:
                raise EOFError(f"{name} is truncated")
            stream.read(-size % tarfile.BLOCKSIZE)
            if kind == tarfile.GNUTYPE_LONGNAME:
                long_name = data.rstrip(b"\0").decode()
            elif kind in (tarfile.XHDTYPE, tarfile.XGLTYPE):
                long_name = next((r.split("=", 1)[1] for r in data.decode().split("\n") if " path=" in r), None)
            else:
                name, long_name = long_name or name, None
                if kind in (tarfile.REGTYPE, tarfile.AREGTYPE) and name.endswith(suffix):
                    yield name[:-len(suffix)], data


def _parse_tar_header(header: bytes) -> tuple[str, int, bytes]:
    """(name, size, type flag) of a ustar/GNU header block, checksum verified."""
    import tarfile

    stored = header[148:156].split(b"\0", 1)[0].strip()
    if not stored or int(stored, 8) != sum(header) - sum(header[148:156]) + 256:  # checksum field counts as spaces
        raise tarfile.HeaderError("bad tar header checksum")
    name = header[:100].split(b"\0", 1)[0]
    prefix = header[345:500].split(b"\0", 1)[0] if header[257:263] == b"ustar\x00" else b""
    size_field = header[124:136]
    size = (int.from_bytes(size_field[1:], "big") if size_field[0] & 0x80
            else int(size_field.split(b"\0", 1)[0].strip() or b"0", 8))
    return (prefix + b"/" + name if prefix else name).decode("utf-8", "surrogateescape"), size, header[156:157]


UNREADABLE = "unreadable shard"


def read_checked_samples(url: str, feature_dim: int | None = None):
    """Yield (key, sample, problem) for every sample of a shard: the decoded, valid sample
    and None, or None and why the sample is bad. A truncated or corrupt tar ends the shard
    with one last problem, keyed `after <last key>`, that starts with UNREADABLE."""
    import tarfile

    key = "(start of shard)"
    try:
        for key, data in read_shard(url):
            try:
                sample = decode_sample(data)
                validate_sample(sample, feature_dim)
            except BadSample as e:
                yield key, None, str(e)
                continue
            yield key, sample, None
    except (tarfile.TarError, OSError, EOFError) as e:
        yield f"after {key}", None, f"{UNREADABLE} ({type(e).__name__}: {e})"
