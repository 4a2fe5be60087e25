"""Write samples into numbered tar shards and the shard set's index, atomically: a shard set
is written into a hidden temporary directory beside its destination and moved into place
only when it is complete, so a failed or interrupted write leaves no set that looks whole."""

from __future__ import annotations

import contextlib
import tarfile
from pathlib import Path

from vilbert.data.sample_codec import SAMPLE_SUFFIX
from vilbert.data.shard_index import ShardIndex, ShardInfo
from vilbert.staging import StagedDirectory


def shard_name(prefix: str, number: int) -> str:
    return f"{prefix}-{number:06d}.tar"


@contextlib.contextmanager
def all_or_nothing():
    """A list to add staged sets to (StagedDirectory, ShardSetWriter): all of them are moved
    into place when the block succeeds, all are discarded when it fails."""
    staged = []
    try:
        yield staged
        for part in staged:
            part.commit()
    except BaseException:
        for part in staged:
            part.abort()
        raise


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
    `max_samples` samples or `max_bytes` bytes; `close()` writes `index.json` and moves the
    set into `directory`, `abort()` discards it. A set without a sample is an error."""

    def __init__(self, directory: str | Path, *, prefix: str = "shard", max_samples: int = 1000,
                 max_bytes: int | None = None, **index_fields):
        self.directory = Path(directory)
        self.staged = StagedDirectory(self.directory)
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
            self._current = TarShard(self.staged.path / shard_name(self.prefix, len(self.shards)))
        self._current.write(key, data)

    def _close_current(self) -> None:
        if self._current is not None:
            self.shards.append(self._current.close())
            self._current = None

    def finish(self) -> ShardIndex:
        """The complete set, index written, still in the temporary directory (`commit()`
        moves it into place: several sets can be finished first and committed together)."""
        self._close_current()
        if not self.shards:
            self.abort()
            raise ValueError(f"no sample was written to {self.directory}")
        index = ShardIndex(shards=self.shards, **self.index_fields)
        index.write(self.staged.path)
        return index

    def commit(self) -> None:
        self.staged.commit()

    def close(self) -> ShardIndex:
        index = self.finish()
        self.commit()
        return index

    def abort(self) -> None:
        if self._current is not None:
            self._current._file.close()
            self._current = None
        self.staged.abort()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        else:
            self.abort()
