"""Hand glibc's freed heap back to the OS, which it otherwise keeps for the process's next allocations."""

import ctypes


def return_freed_heap() -> None:
    """Release every whole free page of the heap (malloc_trim); a no-op where the C library is not glibc."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
