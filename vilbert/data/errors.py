"""What can go wrong with data, as exceptions whose message names the shard, the member and
what was found. Bad samples are skipped and counted; the rest stop the run
(docs/troubleshooting.md)."""


class BadSample(ValueError):
    """A sample that cannot be used (skipped and counted); the message says why."""


class ShardError(OSError):
    """A shard that cannot be read on from some point: a damaged tar or an unreadable file.
    The samples after that point are counted as lost."""


class DataError(RuntimeError):
    """Data that cannot feed the run; the message names the shards and what was found."""


class TooManyBadSamples(DataError):
    """More of the recent samples were bad or lost than `data.max_bad_fraction` allows."""


class EmptyStream(DataError):
    """A stream that can yield no sample at all."""
