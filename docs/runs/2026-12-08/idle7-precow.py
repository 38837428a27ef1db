import ctypes, os, struct
libc = ctypes.CDLL(None, use_errno=True)
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
PAGE = 4096
def precow() -> int:
    """MADV_POPULATE_WRITE the present, still-shared pages of private writable mappings."""
    n = 0
    with open("/proc/self/maps") as f, open("/proc/self/pagemap", "rb") as pm:
        for line in f:
            parts = line.split()
            if parts[1] != "rw-p":
                continue
            if len(parts) > 5 and parts[5].startswith("[") and parts[5] not in ("[heap]",):
                continue
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            pm.seek(lo // PAGE * 8)
            raw = pm.read((hi - lo) // PAGE * 8)
            for i, (e,) in enumerate(struct.iter_unpack("<Q", raw)):
                if e >> 63 & 1 and not (e >> 56 & 1):  # present, not exclusively mapped
                    a = lo + i * PAGE
                    if libc.madvise(a, PAGE, 23) == 0:
                        n += 1
    return n
