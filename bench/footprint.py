#!/usr/bin/env python3
"""Code a request runs: distinct 64-byte cache lines and 4 KiB pages of machine code.

    bench/footprint.py SHORT.out LONG.out [--functions N]

SHORT and LONG are callgrind dumps made with `--dump-instr=yes` of runs that serve 200 and
1,200 requests (`bench/instructions --footprint` makes them). An instruction whose count
grew by at least 900 between them runs on (about) every request; the lines and pages that
hold such instructions are the code a request needs in the instruction cache and TLB. At
one request per round trip other processes evict them in between, so every one of them is
a miss (bench/RESULTS.md, "Where the latency is"). With --functions, the functions of the
binary holding most of those lines, with their size.
"""
import bisect
import collections
import re
import subprocess
import sys


def load(path):
    """(object, address) -> instructions executed, from a dump with --dump-instr=yes."""
    objects, cost, ob, after_calls, last = {}, collections.defaultdict(int), None, False, 0
    for line in open(path, errors="replace"):
        m = re.match(r"(c?ob)=\((\d+)\)(?: (.*))?", line)
        if m:
            if m.group(3):
                objects[m.group(2)] = m.group(3).strip()
            if m.group(1) == "ob":
                ob = objects[m.group(2)]
            continue
        if line.startswith("calls="):
            after_calls = True   # the next cost line is the call's inclusive cost
            continue
        m = re.match(r"^(0x[0-9a-f]+|[+-]\d+|\*)\s+\S+\s+(\d+)", line)
        if m:
            a = m.group(1)
            addr = int(a, 16) if a.startswith("0x") else (last if a == "*" else last + int(a))
            last = addr
            if after_calls:
                after_calls = False
                continue
            cost[(ob, addr)] += int(m.group(2))
    return cost


def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__)
    short, long_ = load(argv[0]), load(argv[1])
    nfunc = int(argv[argv.index("--functions") + 1]) if "--functions" in argv else 0
    lines, pages = collections.defaultdict(set), collections.defaultdict(set)
    hot = []
    for (ob, addr), n in long_.items():
        if n - short.get((ob, addr), 0) >= 900:
            lines[ob].add(addr >> 6)
            pages[ob].add(addr >> 12)
            hot.append((ob, addr))
    total_l = sum(len(v) for v in lines.values())
    total_p = sum(len(v) for v in pages.values())
    print(f"code per request: {total_l} cache lines ({total_l * 64 // 1024} KiB) "
          f"in {total_p} pages")
    for ob in sorted(lines, key=lambda o: -len(lines[o])):
        name = ob if ob != "???" else "attache"
        print(f"  {len(lines[ob]):5d} lines {len(pages[ob]):4d} pages  {name}")
    if nfunc:
        functions(argv[1], hot, nfunc)


def functions(dump, hot, n):
    """The binary's functions holding the most hot lines (valgrind maps a PIE at 0x108000)."""
    binary = next((l.split()[1] for l in open(dump, errors="replace")
                   if l.startswith("cmd:")), None)
    if not binary:
        return
    syms = []
    out = subprocess.run(["nm", "-S", "-C", "--defined-only", binary],
                         capture_output=True, text=True).stdout
    for l in out.splitlines():
        p = l.split(None, 3)
        if len(p) == 4 and p[2] in "tT":
            syms.append((int(p[0], 16), int(p[1], 16), p[3]))
    syms.sort()
    starts = [s[0] for s in syms]
    per = collections.defaultdict(set)
    for ob, addr in hot:
        if ob != "???":
            continue
        x = addr - 0x108000
        i = bisect.bisect_right(starts, x) - 1
        if i >= 0 and x < syms[i][0] + syms[i][1]:
            per[syms[i]].add(x >> 6)
    print(f"  {len(per)} functions of {sum(s[1] for s in per) // 1024} KiB hold them; most:")
    for s in sorted(per, key=lambda s: -len(per[s]))[:n]:
        print(f"  {len(per[s]):5d} lines of {s[1]:6d} B  {s[2][:100]}")


if __name__ == "__main__":
    main(sys.argv[1:])
