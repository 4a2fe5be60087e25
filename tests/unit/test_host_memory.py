"""glibc keeps the memory a step frees (vilbert.train.host_memory)."""

import subprocess
import sys

import pytest

from vilbert.train.host_memory import keep_freed_memory

# In a fresh process: free a 20 MB block and print how much free memory glibc still holds.
PROBE = """
import ctypes, sys
from vilbert.train.host_memory import keep_freed_memory

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Mallinfo2
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
if sys.argv[1] == "keep":
    assert keep_freed_memory()
libc.free(libc.malloc(20 << 20))
print(libc.mallinfo2().fordblks >> 20)
"""


def _free_megabytes_held(mode: str) -> int:
    return int(subprocess.run([sys.executable, "-c", PROBE, mode], check=True, capture_output=True,
                              text=True).stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux")
def test_a_freed_block_stays_with_the_process_only_when_kept():
    assert _free_megabytes_held("default") < 20 <= _free_megabytes_held("keep")


def test_the_users_own_malloc_settings_win():
    assert not keep_freed_memory({"MALLOC_TRIM_THRESHOLD_": "0"})
    assert not keep_freed_memory({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"})
