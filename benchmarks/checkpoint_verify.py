"""What verifying a checkpoint costs: the SHA-256 of its files (vilbert.train.checkpoint.damage),
in seconds per GB, on a file of `--gb` random bytes (read from the page cache after writing:
a cold read off a network file system adds its own bandwidth on top).

    python benchmarks/checkpoint_verify.py [--gb 1]
"""

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from vilbert.train import checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=1.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        tag = Path(directory) / "step00000001"
        tag.mkdir()
        size = int(args.gb * 1e9)
        with open(tag / "mp_rank_00_model_states.pt", "wb") as f:
            for _ in range(size // (1 << 24)):
                f.write(os.urandom(1 << 24))
        began = time.perf_counter()
        files = checkpoint.file_digests(tag)  # what a save adds
        digest_s = time.perf_counter() - began
        (tag / checkpoint.MARKER).write_text(json.dumps({"state": {"step": 1}, "files": files}))
        began = time.perf_counter()
        assert checkpoint.damage(directory, tag.name) is None  # what a resume adds
        verify_s = time.perf_counter() - began
        written = sum(size for size, _ in files.values()) / 1e9
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"{written:.2f} GB: digest at save {digest_s / written:.2f} s/GB, verify at resume {verify_s / written:.2f} "
          f"s/GB")


if __name__ == "__main__":
    main()
