"""bench.transport's tables: each cell's median over every round's measured calls, with each round's median
beside it (this machine's speed moves between rounds), CPU per request and cached / prompt tokens."""

import statistics

from bench.caches import CacheTally

NAN = float("nan")


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else NAN


def merged(cells: list[dict]) -> dict | None:
    """One server's cell over its rounds: medians of every measured call and of each round, caches summed, CPU
    averaged per call."""
    if not cells:
        return None
    calls = sum(c["calls"] for c in cells)
    return {"ms": _median([v for c in cells for v in c["latencies_ms"]]),
            "rounds_ms": [_median(c["latencies_ms"]) for c in cells],
            "ingest_ms": _median([v for c in cells for v in c.get("ingest_ms", [])]),
            "cache": CacheTally.total(c["cache"] for c in cells),
            "codes": sorted({code for c in cells for code in c["codes"]}),
            "cpu_ms": {k: sum(c["cpu_ms"][k] * c["calls"] for c in cells) / calls for k in cells[0]["cpu_ms"]},
            "first_ms": _median([v for c in cells if "first" in c for v in c["first"]["latencies_ms"]])}


def _ms(fig: dict | None) -> str:
    """`median (round 1, round 2, ...)`, or `-`."""
    if fig is None or fig["ms"] != fig["ms"]:
        return "-"
    return f"{fig['ms']:.0f} (" + ", ".join("-" if r != r else f"{r:.0f}" for r in fig["rounds_ms"]) + ")"


def _key(c: dict) -> tuple:
    return c["kind"], c.get("cell", ""), c["pixels"], c["images"], c["transport"]


def report(cells: list[dict], bandwidth: float, args) -> None:
    by = {k: {s: merged([c for c in cells if c["server"] == s and _key(c) == k]) for s in ("ours", "incumbent")}
          for k in dict.fromkeys(map(_key, cells))}
    print(f"\nFrom scratch: every request its own pixels and hash on both servers; max_tokens=1; end-to-end ms, the "
          f"median of {args.repeats} x {args.rounds} round(s) after one unmeasured request (each round's median).")
    print(f"{'pixels':>7} {'images':>6} {'MB':>6} {'transport':>9} | {'ours ms':>20} | {'incumbent ms':>20} | "
          f"{'ratio':>5} | {'ingest ms':>9} {'GB/s':>5} {'memcpy':>6} | {'front o/i':>11} | {'engine o/i':>11} | "
          "cached/prompt ours, inc")
    for (kind, _, dtype, n, transport), fig in by.items():
        if kind != "scratch":
            continue
        o, i = fig["ours"], fig["incumbent"]
        mb = next(c["MB"] for c in cells if _key(c)[0] == "scratch" and (c["pixels"], c["images"]) == (dtype, n))
        ingest = o["ingest_ms"] if o else NAN
        gbps = mb / ingest
        cpu = lambda part: "/".join(f"{f['cpu_ms'][part]:.0f}" if f else "-" for f in (o, i))  # noqa: E731
        print(f"{dtype:>7} {n:6d} {mb:6.1f} {transport:>9} | {_ms(o):>20} | {_ms(i):>20} | "
              f"{o['ms'] / i['ms'] if o and i else NAN:5.2f} | {ingest:9.1f} {gbps:5.2f} {100 * gbps / bandwidth:5.0f}% | "
              f"{cpu('front_end'):>11} | {cpu('engine'):>11} | {o['cache'] if o else '-'}, {i['cache'] if i else '-'}")
    print(f"(ingest: ours, from the parsed message to engine-ready tensors; memcpy: ingest GB/s over this machine's "
          f"memcpy, {bandwidth:.1f} GB/s in this run; front / engine: CPU ms per request of the server's process / "
          "its vLLM processes)")
    print(f"\nCache cells: uint8 inline; fresh pixels sent once (first, not measured), then resent {args.repeats} x "
          f"{args.rounds} round(s); end-to-end ms, median (each round's).")
    print(f"{'images':>6} {'cell':<32} | {'first o/i':>11} | {'ours ms':>16} {'cached/prompt':>13} | "
          f"{'incumbent ms':>16} {'cached/prompt':>13} {'answer':>16}")
    for (kind, label, _, n, _), fig in by.items():
        if kind != "cache":
            continue
        o, i = fig["ours"], fig["incumbent"]
        first = "/".join(f"{f['first_ms']:.0f}" if f else "-" for f in (o, i))
        print(f"{n:6d} {label:<32} | {first:>11} | {_ms(o):>16} {str(o['cache'] if o else '-'):>13} | "
              f"{_ms(i):>16} {str(i['cache'] if i else '-'):>13} {(','.join(i['codes']) or 'OK') if i else '-':>16}")
