#!/usr/bin/env python3
"""Turn one bench/run.sh results directory into markdown tables (stdout). Stdlib only.

Reads http-<target>-<round>.txt (wrk output + META line), ws-<target>-<round>.txt and
wsrate-<target>-<round>.txt (wsload RESULT line + META line) and idle-<target>.txt.
Cells are median (min–max) over rounds. "vs haproxy"/"vs nginx" divide Tether's median by the
peer's median; "paired" is the median over rounds of the per-round ratio (both measured
back to back in the same round, so slow drift of the host cancels out).
"""
import glob
import json
import os
import re
import statistics
import sys

ORDER = ["direct", "nginx", "haproxy", "tether"]


def order_key(t):
    return (ORDER.index(t), t) if t in ORDER else (len(ORDER), t)


def line_json(text, prefix):
    for line in text.splitlines():
        if line.startswith(prefix):
            return json.loads(line[len(prefix):])
    return None


def to_ms(v, unit):
    return float(v) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def parse_wrk(text):
    r = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    r["rate"] = float(m.group(1)) if m else None
    m = re.search(r"(\d+) requests in", text)
    r["units"] = int(m.group(1)) if m else 0
    for pct in ("50", "99"):
        m = re.search(r"^\s+%s%%\s+([\d.]+)(us|ms|s|m)\s*$" % pct, text, re.M)
        r["p" + pct] = to_ms(m.group(1), m.group(2)) if m else None
    errs = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        errs += sum(int(x) for x in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        errs += int(m.group(1))
    r["errors"] = errs
    return r


def parse_ws(text):
    res = line_json(text, "RESULT ") or {}
    ms = lambda k: res[k] / 1000.0 if res.get(k) is not None else None
    return {
        "rate": res.get("msgs_per_s"), "units": res.get("msgs", 0),
        "p50": ms("p50_us"), "p99": ms("p99_us"), "p999": ms("p999_us"),
        # A missing RESULT line (the tool died or timed out) counts as an error.
        "errors": (res.get("conn_err", 0) or 0) + (res.get("msg_err", 0) or 0) if res else 1,
    }


def load(d, prefix, parse):
    """{target: {round: record}} with cpu_us and foreign filled in from the META line."""
    out = {}
    for f in glob.glob(os.path.join(d, prefix + "-*-*.txt")):
        m = re.match(prefix + r"-(.+)-(\d+)\.txt$", os.path.basename(f))
        if not m:
            continue
        text = open(f).read()
        meta = line_json(text, "META ") or {}
        r = parse(text)
        try:
            secs = float(meta["cpu_ticks"]) / float(meta.get("clk_tck", 100))
            r["cpu_us"] = secs * 1e6 / r["units"] if r["units"] else None
        except (KeyError, ValueError):
            r["cpu_us"] = None
        r["foreign"] = float(meta.get("foreign_cpu_pct", "nan"))
        out.setdefault(meta.get("target", m.group(1)), {})[int(m.group(2))] = r
    return out


def vals(rounds, k):
    return [r[k] for r in rounds.values() if r.get(k) is not None]


def med(v):
    return statistics.median(v) if v else None


def mmm(v, fmt):
    if not v:
        return "–"
    if len(v) == 1:
        return fmt.format(v[0])
    return "{} ({}–{})".format(fmt.format(med(v)), fmt.format(min(v)), fmt.format(max(v)))


def ratio(a, b):
    return "{:.2f}".format(a / b) if a and b else "–"


def paired(data, t, ref, k):
    """Median over rounds of data[t][r][k] / data[ref][r][k]."""
    if t not in data or ref not in data:
        return None
    rs = [data[t][r][k] / data[ref][r][k] for r in data[t]
          if r in data[ref] and data[t][r].get(k) and data[ref][r].get(k)]
    return med(rs)


def fmt_ratio(x):
    return "{:.2f}".format(x) if x else "–"


def fmax(v):
    v = [x for x in v if x == x]
    return "{:.0f}".format(max(v)) if v else "–"


def table(data, unit, latency_cols, title):
    out = [title, ""]
    head = ["target", "%s/s" % unit]
    head += ["%s ms" % c for c in latency_cols]
    head += ["CPU µs/%s" % unit, "CPU vs haproxy (paired)", "CPU vs nginx (paired)",
             "%s/s vs haproxy" % unit, "errors", "foreign CPU % max", "rounds"]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for t in sorted(data, key=order_key):
        rs = data[t]
        row = [t, mmm(vals(rs, "rate"), "{:.0f}")]
        row += [mmm(vals(rs, c), "{:.2f}") for c in latency_cols]
        cpu = med(vals(rs, "cpu_us"))
        row.append(mmm(vals(rs, "cpu_us"), "{:.1f}"))
        for ref in ("haproxy", "nginx"):
            if t in ("direct", ref):
                row.append("–")
            else:
                row.append("{} ({})".format(ratio(cpu, med(vals(data.get(ref, {}), "cpu_us"))),
                                            fmt_ratio(paired(data, t, ref, "cpu_us"))))
        row.append("–" if t in ("direct", "haproxy") else
                   ratio(med(vals(rs, "rate")), med(vals(data.get("haproxy", {}), "rate"))))
        row.append(str(sum(r["errors"] for r in rs.values())))
        row.append(fmax([r["foreign"] for r in rs.values()]))
        row.append(str(len(rs)))
        out.append("| " + " | ".join(row) + " |")
    out.append("")
    return out


def main(d):
    out = []
    env = os.path.join(d, "env.txt")
    if os.path.exists(env):
        out.append("```\n" + open(env).read().strip() + "\n```\n")
    http = load(d, "http", parse_wrk)
    if http:
        out += table(http, "req", ["p50", "p99"],
                     "**HTTP keep-alive** (wrk, 64 connections, 1,000 document keys; CPU = proxy "
                     "process tree, or backend b1 for direct)")
    ws = load(d, "ws", parse_ws)
    if ws:
        out += table(ws, "msg", ["p50", "p99"],
                     "**WebSocket echo, closed loop** (1,000 connections, 64-byte messages, one in "
                     "flight per connection)")
    wsrate = load(d, "wsrate", parse_ws)
    if wsrate:
        out += table(wsrate, "msg", ["p50", "p99", "p999"],
                     "**WebSocket echo at a fixed rate** (1,000 connections; p99 is the latency "
                     "the proxy adds below saturation)")
    idle = {}
    for f in glob.glob(os.path.join(d, "idle-*.txt")):
        text = open(f).read()
        meta = line_json(text, "META ") or {}
        r = line_json(text, "RESULT ")
        if r:
            idle[meta.get("target", "?")] = r
    if idle:
        out.append("**Idle WebSockets held** (VmRSS of the proxy process tree, freshly started; "
                   "backend b1 for direct)\n")
        out.append("| target | held/requested | RSS before MiB | RSS after MiB | KB per conn |")
        out.append("|---|---|---|---|---|")
        for t in sorted(idle, key=order_key):
            r = idle[t]
            out.append("| {} | {}/{} | {:.1f} | {:.1f} | {:.2f} |".format(
                t, r["still_open"], r["conns"], r["rss_before_kb"] / 1024,
                r["rss_after_kb"] / 1024, r["kb_per_conn"]))
        out.append("")
    print("\n".join(out))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: summarize.py RESULTS_DIR", file=sys.stderr)
        sys.exit(2)
    main(sys.argv[1])
