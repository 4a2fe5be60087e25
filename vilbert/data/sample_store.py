"""A shard set read by key: what a task needs beyond the sample in hand (retrieval's negative
images, and every caption of an evaluation split).

Opening a store walks the shards' tar headers and reads each sample's JSON header (its key,
image id and captions), seeking past the arrays, so it costs a small read per sample; a
sample's arrays are read when asked for, with one seek. Shards must be local (or mounted)
files: the stream pipeline reads URLs and pipes, a store needs to seek.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from vilbert.data.errors import BadSample, ShardError
from vilbert.data.sample_codec import SAMPLE_SUFFIX, decode_sample, read_header, validate_sample
from vilbert.data.shard_index import INDEX_NAME, ShardIndex


@dataclass(frozen=True)
class Place:
    shard: int  # index into SampleStore.paths
    offset: int  # the sample's first byte in the shard file
    size: int


class SampleStore:
    """Samples of a shard set by key, in the index's shard order: `keys`, `captions[i]` (the
    i-th sample's), `load(key)`. Safe to share with forked data workers (each opens its own files)."""

    def __init__(self, shards: str | Path):
        directory = Path(shards)
        directory = directory.parent if directory.name == INDEX_NAME else directory
        if not directory.is_dir():
            raise ValueError(f"{shards}: a task that reads samples by key (retrieval) needs a local shard-set "
                             "directory (URLs and pipes cannot seek)")
        self.index = ShardIndex.read(directory)
        self.paths = [str(directory / s.name) for s in self.index.shards]
        self.keys: list[str] = []
        self.captions: list[list[str]] = []
        self.places: dict[str, Place] = {}
        for number, path in enumerate(self.paths):
            self._scan(number, path)
        self._files: dict[int, object] = {}
        self._pid = os.getpid()

    def _scan(self, number: int, path: str) -> None:
        try:
            with tarfile.open(path, "r:") as tar, open(path, "rb") as file:
                for member in tar:
                    if not (member.isfile() and member.name.endswith("." + SAMPLE_SUFFIX)):
                        continue
                    file.seek(member.offset_data)
                    header = read_header(file, member.size)
                    if header["key"] in self.places:
                        raise BadSample(f"sample {header['key']!r} is in the shard set twice")
                    self.places[header["key"]] = Place(number, member.offset_data, member.size)
                    self.keys.append(header["key"])
                    self.captions.append(header["captions"])
        except (OSError, tarfile.TarError) as e:
            raise ShardError(f"{path}: cannot be read by key ({type(e).__name__}: {e}); run `python -m shards "
                             f"check` on it") from None
        except BadSample as e:
            raise ShardError(f"{path}: {e}") from None

    def __len__(self) -> int:
        return len(self.keys)

    def load(self, key: str) -> dict:
        """The sample `key`, decoded and checked as the stream checks its samples (BadSample if not)."""
        if os.getpid() != self._pid:  # a forked worker: its own file handles
            self._files, self._pid = {}, os.getpid()
        place = self.places[key]
        file = self._files.get(place.shard)
        if file is None:
            file = self._files[place.shard] = open(self.paths[place.shard], "rb")
        file.seek(place.offset)
        data = bytearray(place.size)
        if file.readinto(data) != place.size:
            raise BadSample(f"sample {key!r} is cut short in {self.paths[place.shard]}")
        sample = decode_sample(data)
        validate_sample(sample, self.index.feature_dim or None)
        return sample

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}}  # open files stay with their process
