#!/usr/bin/env python3
"""Turn one bench/run.sh results directory into markdown (stdout). Stdlib only.

THE STATISTIC (the project's rule for any performance figure), per scenario, for every Tether
build T (target "tether", and "plain" or TETHER_VARIANTS measured in the same rounds) against
every peer P (haproxy, nginx; other builds also against "tether"):

    cpu(X, r)  = CPU µs per unit of target X in round r: utime+stime of its process tree over
                 the run (META cpu_ticks / clk_tck) divided by the requests (http, post, tls,
                 churn, churntls: wrk; h2: the 2xx responses of all its h2load processes;
                 churntlsresume: wsload churn) or messages (ws, wsrate; wsload RESULT)
                 completed in that run;
                 wstls: per message echoed in the send window, from the CPU ns (schedstat)
                 wsload counted over that window (the connect phase's handshakes left out);
                 sse: per stream connected (the whole run: open, first event, hold, close,
                 until the target has let go of the streams' descriptors);
                 fanout: per event delivered to a subscriber, from the CPU ns (schedstat) wsload
                 counted from the first publish until the deliveries were in;
                 storm: per reconnection, from the CPU ns (schedstat) wsload counted from the
                 backends' close until every connection was back
    ratio_r    = cpu(T, r) / cpu(P, r)            (T and P measured in the same round)
    headline   = the median over rounds of ratio_r
    95 % CI    = bootstrap of the per-round log-ratio: resample the rounds with replacement,
                 10,000 times; for each resample take the median of its log-ratios; the 2.5th
                 and 97.5th percentiles of those medians, exponentiated. The generator is
                 random.Random(BOOT_SEED), fixed, so the same results give the same summary.

Rounds are never dropped. A round is "disturbed" when any of its kept runs (any target) had
foreign_cpu_pct > max_foreign or steal_pct > max_steal (from its META line; 8 and 2 when the
line predates these keys; a run without steal_pct cannot be flagged for steal). Every scenario
shows rounds total and disturbed, which runs disturbed them, and the statistic twice: over
all rounds and over the undisturbed rounds only.

Verdict: a target t (e.g. 0.85, from TARGET_<SCENARIO> in the environment: TARGET_HTTP,
TARGET_POST, TARGET_TLS, TARGET_CHURN, TARGET_CHURNTLS, TARGET_WS, TARGET_WSRATE, TARGET_SSE,
TARGET_FANOUT, TARGET_H2, TARGET_WSTLS, TARGET_STORM, TARGET_CHURNTLSRESUME) is met only
when the CI's upper bound is below t. A headline figure needs at least 10 rounds
(REPEATS>=10); fewer are marked as not a headline. Two scenarios also have a fixed goal that
is not a ratio: storm (every connection back within STORM_MAX_SECS, 5, with 0 errors, per run)
and wsidle (at most WSIDLE_MAX_KB, 8, of RSS per held connection).

Inputs: http-, post-, tls-, churn- and churntls-<target>-<round>.txt (wrk output + META line;
the wrk scenarios share one code path: parse_wrk, per request), ws-<target>-<round>.txt and
wsrate-<target>-<round>.txt (wsload RESULT line + META line), idle-<target>.txt,
sse-<target>-<round>.txt and sse-rss-<target>.txt (the run on freshly started processes),
fanout-<target>-<round>.txt, h2-<target>-<round>.txt (the outputs of its h2load processes, one
after the other, + META), wstls-<target>-<round>.txt (as ws), storm-<target>-<round>.txt and
churntlsresume-<target>-<round>.txt (wsload RESULT + META), wsidle-<target>.txt (as idle),
floodalone- and flood-<target>-<round>.txt (the victim's wsload RESULT + META; flood- also the
flooder's RESULT as a `FLOODER {...}` line; descriptive, no CPU statistic). The
descriptive per-target tables under each headline table show median (min–max) over rounds.
"""
import glob
import json
import math
import os
import random
import re
import statistics
import sys

ORDER = ["direct", "nginx", "haproxy", "tether"]
PEERS = ["haproxy", "nginx"]
NOT_TETHER = {"direct", "nginx", "haproxy"}
BOOT_SEED = 20261129
BOOT_N = 10_000
HEADLINE_ROUNDS = 10
DEFAULT_MAX_FOREIGN = 8.0
DEFAULT_MAX_STEAL = 2.0


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


def parse_ws_window(text):
    """wstls: as parse_ws, and the target's CPU over the send window only (wsload's schedstat
    ns and the messages echoed in the window), without the connect phase's TLS handshakes."""
    r = parse_ws(text)
    res = line_json(text, "RESULT ") or {}
    r["window_cpu_ns"], r["window_msgs"] = res.get("window_cpu_ns"), res.get("window_msgs")
    return r


def window_cpu(data):
    """wstls: the statistic uses the send window's CPU per message; the whole run's (connects
    included) stays in the table as run_cpu_us."""
    for rs in data.values():
        for r in rs.values():
            r["run_cpu_us"] = r["cpu_us"]
            r["cpu_us"] = (r["window_cpu_ns"] / 1000.0 / r["window_msgs"]
                           if r.get("window_cpu_ns") is not None and r.get("window_msgs") else None)
    return data


def parse_h2load(text):
    """The outputs of an h2 run's h2load processes (GET ones, then the POST one), summed."""
    r = {"rate": 0.0, "units": 0, "errors": 0, "posts": 0, "procs": 0}
    lat_sum, last_ok = 0.0, 0
    post = False
    for line in text.splitlines():
        if line.startswith("### h2load"):
            post = " POST " in line
            r["procs"] += 1
        m = re.match(r"finished in [\d.]+\w*, ([\d.]+) req/s", line)
        if m:
            r["rate"] += float(m.group(1))
        m = re.match(r"requests: \d+ total, \d+ started, \d+ done, \d+ succeeded, (\d+) failed, "
                     r"(\d+) errored, (\d+) timeout", line)
        if m:
            r["errors"] += sum(int(x) for x in m.groups())
        m = re.match(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", line)
        if m:
            ok = int(m.group(1))
            r["units"] += ok
            r["errors"] += int(m.group(3)) + int(m.group(4))
            if post:
                r["posts"] += ok
            last_ok = ok
        m = re.match(r"time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)\s", line)
        if m:
            lat_sum += to_ms(m.group(1), m.group(2)) * last_ok
    if r["procs"] == 0 or r["units"] == 0:
        # A missing output (h2load died or timed out) counts as an error.
        r["errors"] += 1
    r["mean"] = lat_sum / r["units"] if r["units"] else None
    r["post_pct"] = 100.0 * r["posts"] / r["units"] if r["units"] else None
    return r


def parse_churn(text):
    res = line_json(text, "RESULT ") or {}
    ms = lambda k: res[k] / 1000.0 if res.get(k) is not None else None
    return {
        "rate": res.get("req_per_s"), "units": res.get("requests", 0) or 0,
        "p50": ms("p50_us"), "p99": ms("p99_us"),
        "resumed_pct": 100.0 * res["resumed_frac"] if res.get("resumed_frac") is not None else None,
        "errors": (res.get("errors", 0) or 0) if res else 1,
    }


def parse_storm(text):
    res = line_json(text, "RESULT ") or {}
    return {
        "units": res.get("back", 0) or 0, "conns": res.get("conns"),
        "connected": res.get("connected", 0) or 0, "all_back_ms": res.get("all_back_ms"),
        "storm_ms": res.get("storm_ms"), "p50": res.get("back_p50_ms"),
        "p99": res.get("back_p99_ms"), "max": res.get("back_max_ms"),
        "not_back": res.get("not_back", 0) or 0, "reconnect_err": res.get("reconnect_err", 0) or 0,
        "storm_cpu_ns": res.get("storm_cpu_ns"),
        "errors": (res.get("errors", 0) or 0) if res else 1,
    }


def parse_sse(text):
    res = line_json(text, "RESULT ") or {}
    return {
        "units": res.get("connected", 0) or 0, "conns": res.get("conns"),
        "p50": res.get("first_event_p50_ms"), "p99": res.get("first_event_p99_ms"),
        "max": res.get("first_event_max_ms"), "kb": res.get("kb_per_stream"),
        "closed_early": res.get("closed_early", 0) or 0,
        "errors": (res.get("errors", 0) or 0) if res else 1,
    }


def parse_fanout(text):
    res = line_json(text, "RESULT ") or {}
    r = {
        "units": res.get("received", 0) or 0, "conns": res.get("conns"),
        "connected": res.get("connected", 0) or 0, "published": res.get("published", 0) or 0,
        "missed": res.get("missed"), "closed_early": res.get("closed_early", 0) or 0,
        "p50": res.get("delivery_p50_ms"), "p99": res.get("delivery_p99_ms"),
        "max": res.get("delivery_max_ms"), "pub_cpu_ns": res.get("pub_cpu_ns"),
        "errors": (res.get("errors", 0) or 0) if res else 1,
    }
    if res and r["missed"] is None:
        r["missed"] = 0
    return r


def counts(data, key):
    """The distinct values of `key` over every run of data, as "1,000/2,000" ("?": none)."""
    v = sorted({r[key] for rs in data.values() for r in rs.values() if r.get(key)})
    return "/".join("{:,}".format(c) for c in v) or "?"


def parse_flood(text):
    """flood / floodalone: the victim's echo (parse_ws, CPU over its send window) and, with the
    flooder, its `FLOODER {...}` line (streams connected, refused with 429, errors)."""
    r = parse_ws_window(text)
    res = line_json(text, "RESULT ") or {}
    r["conns"] = res.get("conns")
    r["window_secs"] = res.get("secs")
    fl = line_json(text, "FLOODER ")
    r["flooder"] = fl is not None
    r["fl_conns"] = fl.get("conns") if fl else None
    r["fl_up"] = fl.get("connected") if fl else None
    r["fl_refused"] = fl.get("refused") if fl else None
    r["fl_errors"] = fl.get("errors") if fl else None
    r["fl_open"] = fl.get("still_open") if fl else None
    return r


def flood_section(alone, flood):
    """One document's stream flood: the victim's p99 alone and with the flood, per round and
    target (ratio), the flooder's streams connected/refused, the target's CPU over the window."""
    if not alone and not flood:
        return []
    for data in (alone, flood):
        for rs in data.values():
            for r in rs.values():
                ns, secs = r.get("window_cpu_ns"), r.get("window_secs")
                r["cpu_pct"] = ns / 1e9 / secs * 100 if ns is not None and secs else None
    out = ["**One document flooding the proxy with streams** (victim: wsload echo, {} WebSockets "
           "over the document keys at a fixed rate, run alone and then while a flooder holds up to "
           "{} SSE streams of the one document `flood`; Tether's route has "
           "`limits: {{ streams_per_key: N }}` for this scenario, the peers have no such limit; "
           "ratio = victim p99 with the flood / alone in the same round; CPU = the target's "
           "process tree over the victim's send window, % of one CPU; not a CPU statistic: "
           "descriptive, per round)".format(
               counts(alone, "conns"), counts(flood, "fl_conns")), ""]
    rounds = sorted({r for rs in list(alone.values()) + list(flood.values()) for r in rs})
    head = ["victim p99 ms: flood / alone"] + ["round {}".format(r) for r in rounds] + ["median ratio"]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    targets = sorted(set(alone) | set(flood), key=order_key)
    for t in targets:
        a, f = alone.get(t, {}), flood.get(t, {})
        row, ratios = [t], []
        for rd in rounds:
            pa = a.get(rd, {}).get("p99")
            pf = f.get(rd, {}).get("p99")
            if pa and pf:
                ratios.append(pf / pa)
                row.append("{:.2f} / {:.2f} = {:.2f}".format(pf, pa, pf / pa))
            else:
                row.append("–")
        row.append("{:.2f}".format(med(ratios)) if ratios else "–")
        out.append("| " + " | ".join(row) + " |")
    out.append("")
    head = ["target", "victim p50 ms alone", "p50 ms flood", "p99 ms alone", "p99 ms flood",
            "victim msgs/s alone", "msgs/s flood", "victim errors alone/flood",
            "flooder streams up", "flooder refused (429)", "flooder errors", "CPU % alone",
            "CPU % flood", "foreign CPU % max", "steal % max", "disturbed runs", "rounds"]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for t in targets:
        a, f = alone.get(t, {}), flood.get(t, {})
        both = list(a.values()) + list(f.values())
        row = [t, mmm(vals(a, "p50"), "{:.2f}"), mmm(vals(f, "p50"), "{:.2f}"),
               mmm(vals(a, "p99"), "{:.2f}"), mmm(vals(f, "p99"), "{:.2f}"),
               mmm(vals(a, "rate"), "{:.0f}"), mmm(vals(f, "rate"), "{:.0f}"),
               "{}/{}".format(sum(r["errors"] for r in a.values()), sum(r["errors"] for r in f.values())),
               mmm(vals(f, "fl_up"), "{:.0f}"), mmm(vals(f, "fl_refused"), "{:.0f}"),
               str(sum(r["fl_errors"] or 0 for r in f.values()) + sum(1 for r in f.values() if not r["flooder"])),
               mmm(vals(a, "cpu_pct"), "{:.1f}"), mmm(vals(f, "cpu_pct"), "{:.1f}"),
               fmax([r["foreign"] for r in both]), fmax([r["steal"] for r in both], "{:.1f}"),
               str(sum(1 for r in both if r["disturbed"])), str(len(f))]
        out.append("| " + " | ".join(row) + " |")
    out.append("")
    return out


def num(meta, key, default=None):
    try:
        return float(meta[key])
    except (KeyError, TypeError, ValueError):
        return default


def load(d, prefix, parse):
    """{target: {round: record}}: the parsed output plus cpu_us, foreign, steal, disturbed."""
    out = {}
    for f in glob.glob(os.path.join(d, prefix + "-*-*.txt")):
        m = re.match(re.escape(prefix) + r"-(.+)-(\d+)\.txt$", os.path.basename(f))
        if not m:
            continue
        text = open(f).read()
        meta = line_json(text, "META ") or {}
        r = parse(text)
        secs = num(meta, "cpu_ticks")
        if secs is not None:
            secs /= num(meta, "clk_tck", 100.0)
        r["cpu_us"] = secs * 1e6 / r["units"] if secs is not None and r["units"] else None
        r["foreign"] = num(meta, "foreign_cpu_pct")
        r["steal"] = num(meta, "steal_pct")
        r["retries"] = int(num(meta, "retries", 0))
        settle_ms = num(meta, "settle_ms")
        r["settle_s"] = settle_ms / 1000.0 if settle_ms is not None else None
        r["unsettled"] = meta.get("settled") == "0"
        r["seed"] = meta.get("seed")
        max_foreign = num(meta, "max_foreign", DEFAULT_MAX_FOREIGN)
        max_steal = num(meta, "max_steal", DEFAULT_MAX_STEAL)
        why = []
        if r["foreign"] is not None and r["foreign"] > max_foreign:
            why.append("foreign {:g} % > {:g}".format(r["foreign"], max_foreign))
        if r["steal"] is not None and r["steal"] > max_steal:
            why.append("steal {:g} % > {:g}".format(r["steal"], max_steal))
        r["disturbed"] = why
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


def fmax(v, fmt="{:.0f}"):
    v = [x for x in v if x is not None and x == x]
    return fmt.format(max(v)) if v else "–"


def per_round_ratios(data, t, ref, rounds):
    """[cpu(t, r) / cpu(ref, r)] over the given rounds where both have a CPU figure."""
    return [data[t][r]["cpu_us"] / data[ref][r]["cpu_us"] for r in sorted(rounds)
            if r in data[t] and r in data[ref]
            and data[t][r].get("cpu_us") and data[ref][r].get("cpu_us")]


def median_ci(ratios):
    """(median ratio, CI low, CI high): bootstrap 95 % interval of the median log-ratio."""
    logs = [math.log(x) for x in ratios]
    rng = random.Random(BOOT_SEED)  # fixed: the summary of a results directory is reproducible
    n = len(logs)
    meds = [statistics.median(rng.choices(logs, k=n)) for _ in range(BOOT_N)]
    # quantiles(n=40) cuts at 2.5 %, 5 %, ..., 97.5 %: the first and last cut points
    q = statistics.quantiles(meds, n=40, method="inclusive")
    return statistics.median(ratios), math.exp(q[0]), math.exp(q[-1])


def scenario_target(name):
    v = os.environ.get("TARGET_" + name.upper(), "").strip()
    try:
        return float(v) if v else None
    except ValueError:
        return None


def headline(data, name, unit):
    out = []
    rounds = sorted({r for rs in data.values() for r in rs})
    disturbed = {}
    for t in sorted(data, key=order_key):
        for r, rec in data[t].items():
            for why in rec["disturbed"]:
                disturbed.setdefault(r, []).append("{} {}".format(t, why))
    clean = [r for r in rounds if r not in disturbed]
    seeds = sorted({rec["seed"] for rs in data.values() for rec in rs.values() if rec.get("seed")})
    retried = sum(rec["retries"] for rs in data.values() for rec in rs.values())
    no_steal = any(rec["steal"] is None for rs in data.values() for rec in rs.values())

    line = "Rounds: **{}** total, **{}** disturbed".format(len(rounds), len(disturbed))
    if disturbed:
        line += " (" + "; ".join("round {}: {}".format(r, ", ".join(disturbed[r]))
                                 for r in sorted(disturbed)) + ")"
    line += ". Runs retried by the guard (replaced attempts kept as *.tryN.log): {}.".format(retried)
    line += " Target order seed: {}.".format(", ".join(seeds) if seeds else "not recorded (fixed order)")
    if no_steal:
        line += " Steal time not recorded for some runs: they can only be flagged for foreign load."
    if len(rounds) < HEADLINE_ROUNDS:
        line += " **Fewer than {} rounds: not a headline figure.**".format(HEADLINE_ROUNDS)
    out += [line, ""]

    target = scenario_target(name)
    head = ["Tether build", "vs", "rounds", "n", "median Tether/peer CPU µs/%s" % unit,
            "95 % CI (bootstrap)", "CI upper bound"]
    if target is not None:
        head.append("upper < {:g}?".format(target))
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    builds = [t for t in sorted(data, key=order_key) if t not in NOT_TETHER]
    for t in builds:
        refs = [p for p in PEERS if p in data] + (["tether"] if t != "tether" and "tether" in data else [])
        for ref in refs:
            for label, rs in (("all", rounds), ("undisturbed", clean)):
                ratios = per_round_ratios(data, t, ref, rs)
                row = [t, ref, label, str(len(ratios))]
                if ratios:
                    m, lo, hi = median_ci(ratios)
                    row += ["{:.3f}".format(m), "{:.3f}–{:.3f}".format(lo, hi), "{:.3f}".format(hi)]
                    if target is not None:
                        row.append("yes" if hi < target else "no")
                else:
                    row += ["–", "–", "–"] + (["–"] if target is not None else [])
                out.append("| " + " | ".join(row) + " |")
    out.append("")
    return out


def table(data, unit, latency_cols, extra=()):
    """extra: (column head, record key, format) columns after the CPU column."""
    out = []
    head = ["target", "%s/s" % unit]
    head += ["%s ms" % c for c in latency_cols]
    head += ["CPU µs/%s" % unit] + [h for h, _, _ in extra]
    head += ["errors", "foreign CPU % max", "steal % max", "disturbed runs", "retries", "rounds"]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for t in sorted(data, key=order_key):
        rs = data[t]
        row = [t, mmm(vals(rs, "rate"), "{:.0f}")]
        row += [mmm(vals(rs, c), "{:.2f}") for c in latency_cols]
        row.append(mmm(vals(rs, "cpu_us"), "{:.1f}"))
        row += [mmm(vals(rs, k), fmt) for _, k, fmt in extra]
        row.append(str(sum(r["errors"] for r in rs.values())))
        row.append(fmax([r["foreign"] for r in rs.values()]))
        row.append(fmax([r["steal"] for r in rs.values()], "{:.1f}"))
        row.append(str(sum(1 for r in rs.values() if r["disturbed"])))
        row.append(str(sum(r["retries"] for r in rs.values())))
        row.append(str(len(rs)))
        out.append("| " + " | ".join(row) + " |")
    out.append("")
    return out


STATISTIC = (
    "**Statistic.** For each scenario: the median over rounds of the per-round ratio of Tether's "
    "CPU µs per request (http, post, tls, churn, churntls, h2, churntlsresume), per message (ws, "
    "wsrate, wstls), per stream (sse), per delivered event (fanout) or per reconnection (storm) to "
    "the peer's, both "
    "measured in the same round (every round visits every target in a freshly randomised order), with a "
    "bootstrap 95 % confidence interval of the per-round log-ratio ({:,} resamples of the "
    "rounds, median of each, 2.5th/97.5th percentiles, exponentiated; fixed generator seed {}). "
    "A round is *disturbed* when any of its runs saw foreign CPU above MAX_FOREIGN or steal time "
    "above MAX_STEAL; disturbed rounds are counted and listed, and the statistic is given over all "
    "rounds and over the undisturbed ones. A target ratio is met only when the interval's upper "
    "bound is below it. A headline needs at least {} rounds. The tables below each headline "
    "table are descriptive: median (min–max) over rounds.\n"
).format(BOOT_N, BOOT_SEED, HEADLINE_ROUNDS)


def wrk_scenario(name, title):
    """A wrk scenario (http, post, tls, churn, churntls): wrk text, per request, p50/p99 latency."""
    return (name, parse_wrk, "req", ["p50", "p99"], title, ())


def post_mix(env_text):
    """'1 request in 10 a POST with a 1,024-byte body', from env.txt (run.sh's defaults when it
    does not say)."""
    m = re.search(r"post_every=(\d+) post_bytes=(\d+)", env_text)
    every, size = (int(m.group(1)), int(m.group(2))) if m else (10, 1024)
    return "1 request in {} a POST with a {:,}-byte body".format(every, size)


def sse_section(d, data):
    """SSE streams held: the statistic on CPU per stream, then a descriptive table with the
    memory per stream (fresh processes and rounds), first-event latency, errors."""
    fresh = {}
    for f in glob.glob(os.path.join(d, "sse-rss-*.txt")):
        text = open(f).read()
        meta = line_json(text, "META ") or {}
        t = meta.get("target") or os.path.basename(f)[len("sse-rss-"):-len(".txt")]
        fresh[t] = parse_sse(text)
    if not data and not fresh:
        return []
    conns = sorted({r["conns"] for rs in list(data.values()) + [fresh] for r in rs.values()
                    if r.get("conns")})
    out = ["**SSE streams held** ({} event streams per run over 1,000 document keys, "
           "HTTP/1.1, each awaited to its first event, held, closed; CPU = the target's process "
           "tree over the whole run / streams connected; memory = VmRSS of the process tree while "
           "holding minus before connecting, per stream)".format(
               "/".join("{:,}".format(c) for c in conns) or "?"), ""]
    if data:
        out += headline(data, "sse", "stream")
    head = ["target", "connected/requested", "errors (closed early)", "first event p50 ms",
            "p99 ms", "max ms", "KB/stream fresh", "KB/stream rounds", "CPU µs/stream",
            "streams let go after s (not within bound)",
            "foreign CPU % max", "steal % max", "disturbed runs", "retries", "rounds"]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for t in sorted(set(data) | set(fresh), key=order_key):
        rs = data.get(t, {})
        allr = list(rs.values()) + ([fresh[t]] if t in fresh else [])
        f = fresh.get(t)
        row = [t,
               "{}/{}".format(mmm([r["units"] for r in rs.values()], "{:.0f}") if rs else "–",
                              mmm(sorted({r["conns"] for r in rs.values() if r.get("conns")}), "{:.0f}")
                              if rs else "–"),
               "{} ({})".format(sum(r["errors"] for r in allr), sum(r["closed_early"] for r in allr)),
               mmm(vals(rs, "p50"), "{:.2f}"), mmm(vals(rs, "p99"), "{:.2f}"),
               mmm(vals(rs, "max"), "{:.2f}"),
               "{:.2f}".format(f["kb"]) if f and f.get("kb") is not None else "–",
               mmm(vals(rs, "kb"), "{:.2f}"), mmm(vals(rs, "cpu_us"), "{:.1f}"),
               "{} ({})".format(mmm(vals(rs, "settle_s"), "{:.1f}"),
                                sum(1 for r in rs.values() if r.get("unsettled"))),
               fmax([r["foreign"] for r in rs.values()]),
               fmax([r["steal"] for r in rs.values()], "{:.1f}"),
               str(sum(1 for r in rs.values() if r["disturbed"])),
               str(sum(r["retries"] for r in rs.values())), str(len(rs))]
        out.append("| " + " | ".join(row) + " |")
    out += ["", "Errors count streams that failed to open, did not answer 200 with "
            "text/event-stream, sent no event within the timeout, or were ended by the other "
            "side while held (in brackets). \"fresh\": one run per target on freshly started "
            "processes (sse-rss-<target>.txt), before the allocator has memory of earlier runs "
            "to reuse; \"rounds\": the per-round runs on the same long-lived processes. "
            "First-event latency runs from writing the request to the first complete event. "
            "\"Let go after\": from the load tool's exit (every client gone) until the target's "
            "descriptors were back to where they were before the run; the run's CPU is counted "
            "until then (META settle_ms; runs without it predate the wait).", ""]
    return out


def fanout_section(data):
    """SSE fan-out: the statistic on CPU per delivered event (publish phase), the delivery p99
    of every round, a descriptive table."""
    if not data:
        return []
    for rs in data.values():
        for r in rs.values():
            # The run's whole CPU (META ticks: stream setup included) per delivered event stays
            # in the table; the statistic uses the publish phase only.
            r["run_cpu_us"] = r["cpu_us"]
            r["cpu_us"] = (r["pub_cpu_ns"] / 1000.0 / r["units"]
                           if r.get("pub_cpu_ns") is not None and r["units"] else None)
    out = ["**SSE fan-out** ({} streams of one document, so on one backend; events published "
           "through the proxy 100 ms apart (POST /publish/x, the same X-Doc-Id) and delivered to "
           "every stream; CPU = the target's process tree from the first publish until the "
           "deliveries were in (schedstat ns, counted by wsload) / events delivered; latency = "
           "publish sent → event read by the subscriber, including the load tool's own "
           "scheduling of its subscribers)".format(counts(data, "conns")), ""]
    out += headline(data, "fanout", "event")
    rounds = sorted({r for rs in data.values() for r in rs})
    head = ["delivery p99 ms"] + ["round {}".format(r) for r in rounds] + ["median"]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for t in sorted(data, key=order_key):
        rs = data[t]
        row = [t] + ["{:.2f}".format(rs[r]["p99"]) if r in rs and rs[r].get("p99") is not None
                     else "–" for r in rounds]
        row.append(mmm(vals(rs, "p99"), "{:.2f}").split(" ")[0])
        out.append("| " + " | ".join(row) + " |")
    out.append("")
    head = ["target", "subscribers", "events delivered/expected", "missed", "errors",
            "delivery p50 ms", "p99 ms", "max ms", "CPU µs/event (publish phase)",
            "CPU µs/event (whole run)", "foreign CPU % max", "steal % max", "disturbed runs",
            "rounds"]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for t in sorted(data, key=order_key):
        rs = data[t]
        row = [t, mmm([r["connected"] for r in rs.values()], "{:.0f}"),
               "{}/{}".format(sum(r["units"] for r in rs.values()),
                              sum(r["units"] + (r["missed"] or 0) for r in rs.values())),
               str(sum(r["missed"] or 0 for r in rs.values())),
               str(sum(r["errors"] for r in rs.values())),
               mmm(vals(rs, "p50"), "{:.2f}"), mmm(vals(rs, "p99"), "{:.2f}"),
               mmm(vals(rs, "max"), "{:.2f}"), mmm(vals(rs, "cpu_us"), "{:.2f}"),
               mmm(vals(rs, "run_cpu_us"), "{:.1f}"),
               fmax([r["foreign"] for r in rs.values()]),
               fmax([r["steal"] for r in rs.values()], "{:.1f}"),
               str(sum(1 for r in rs.values() if r["disturbed"])), str(len(rs))]
        out.append("| " + " | ".join(row) + " |")
    out.append("")
    return out


def storm_section(data):
    """Reconnect storm: the statistic on CPU per reconnection (storm phase), the time until all
    were back in every round against STORM_MAX_SECS, a descriptive table."""
    if not data:
        return []
    limit_s = float(os.environ.get("STORM_MAX_SECS", "5") or 5)
    for rs in data.values():
        for r in rs.values():
            r["run_cpu_us"] = r["cpu_us"]
            r["cpu_us"] = (r["storm_cpu_ns"] / 1000.0 / r["units"]
                           if r.get("storm_cpu_ns") is not None and r["units"] else None)
    out = ["**Reconnect storm** ({} WebSockets through the proxy, one echo each; the backends, told "
           "directly (POST /ws-close-all), close all of them at once with 1012; every client "
           "reconnects at once and echoes once; time = from the close request until every "
           "connection was back; CPU = the target's process tree over that time (schedstat ns, "
           "counted by wsload) / reconnections)".format(counts(data, "conns")), ""]
    out += headline(data, "storm", "reconnection")
    rounds = sorted({r for rs in data.values() for r in rs})
    head = (["all back after, ms"] + ["round {}".format(r) for r in rounds]
            + ["all rounds within {:g} s, 0 errors?".format(limit_s)])
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for t in sorted(data, key=order_key):
        rs = data[t]
        row = [t]
        for r in rounds:
            if r not in rs:
                row.append("–")
            elif rs[r].get("all_back_ms") is None:
                row.append("not all back ({} missing)".format(rs[r]["not_back"]))
            else:
                row.append("{:.0f}{}".format(rs[r]["all_back_ms"],
                                             " ({} errors)".format(rs[r]["errors"]) if rs[r]["errors"] else ""))
        ok = all(rs[r].get("all_back_ms") is not None and rs[r]["all_back_ms"] <= limit_s * 1000
                 and rs[r]["errors"] == 0 for r in rs)
        row.append("yes" if ok and rs else "no")
        out.append("| " + " | ".join(row) + " |")
    out.append("")
    head = ["target", "connected", "back", "errors (failed reconnects)", "back p50 ms", "p99 ms",
            "max ms", "CPU µs/reconnection (storm)", "CPU µs/reconnection (whole run)",
            "foreign CPU % max", "steal % max", "disturbed runs", "rounds"]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for t in sorted(data, key=order_key):
        rs = data[t]
        row = [t, mmm([r["connected"] for r in rs.values()], "{:.0f}"),
               mmm([r["units"] for r in rs.values()], "{:.0f}"),
               "{} ({})".format(sum(r["errors"] for r in rs.values()),
                                sum(r["reconnect_err"] for r in rs.values())),
               mmm(vals(rs, "p50"), "{:.0f}"), mmm(vals(rs, "p99"), "{:.0f}"),
               mmm(vals(rs, "max"), "{:.0f}"), mmm(vals(rs, "cpu_us"), "{:.1f}"),
               mmm(vals(rs, "run_cpu_us"), "{:.1f}"),
               fmax([r["foreign"] for r in rs.values()]),
               fmax([r["steal"] for r in rs.values()], "{:.1f}"),
               str(sum(1 for r in rs.values() if r["disturbed"])), str(len(rs))]
        out.append("| " + " | ".join(row) + " |")
    out += ["", "Errors count connections that failed to open, ended without a 1012 close, were not "
            "back within the wait, and failed reconnect attempts (each retried after 100 ms; in "
            "brackets). Back p50/p99/max: per connection, from the close request until its new "
            "socket had echoed.", ""]
    return out


def idle_table(d, prefix, title, max_kb=None):
    """The held-WebSockets memory table of idle (and wsidle, with its warm-up and the goal)."""
    idle = {}
    for f in glob.glob(os.path.join(d, prefix + "-*.txt")):
        text = open(f).read()
        meta = line_json(text, "META ") or {}
        r = line_json(text, "RESULT ")
        if r:
            idle[meta.get("target", "?")] = r
    if not idle:
        return []
    out = [title + "\n"]
    head = ["target", "held/requested", "RSS before MiB", "RSS after MiB", "KB per conn"]
    if max_kb is not None:
        head += ["messages echoed (errors)", "connect + warm-up s", "≤ {:g} KB?".format(max_kb)]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for t in sorted(idle, key=order_key):
        r = idle[t]
        row = [t, "{}/{}".format(r["still_open"], r["conns"]), "{:.1f}".format(r["rss_before_kb"] / 1024),
               "{:.1f}".format(r["rss_after_kb"] / 1024), "{:.2f}".format(r["kb_per_conn"])]
        if max_kb is not None:
            row += ["{} ({})".format(r.get("warm_echoed", "–"), r.get("warm_err", "–")),
                    "{:.1f}".format(r.get("warm_secs", 0.0)),
                    "yes" if r["kb_per_conn"] <= max_kb and r["still_open"] == r["conns"] else "no"]
        out.append("| " + " | ".join(row) + " |")
    out.append("")
    return out


def main(d):
    out = []
    env = os.path.join(d, "env.txt")
    env_text = open(env).read() if os.path.exists(env) else ""
    if env_text:
        out.append("```\n" + env_text.strip() + "\n```\n")
    mix = post_mix(env_text)
    scenarios = [
        wrk_scenario("http", "**HTTP keep-alive** (wrk, 64 connections, 1,000 document keys; CPU = "
                     "proxy process tree, or backend b1 for direct)"),
        wrk_scenario("post", "**HTTP keep-alive with POSTs** (wrk, the same 64 connections and "
                     "1,000 document keys as http, " + mix + " (Content-Length) on the same "
                     "connections; CPU = proxy process tree, or backend b1 for direct)"),
        wrk_scenario("tls", "**The POST mix over TLS 1.3** (wrk over HTTPS, HTTP/1.1, the post "
                     "scenario's 64 keep-alive connections and mix: the cost of TLS records, not of "
                     "handshakes; no direct, the backends speak plain HTTP)"),
        wrk_scenario("churn", "**Connection churn** (wrk, 64 connections, every GET with "
                     "`Connection: close`: a new client connection per request)"),
        wrk_scenario("churntls", "**Connection churn over TLS 1.3** (as churn, over HTTPS: a full "
                     "TLS 1.3 handshake per request, wrk resumes no session; no direct)"),
        ("h2", parse_h2load, "req", ["mean"],
         "**The POST mix over HTTP/2** (h2load over TLS 1.3, ALPN h2, keep-alive, one stream in "
         "flight per connection: GET processes and one POST process with about a tenth of the 64 "
         "connections side by side, each process with an X-Doc-Id of its own, paths over the "
         "document keys; CPU per 2xx response of all processes; h2load reports mean latency "
         "only; no direct)", (("POST %", "post_pct", "{:.1f}"),)),
        ("churntlsresume", parse_churn, "req", ["p50", "p99"],
         "**Connection churn over TLS 1.3 with session resumption** (wsload churn: 64 loops of "
         "connect, TLS 1.3 resuming the loop's last session, one GET with `Connection: close`, "
         "response, server's close; latency = connect to response; no direct)",
         (("resumed %", "resumed_pct", "{:.1f}"),)),
        ("ws", parse_ws, "msg", ["p50", "p99"],
         "**WebSocket echo, closed loop** (1,000 connections, 64-byte messages, one in "
         "flight per connection)", ()),
        ("wsrate", parse_ws, "msg", ["p50", "p99", "p999"],
         "**WebSocket echo at a fixed rate** (1,000 connections; p99 is the latency "
         "the proxy adds below saturation)", ()),
        ("wstls", parse_ws_window, "msg", ["p50", "p99"],
         "**WebSocket echo over TLS 1.3, closed loop** (wss:// to the TLS listeners, 1,000 "
         "connections, 64-byte messages, one in flight per connection; CPU = the target's process "
         "tree over the send window (schedstat ns, counted by wsload) / messages echoed in it, "
         "without the 1,000 TLS handshakes of the connect phase, which the whole-run column "
         "includes; no direct)", (("CPU µs/msg (whole run)", "run_cpu_us", "{:.1f}"),)),
    ]
    loaded = [(s, load(d, s[0], s[1])) for s in scenarios]
    for (name, *_), data in loaded:
        if name == "wstls":
            window_cpu(data)
    if any(data for _, data in loaded):
        out.append(STATISTIC)
    for (name, _, unit, lat, title, extra), data in loaded:
        if not data:
            continue
        out += [title, ""]
        out += headline(data, name, unit)
        out += table(data, unit, lat, extra)
    out += idle_table(d, "idle", "**Idle WebSockets held** (VmRSS of the proxy process tree, freshly "
                      "started; backend b1 for direct; one run per target, in a seeded random order)")
    max_kb = float(os.environ.get("WSIDLE_MAX_KB", "8") or 8)
    out += idle_table(d, "wsidle", "**WebSockets held idle after traffic** (each connection first "
                      "echoed its messages, 64 bytes and larger ones alternately, then idled; VmRSS "
                      "of the proxy process tree, freshly started, while all idle, minus before "
                      "connecting; backend b1 for direct; one run per target, in a seeded random "
                      "order; goal: at most {:g} KB per connection)".format(max_kb), max_kb)
    sse = load(d, "sse", parse_sse)
    fan = load(d, "fanout", parse_fanout)
    storm = load(d, "storm", parse_storm)
    if (sse or fan or storm) and not any(data for _, data in loaded):
        out.append(STATISTIC)
    out += sse_section(d, sse)
    out += fanout_section(fan)
    out += storm_section(storm)
    out += flood_section(load(d, "floodalone", parse_flood), load(d, "flood", parse_flood))
    print("\n".join(out))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: summarize.py RESULTS_DIR", file=sys.stderr)
        sys.exit(2)
    main(sys.argv[1])
