import mmap, time, sys, statistics
def touch(n=256):
    m = mmap.mmap(-1, n*4096)
    t0 = time.perf_counter_ns()
    for i in range(0, n*4096, 4096):
        m[i] = 1
    t1 = time.perf_counter_ns()
    m.close()
    return (t1-t0)/n/1000
for idle in [0.0, 0.05, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 5.0]:
    xs=[]
    for _ in range(5):
        time.sleep(idle); xs.append(touch())
    print(f"idle {idle:4.2f}s  us/page median {statistics.median(xs):6.2f}  {[round(x,2) for x in xs]}", flush=True)
