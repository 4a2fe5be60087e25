"""Reading tar shards of samples (`sample_codec.py`), streaming, from a path, a `pipe:`
command or a URL, with every kind of damage reported as what it is and where it is."""

from __future__ import annotations

import os
import re

from vilbert.data.errors import BadSample, ShardError
from vilbert.data.sample_codec import MAX_SAMPLE_BYTES, SAMPLE_SUFFIX, decode_sample, validate_sample

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
