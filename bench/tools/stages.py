#!/usr/bin/env python3
"""Turn bench/stages' raw output (fio JSON, status JSON, strace -c, perf trace) into tables.

Usage: stages.py WORKDIR   (prints Markdown)
"""
import collections
import json
import os
import re
import statistics
import sys

work = sys.argv[1]


def fio(name):
    t = open(os.path.join(work, name + ".json")).read()
    j = json.loads(t[t.index("{"):])["jobs"][0]["write"]
    pct = j.get("lat_ns", {}).get("percentile") or j.get("clat_ns", {}).get("percentile", {})
    return {"iops": j["iops"], "ios": j["total_ios"], "p50": pct.get("50.000000", 0) / 1000,
            "mean": j.get("lat_ns", j.get("clat_ns", {})).get("mean", 0) / 1000}


def strace_c(name):
    """syscall -> (calls, errors) from strace -c -o."""
    out = {}
    for line in open(os.path.join(work, name + ".c")):
        f = line.split()
        if len(f) >= 5 and f[0][0].isdigit() and f[-1] != "total":
            calls = int(f[3])
            errors = int(f[4]) if len(f) == 6 else 0
            out[f[-1]] = (calls, errors)
    return out


def threads():
    names = {}
    for line in open(os.path.join(work, "threads.txt")):
        tid, comm = line.split(maxsplit=1)
        names[tid] = comm.strip()
    return names


out = []
p = out.append

# --- plain numbers -------------------------------------------------------------------
rep, lin, kit, floor = fio("rep-plain"), fio("lin-plain"), fio("kit-plain"), fio("floor")
p("## Plain runs (no tracer)\n")
p("| run | IOPS | mean us | p50 us |")
p("|---|---|---|---|")
for n, m in [("replicated randwrite 4k QD1", rep), ("linear randwrite 4k QD1", lin),
             ("nbdkit file randwrite 4k QD1", kit), ("floor: fdatasync'ed 4.5 KiB write", floor)]:
    p(f"| {n} | {m['iops']:.0f} | {1e6 / m['iops']:.0f} | {m['p50']:.0f} |")
p("")

# --- statistics counters -------------------------------------------------------------
def load(n):
    return json.load(open(os.path.join(work, n)))


def find(d, key, path=""):
    """Every (path, value) for key anywhere in d."""
    r = []
    if isinstance(d, dict):
        for k, v in d.items():
            if k == key:
                r.append((path, v))
            r += find(v, key, path + "/" + str(k))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            r += find(v, key, path + f"[{i}]")
    return r


b, a = load("st-before.json"), load("st-after.json")
p("## `statistics on` counters over the plain replicated run\n")
p("| counter | delta | per write |")
p("|---|---|---|")
writes = None
for key in ["writes", "batches", "entries", "append_us", "applies", "apply_us", "cursor_us", "log_full_waits"]:
    for (path, v1), (_, v0) in zip(find(a, key), find(b, key)):
        if isinstance(v1, (int, float)) and isinstance(v0, (int, float)):
            d = v1 - v0
            if key == "writes" and writes is None:
                writes = d
            per = f"{d / writes:.1f}" if writes else ""
            p(f"| {path}/{key} | {d} | {per} |")
p("")
open(os.path.join(work, "counters.json"), "w").write(json.dumps({"before": b, "after": a}))

# --- syscalls per request ------------------------------------------------------------
p("## Syscalls per NBD write request (strace -f -c, randwrite 4k QD1)\n")
cols = [("replicated", "rep-strace"), ("linear", "lin-strace"), ("nbdkit", "kit-strace")]
data = {c: strace_c(f) for c, f in cols}
ios = {c: fio(f)["ios"] for c, f in cols}
names = sorted(set().union(*[set(d) for d in data.values()]),
               key=lambda s: -max(data[c].get(s, (0, 0))[0] / max(ios[c], 1) for c, _ in cols))
p("| syscall | " + " | ".join(c for c, _ in cols) + " |")
p("|---|" + "---|" * len(cols))
for s in names:
    cells = [f"{data[c].get(s, (0, 0))[0] / max(ios[c], 1):.2f}" for c, _ in cols]
    if all(float(x) < 0.01 for x in cells):
        continue
    p(f"| {s} | " + " | ".join(cells) + " |")
tot = [sum(v[0] for v in data[c].values()) / max(ios[c], 1) for c, _ in cols]
p("| **total** | " + " | ".join(f"{t:.2f}" for t in tot) + " |")
p("| (requests) | " + " | ".join(str(ios[c]) for c, _ in cols) + " |")
p("")

print("\n".join(out))

# --- per-stage timeline from perf trace ----------------------------------------------
LINE = re.compile(r"^\s*([\d.]+) \(\s*([\d.]+) ms\): (\S+)/(\d+)\s+(?:\.\.\. \[continued\]: )?(\w+)\((.*?)\)?\)?\s+= (-?\d+)")


def perf_events(path):
    ev = []
    for line in open(path, errors="replace"):
        m = LINE.match(line)
        if not m:
            continue
        ts, dur, comm, tid, name, args, ret = m.groups()
        s = float(ts) * 1000
        if float(dur) > 1000:  # a call begun before the trace: no start time
            continue
        ev.append((s, s + float(dur) * 1000, comm, int(tid), name, args, int(ret)))
    ev.sort()
    return ev


def stage_table(path, title):
    ev = perf_events(path)
    by = collections.defaultdict(list)
    for e in ev:
        by[e[2].split("/")[0][:6] if e[2].startswith("nbd-c") else e[2]].append(e)
    app = [e for e in by["r0-append"]]
    log_fd = None
    for e in app:
        if e[4] == "pwritev":
            log_fd = e[5].split(",")[0]
            break
    fio_send = [e for e in by["fio"] if e[4] == "sendto" and "len: 4096" in e[5]]
    fio_poll = [e for e in by["fio"] if e[4] == "poll"]
    nbd = [e for e in ev if e[2].startswith("nbd-c")]
    nbd_recv = [e for e in nbd if e[4] == "recvfrom" and e[6] > 0]
    nbd_wake = [e for e in nbd if e[4] == "futex" and "WAKE" in e[5]]
    syncs = [e for e in ev if e[4] == "fdatasync"]
    import bisect

    def last_before(lst, t, key):
        keys = [key(e) for e in lst]
        i = bisect.bisect_right(keys, t) - 1
        return lst[i] if i >= 0 else None

    def first_after(lst, t, key):
        keys = [key(e) for e in lst]
        i = bisect.bisect_left(keys, t)
        return lst[i] if i < len(lst) else None

    rows = collections.defaultdict(list)
    overlap = {True: [], False: []}
    pw = [e for e in app if e[4] == "pwritev"]
    fs = [e for e in app if e[4] == "fdatasync"]
    sm = [e for e in app if e[4] == "sendmsg"]
    other_syncs = [e for e in syncs if e[2] != "r0-append"]
    cycles = []
    for k, p in enumerate(pw[1:-1], 1):
        a = last_before(fio_send, p[0], lambda e: e[1])
        b = last_before(nbd_recv, p[0], lambda e: e[1])
        c = last_before(nbd_wake, p[0], lambda e: e[0])
        f = first_after(fs, p[1], lambda e: e[0])
        h = first_after(sm, f[1], lambda e: e[0]) if f else None
        if not (a and b and c and f and h):
            continue
        j = first_after(fio_poll, h[1], lambda e: e[1])
        a2 = first_after(fio_send, h[1], lambda e: e[1])
        nxt = pw[k + 1]
        if not (j and a2) or not (a[1] <= b[1] <= c[0] <= p[0]) or h[0] > nxt[0] or a2[1] > nxt[0]:
            continue
        st = [("client sends (fio sendto end) -> NBD reader's recvfrom returns", b[1] - a[1]),
              ("NBD parse + device + replicator-dev submit (-> futex wake of the appender)", c[0] - b[1]),
              ("appender wakes up and plans the batch (-> pwritev)", p[0] - c[0]),
              ("log write (pwritev 4.5 KiB)", p[1] - p[0]),
              ("between write and sync (crc published, lock)", f[0] - p[1]),
              ("log fdatasync", f[1] - f[0]),
              ("acknowledge: machine `appended`, wake copiers (-> sendmsg)", h[0] - f[1]),
              ("reply sendmsg", h[1] - h[0]),
              ("client wakes up (fio poll returns)", j[1] - h[1]),
              ("fio turnaround (reads reply, sends next request)", a2[1] - j[1])]
        for n, v in st:
            rows[n].append(v)
        cycles.append(a2[1] - a[1])
        busy = any(o[0] < f[1] and o[1] > f[0] for o in other_syncs)
        overlap[busy].append(f[1] - f[0])
    out = [f"### {title}\n", f"{len(cycles)} requests matched; mean cycle {statistics.mean(cycles):.0f} us, "
           f"median {statistics.median(cycles):.0f} us.\n",
           "| stage | mean us | median us | share of mean cycle |", "|---|---|---|---|"]
    tot = statistics.mean(cycles)
    for n, v in rows.items():
        out.append(f"| {n} | {statistics.mean(v):.1f} | {statistics.median(v):.1f} | {100 * statistics.mean(v) / tot:.0f}% |")
    out.append("")
    for busy, v in overlap.items():
        if v:
            out.append(f"- log fdatasync {'overlapping a copier/cursor fdatasync' if busy else 'alone on the disk'}: "
                       f"{len(v)} times, mean {statistics.mean(v):.0f} us, median {statistics.median(v):.0f} us")
    per = collections.Counter()
    for e in syncs:
        per[e[2]] += 1
    n = max(len(cycles), 1)
    out.append(f"- fdatasyncs per request by thread: " + ", ".join(f"{t} {c / len(pw):.2f}" for t, c in sorted(per.items())))
    sd = collections.defaultdict(list)
    for e in syncs:
        sd[e[2]].append(e[1] - e[0])
    out.append("- fdatasync mean us by thread: " + ", ".join(f"{t} {statistics.mean(v):.0f}" for t, v in sorted(sd.items())))
    yl = [e[1] - e[0] for e in app if e[4] == "sched_yield"]
    out.append(f"- appender sched_yield (parking_lot spinning on the group lock): {len(yl) / len(pw):.2f} per request, "
               f"mean {statistics.mean(yl) if yl else 0:.0f} us")
    out.append("")
    return "\n".join(out)


def counters(before, after, title):
    b, a = load(before), load(after)
    get = lambda d, k: sum(v for _, v in find(d, k) if isinstance(v, (int, float)))
    w = get(a, "writes") - get(b, "writes")
    ap = (find(a, "append_us")[0][1] - find(b, "append_us")[0][1]) / max(w, 1)
    print(f"- {title}: {w} writes, append_us per write {ap:.0f} us")


print("## Log append with and without the RD copier\n")
counters("st-before.json", "st-after.json", "copiers running")
counters("st-paused-before.json", "st-paused-after.json", "SLINK 1 (RD) paused")
counters("st-shm-before.json", "st-shm-after.json", "LD and RD in /dev/shm (log alone on the disk)")
print(f"- rep-shm fio: {fio('rep-shm')['iops']:.0f} IOPS, mean {1e6 / fio('rep-shm')['iops']:.0f} us")
print(f"- rep-paused fio: {fio('rep-paused')['iops']:.0f} IOPS, mean {1e6 / fio('rep-paused')['iops']:.0f} us\n")

print("## Stages of a replicated 4k write at QD1 (perf trace -a)\n")
print(stage_table(os.path.join(work, "rep-perf.txt"), "replicated, copiers running"))
