"""Write samples into numbered tar shards and the shard set's index."""

from __future__ import annotations

import tarfile
from pathlib import Path

from vilbert.data.format import SAMPLE_SUFFIX, ShardIndex, ShardInfo


def shard_name(prefix: str, number: int) -> str:
    return f"{prefix}-{number:06d}.tar"


class TarShard:
    """One tar file of samples, each a single `<key>.vlb` member with fixed metadata (reruns
    give byte-identical shards). Written as plain ustar blocks: a header, the payload padded
    to 512 bytes, and two zero blocks at the end, without tarfile's extra buffer copies."""

    BLOCK = tarfile.BLOCKSIZE

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = open(self.path, "wb")
        self.info = ShardInfo(name=self.path.name, samples=0, bytes=0)

    def write(self, key: str, data: bytes) -> None:
        member = tarfile.TarInfo(f"{key}.{SAMPLE_SUFFIX}")
        member.size, member.mtime, member.mode = len(data), 0, 0o444
        header = member.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")
        self._file.write(header)
        self._file.write(data)
        self._file.write(b"\0" * (-len(data) % self.BLOCK))
        self.info.samples += 1
        self.info.bytes += len(header) + len(data) + (-len(data) % self.BLOCK)

    def close(self) -> ShardInfo:
        self._file.write(b"\0" * (2 * self.BLOCK))  # end-of-archive marker
        self._file.close()
        self.info.bytes = self.path.stat().st_size
        return self.info


class ShardSetWriter:
    """Appends encoded samples to `<prefix>-NNNNNN.tar`, starting a new shard after
    `max_samples` samples or `max_bytes` bytes; `close()` writes `index.json`."""

    def __init__(self, directory: str | Path, *, prefix: str = "shard", max_samples: int = 1000,
                 max_bytes: int | None = None, **index_fields):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.prefix, self.max_samples, self.max_bytes = prefix, max_samples, max_bytes
        self.index_fields = index_fields
        self.shards: list[ShardInfo] = []
        self._current: TarShard | None = None

    def _full(self, size: int) -> bool:
        info = self._current.info
        return info.samples >= self.max_samples or bool(
            self.max_bytes and info.samples and info.bytes + size > self.max_bytes)

    def write(self, key: str, data: bytes) -> None:
        if self._current is None or self._full(len(data)):
            self._close_current()
            self._current = TarShard(self.directory / shard_name(self.prefix, len(self.shards)))
        self._current.write(key, data)

    def _close_current(self) -> None:
        if self._current is not None:
            self.shards.append(self._current.close())
            self._current = None

    def close(self) -> ShardIndex:
        self._close_current()
        index = ShardIndex(shards=self.shards, **self.index_fields)
        index.write(self.directory)
        return index

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        else:
            self._close_current()
