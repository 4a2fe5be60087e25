"""Seeded corruption of a valid shard set: the fuzz test runs a few hundred cases,
`benchmarks/shard_fuzz.py` a few thousand. Each case damages one shard in one of these ways:

    flip          one byte anywhere XOR a random non-zero value (disk or network damage)
    truncate      the file cut at a random offset
    tar_header    a field of a member's tar header (name, mode, size, checksum, type, magic)
                  overwritten with junk: non-octal text, huge or zero sizes, base-256 markers;
                  half the time the header checksum is then fixed, so the field itself is tested
    sample_header the JSON header of a sample edited (a key deleted or given a wrong type, an
                  array descriptor's dtype, shape or offset changed) and its CRC recomputed: what
                  a buggy writer would produce
    payload       array bytes of a sample overwritten (NaN, huge values, out-of-range class
                  indices, random bytes), CRC recomputed

and then asks `check` and the training stream about it. `run_case` returns the outcome
classes; `assert_sound` states what must hold.
"""

from __future__ import annotations

import json
import math
import random
import signal
import struct
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

KINDS = ("flip", "truncate", "tar_header", "sample_header", "payload")
DISK_DAMAGE = ("flip", "truncate", "tar_header")  # check must see these (or they changed nothing)
TAR_FIELDS = {"name": (0, 100), "mode": (100, 8), "size": (124, 12), "checksum": (148, 8), "type": (156, 1),
              "magic": (257, 6)}
STREAM_BATCHES, BATCH_SIZE, TIME_LIMIT_S = 12, 4, 30


@dataclass
class Case:
    kind: str
    what: str
    check: str  # "problems" | "clean"
    problems: list[str]
    stream: str  # "completed" | "completed, damage counted" | the DataError's class name
    intact: bool  # the shard's members read back exactly as written


def _members(data: bytes) -> list[tuple[int, int, str]]:
    """(header offset, payload size, name) of each member of a well-formed shard."""
    out, position = [], 0
    while position + 512 <= len(data) and data[position:position + 512].strip(b"\0"):
        info = tarfile.TarInfo.frombuf(data[position:position + 512], "utf-8", "surrogateescape")
        out.append((position, info.size, info.name))
        position += 512 + info.size + (-info.size % 512)
    return out


def _rewrite(original: bytes, index: int, payload: bytes) -> bytes:
    """The shard with member `index`'s payload replaced (its tar header rewritten to match)."""
    chunks, members = [], _members(original)
    for i, (offset, size, name) in enumerate(members):
        data = payload if i == index else original[offset + 512:offset + 512 + size]
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o444
        chunks += [info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"), data, b"\0" * (-len(data) % 512)]
    return b"".join(chunks) + b"\0" * 1024


def _resealed(sample: bytes, header: bytes | None = None, body: bytes | None = None) -> bytes:
    """A VLB2 sample from (new) header JSON and payload, with a valid CRC and alignment."""
    _, length, _ = struct.unpack_from("<4sII", sample)
    old_header, start = sample[12:12 + length], 12 + length
    header = old_header if header is None else header + b"\0" * (-(12 + len(header)) % 16)
    body = sample[start:] if body is None else body
    return struct.pack("<4sII", b"VLB2", len(header), zlib.crc32(header + body)) + header + body


def _edit_header(header: dict, rng: random.Random) -> str:
    junk = rng.choice([None, [], {}, "x", -1, 2 ** 40, 1.5, True, [1, "a"]])
    choice = rng.randrange(4)
    if choice == 0:
        key = rng.choice(sorted(header))
        del header[key]
        return f"deleted {key}"
    if choice == 1:
        key = rng.choice(sorted(header))
        header[key] = junk
        return f"{key}={junk!r}"
    name = rng.choice(sorted(header["arrays"]))
    spec = header["arrays"][name]
    if choice == 2:
        position = rng.randrange(3)
        spec[position] = rng.choice([junk, "<U4", "|O", "<f8", "V8", "<c8", [2 ** 31, 2 ** 31], [-3, 4], [0],
                                     [1, 2, 3, 4, 5, 6], 10 ** 9, -16])
        return f"arrays.{name}[{position}]={spec[position]!r}"
    if rng.random() < 0.3:  # an array under a header field's name
        header["arrays"][rng.choice(["image_w", "captions", "key"])] = header["arrays"].pop(name)
        return f"arrays.{name} renamed"
    header["arrays"][name] = junk
    return f"arrays.{name}={junk!r}"


def _edit_payload(sample: bytes, rng: random.Random) -> tuple[bytes, str]:
    _, length, _ = struct.unpack_from("<4sII", sample)
    start = 12 + length
    header = json.loads(sample[12:start].rstrip(b"\0"))
    name = rng.choice(sorted(header["arrays"]))
    dtype, shape, offset = header["arrays"][name]
    body = bytearray(sample[start:])
    nbytes = np.dtype(dtype).itemsize * math.prod(shape)
    fill = rng.choice([b"\xff\xff", b"\x00\x7c", b"\xff\x7f\x00\x00", bytes(rng.randrange(256) for _ in range(8))])
    first = offset + rng.randrange(max(nbytes - len(fill), 1))
    body[first:first + len(fill)] = fill
    return _resealed(sample, body=bytes(body)), f"{name} bytes at {first}={fill.hex()}"


def corrupt(original: bytes, rng: random.Random) -> tuple[str, str, bytes]:
    """(kind, what was done, the damaged shard bytes)."""
    kind = rng.choice(KINDS)
    members = _members(original)
    if kind == "flip":
        data, position = bytearray(original), rng.randrange(len(original))
        data[position] ^= rng.randrange(1, 256)
        return kind, f"byte {position}", bytes(data)
    if kind == "truncate":
        cut = rng.randrange(len(original))
        return kind, f"at {cut} of {len(original)}", original[:cut]
    offset, size, _ = rng.choice(members)
    if kind == "tar_header":
        field = rng.choice(sorted(TAR_FIELDS))
        start, width = TAR_FIELDS[field]
        value = rng.choice([b"zz", b"9" * width, b"7" * (width - 1), b"0", b"\x80" + b"\xff" * (width - 1),
                            bytes(rng.randrange(256) for _ in range(width)), b"\0" * width, b"-1"])[:width]
        data = bytearray(original)
        data[offset + start:offset + start + len(value)] = value
        fixed = rng.random() < 0.5 and field != "checksum"
        if fixed:
            header = bytes(data[offset:offset + 512])
            checksum = sum(header) - sum(header[148:156]) + 256
            data[offset + 148:offset + 156] = f"{checksum:06o}\0 ".encode()
        return kind, f"{field}={value[:12]!r}{' (checksum fixed)' if fixed else ''}", bytes(data)
    sample = original[offset + 512:offset + 512 + size]
    index = members.index(next(m for m in members if m[0] == offset))
    if kind == "sample_header":
        _, length, _ = struct.unpack_from("<4sII", sample)
        header = json.loads(sample[12:12 + length].rstrip(b"\0"))
        what = _edit_header(header, rng)
        return kind, what, _rewrite(original, index, _resealed(sample, header=json.dumps(header).encode()))
    edited, what = _edit_payload(sample, rng)
    return kind, what, _rewrite(original, index, edited)


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def run_case(shard_set: Path, original: dict[str, bytes], rng: random.Random, collator) -> Case:
    """Damage one shard of `shard_set` (its files are restored afterwards), then run `check`
    and the training stream on it. `original`: shard file name -> its valid bytes."""
    from torch.utils.data import DataLoader

    from shards.check import check_shards
    from vilbert.data import DataConfig, DataError
    from vilbert.data.pipeline import ShardLoader, ShardStream, resolve_shards
    from vilbert.data.tar_reader import read_shard

    name = rng.choice(sorted(original))
    path = shard_set / name
    before = [(key, bytes(data)) for key, data, _ in read_shard(str(path))]
    kind, what, damaged = corrupt(original[name], rng)
    path.write_bytes(damaged)
    try:
        try:
            intact = [(key, bytes(data) if data is not None else None)
                      for key, data, _ in read_shard(str(path))] == before
        except OSError:
            intact = False
        _, problems = check_shards(str(shard_set))
        assert all(str(shard_set) in p.shard for p in problems), problems
        assert all(p.shard.endswith(name) for p in problems), f"{kind} {what} in {name}: {problems}"
        urls, index = resolve_shards(str(shard_set))
        config = DataConfig(shards=str(shard_set), batch_size=BATCH_SIZE, workers=0, shuffle_buffer=8,
                            max_bad_fraction=rng.choice([0.0, 0.01]))  # 0: the first bad sample stops the stream
        stream = ShardStream(urls, collator, config, train=True, feature_dim=index.feature_dim,
                             num_classes=index.num_classes, expected={s.name: s.samples for s in index.shards})
        previous = signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(TIME_LIMIT_S)
        try:
            batches = ShardLoader(DataLoader(stream, batch_size=None, num_workers=0), stream)
            for count, _ in enumerate(batches, 1):
                if count == STREAM_BATCHES:
                    break
            counts = stream.health.totals()
            outcome = "completed, damage counted" if counts["bad"] + counts["lost"] else "completed"
        except DataError as e:
            assert str(shard_set) in str(e), f"{kind} {what}: {e}"
            outcome = type(e).__name__
        except _Timeout:
            raise AssertionError(f"{kind} {what} in {name}: the stream hung for {TIME_LIMIT_S} s") from None
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
        return Case(kind, what, "problems" if problems else "clean", [p.reason for p in problems], outcome, intact)
    finally:
        path.write_bytes(original[name])


def assert_sound(case: Case) -> None:
    """What must hold for every case: damage on disk is seen by `check` unless it changed
    nothing; whatever `check` flags, the stream counted or stopped on, unless only the bytes
    after the last sample were damaged (no sample skipped or lost: no "index says" problem)."""
    if case.kind in DISK_DAMAGE:
        assert case.check == "problems" or case.intact, case
    if case.check == "clean":
        assert case.stream == "completed", case
    elif case.stream == "completed":  # nothing skipped or lost: the damage lies after the last sample
        assert all(p.startswith("unreadable shard") for p in case.problems), case


def summarise(cases: list[Case]) -> str:
    classes = Counter((c.kind, c.check, c.stream) for c in cases)
    lines = [f"{len(cases)} corruptions; outcome classes (kind | check | stream: count):"]
    lines += [f"  {kind:>13} | {check:>8} | {stream}: {n}" for (kind, check, stream), n in sorted(classes.items())]
    return "\n".join(lines)
