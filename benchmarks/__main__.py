"""Run the benchmarks: ``python -m benchmarks [--quick] [--out DIR]``.

Prints a table, writes ``benchmarks.json`` and, if matplotlib is installed
(``pip install -e ".[bench]"``), draws ``benchmarks.png`` in ``--out``.
B1 instructions counts B1 under valgrind's callgrind (see
:mod:`benchmarks.instructions`; skipped, saying why, without valgrind): about
a minute and a half with ``--quick``, ten minutes without.
B5 spends about a second on each of its inline requests (5 with ``--quick``,
10 without), as its SMTP server stalls that long. B6 drains 20,000 outbox
rows per run (1,000 with ``--quick``). B7 (Celery) needs Redis
(``NOTIFYQUEUE_TEST_REDIS_URL``, default the local one) and starts a real
worker process; it is skipped, saying why, where Redis cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import typing as t
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import sqlalchemy as sa

from . import cases, celery_cases, instructions

PACKAGES = [
    "notifyqueue",
    "flask",
    "sqlalchemy",
    "flask-sqlalchemy",
    "flask-mail",
    "blinker",
    "psycopg",
    "aiosmtpd",
    "celery",
    "kombu",
    "redis",
]
POSTGRES_URL = os.environ.get(
    "NOTIFYQUEUE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def machine() -> dict[str, t.Any]:
    """The CPU, Python and package versions the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    packages: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "system": platform.platform(),
        "packages": packages,
    }


def postgres_url() -> str | None:
    """A fresh schema on PostgreSQL, or None (with the reason printed)."""
    try:
        engine = sa.create_engine(POSTGRES_URL)
        with engine.begin() as connection:
            connection.execute(sa.text(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))
            connection.execute(sa.text(f"CREATE SCHEMA {SCHEMA}"))
        engine.dispose()
    except Exception as exc:  # any failure means: not usable here
        if os.environ.get("NOTIFYQUEUE_REQUIRE_SERVICES") == "1":
            raise RuntimeError(
                f"PostgreSQL at {POSTGRES_URL} is unreachable, and"
                " NOTIFYQUEUE_REQUIRE_SERVICES=1 requires it"
            ) from exc
        print(f"PostgreSQL skipped: {POSTGRES_URL} unreachable: {exc}", file=sys.stderr)
        return None
    return f"{POSTGRES_URL}?options=-csearch_path%3D{SCHEMA}"


SCHEMA = f"notifyqueue_bench_{os.getpid()}"
RESULTS = Path(__file__).parent / "results"


def drop_schema() -> None:
    engine = sa.create_engine(POSTGRES_URL)
    with engine.begin() as connection:
        connection.execute(sa.text(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))
    engine.dispose()


def run(quick: bool) -> dict[str, t.Any]:
    with tempfile.TemporaryDirectory() as directory:
        return _run(
            quick, cases.sqlite_url(directory), cases.sqlite_url(directory, "drainer")
        )


def _run(quick: bool, sqlite: str, drainer_sqlite: str) -> dict[str, t.Any]:
    repeats = 3 if quick else 15
    pg = postgres_url()
    databases = {"sqlite": sqlite} | ({"postgresql": pg} if pg else {})
    results: dict[str, t.Any] = {"machine": machine(), "quick": quick}
    emails = 20 if quick else 100
    try:
        results["B1"] = cases.b1_per_intent(
            sqlite, [1, 10, 100, 1000], repeats, budget=0.01 if quick else 0.2
        )
        results["B1 instructions"] = instructions.b1_instructions(quick)
        results["B2"] = {
            name: cases.b2_request_overhead(url, 20 if quick else 300, repeats)
            for name, url in databases.items()
        }
        results["B3"] = [cases.b3_mail(sqlite, emails, repeats)]
        if shutil.which("openssl"):
            results["B3"].append(cases.b3_mail(sqlite, emails, repeats, relay=True))
        else:
            print("B3 STARTTLS + AUTH skipped: no openssl command", file=sys.stderr)
        results["B4"] = cases.b4_memory(
            sqlite, 500 if quick else 10_000, 100 if quick else 1000
        )
        results["B5"] = cases.b5_slow_mail(
            sqlite, 10 if quick else 20, repeats, 5 if quick else 10
        )
        # B6's SQLite database is in WAL mode: a file of its own.
        results["B6"] = {
            name: cases.b6_drainer(url, 1000 if quick else 20_000, 1 if quick else 2)
            for name, url in (databases | {"sqlite": drainer_sqlite}).items()
        }
        results["B7"] = b7(sqlite, quick, repeats)
    finally:
        if pg:
            drop_schema()
    return results


def b7(sqlite: str, quick: bool, repeats: int) -> dict[str, t.Any]:
    """B7 (Celery), or ``{"skipped": reason}`` where Redis is not reachable."""
    reason = celery_cases.redis_unreachable()
    if reason is not None:
        if os.environ.get("NOTIFYQUEUE_REQUIRE_SERVICES") == "1":
            raise RuntimeError(f"B7: {reason}, and NOTIFYQUEUE_REQUIRE_SERVICES=1")
        print(f"B7 skipped: {reason}", file=sys.stderr)
        return {"skipped": reason}
    return {
        "redis": celery_cases.REDIS_URL,
        "request": celery_cases.b7_request(sqlite, 20 if quick else 200, repeats),
        "publish": celery_cases.b7_publish(200 if quick else 2000, repeats),
        "worker": celery_cases.b7_worker(500 if quick else 5000, 1 if quick else 3),
    }


def table(results: dict[str, t.Any]) -> str:
    def us(spread: dict[str, float]) -> str:
        return (
            f"{spread['median'] * 1e6:8.2f} µs"
            f" ({spread['min'] * 1e6:.2f}–{spread['max'] * 1e6:.2f})"
        )

    def ms(spread: dict[str, float]) -> str:
        return f"{spread['median'] * 1e3:.1f} ms"

    def ms_range(spread: dict[str, float]) -> str:
        return (
            f"{spread['median'] * 1e3:7.2f} ms"
            f" ({spread['min'] * 1e3:.2f}–{spread['max'] * 1e3:.2f})"
        )

    def per_second(spread: dict[str, float]) -> str:
        return f"{spread['median']:7.0f}/s ({spread['min']:.0f}–{spread['max']:.0f})"

    def x(spread: dict[str, float]) -> str:
        return f"{spread['median']:.2f}x ({spread['min']:.2f}–{spread['max']:.2f})"

    m = results["machine"]
    b1_rows = results["B1"]["rows"]
    # Notifyqueue's whole transaction over the naive queue's, where B1 has it.
    wholes = [row.get("whole transaction ratio") for row in b1_rows]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}",
        "Packages: " + ", ".join(f"{k} {v}" for k, v in m["packages"].items() if v),
        "",
        "B1 per-intent cost (median, min–max), SQLite",
        f"{'intents':>8} {'bare transaction':>28} {'notifyqueue':>30}"
        f" {'naive':>30}  {'ratio':<22}"
        + ("  whole transaction ratio" if any(wholes) else ""),
    ]
    for row, whole in zip(b1_rows, wholes, strict=True):
        lines.append(
            f"{row['intents']:>8} {us(row['bare transaction']):>28}"
            f" {us(row['notifyqueue per intent']):>30}"
            f" {us(row['naive per intent']):>30}  {x(row['ratio']):<22}"
            + (f"  {x(whole)}" if whole else "")
        )
    lines += ["", *b1_instructions_table(results["B1 instructions"])]

    def statements(part: dict[str, list[str]]) -> str:
        inside = len(part["in the transaction"])
        return f"{inside + len(part['after the commit'])} ({inside} to its COMMIT)"

    lines += ["", "B2 request overhead (per request)"]
    for name, row in results["B2"].items():
        undecorated = f"  undecorated {us(row['undecorated'])}"
        extra = row["durable extra statements"]
        lines += [
            f"  {name:<10} notifyqueue {us(row['notifyqueue'])}{undecorated}"
            f"  ratio {x(row['ratio'])}",
            f"  {'':<10} background  {us(row['notifyqueue background'])}"
            f"{' ' * len(undecorated)}  ratio {x(row['background ratio'])}",
            f"  {'':<10} durable     {us(row['notifyqueue durable'])}"
            f"{' ' * len(undecorated)}  ratio {x(row['durable ratio'])}"
            " to notifyqueue",
            f"  {'':<10} statements: notifyqueue"
            f" {statements(row['statements']['notifyqueue'])}, durable"
            f" {statements(row['statements']['notifyqueue durable'])}; durable's"
            f" extra: {', '.join(extra['in the transaction']) or 'none'} to the"
            f" COMMIT, {', '.join(extra['after the commit']) or 'none'} after it",
        ]
    lines += ["", f"B3 {results['B3'][0]['emails']} emails in one transaction"]
    for b3 in results["B3"]:
        lines.append(
            f"  {b3['server']:<16} notifyqueue {ms(b3['notifyqueue'])},"
            f" one connection each {ms(b3['naive'])}, speed-up {x(b3['speed-up'])}"
        )
    b4 = results["B4"]
    peaks = b4["peak bytes per intent"]
    largest = ", ".join(
        f"{name} {size}" for name, size in b4["retained bytes, largest by file"].items()
    )
    lines += [
        "",
        f"B4 memory after {b4['transactions']} transactions:"
        f" {b4['retained bytes allocated by notifyqueue']} bytes retained by"
        f" notifyqueue, {b4['retained bytes']} in all ({largest})",
        f"   peak bytes per queued intent ({b4['intents']} in one transaction):"
        f" notifyqueue {peaks['notifyqueue']:.0f}, naive {peaks['naive']:.0f}",
    ]
    b5 = results["B5"]
    stats = b5["background stats"]
    lines += [
        "",
        "B5 colour endpoint over HTTP, the SMTP server stalling"
        f" {b5['smtp data delay']:g} s at DATA (median per request)",
        f"  mail background {ms_range(b5['background']):<28}"
        f"  ratio to no mail {x(b5['background ratio'])}",
        f"  no mail         {ms_range(b5['no mail'])}",
        f"  mail inline     {ms_range(b5['inline']):<28}"
        f"  ratio to no mail {b5['inline ratio']:.0f}x",
        f"  {b5['emails received']} of {b5['emails expected']} emails received,"
        f" each once; background ({b5['background threads']} threads):"
        f" {stats['handed_off']} handed off, {stats['delivered']} delivered,"
        f" {stats['failed']} failed, {stats['inline_fallbacks']} inline fallbacks;"
        f" all out {b5['seconds to settle']:.1f} s after the last request",
    ]
    b6 = next(iter(results["B6"].values()))
    layouts = [key for key in b6 if key.endswith(" per commit")]
    lines += [
        "",
        f"B6 drainer: {b6['rows']} due rows, one drain(once=True,"
        f" batch={b6['batch']}) to a do-nothing durable channel, intents per"
        f" second (median of {b6['runs']} runs, min–max)",
    ]
    for name, row in results["B6"].items():
        lines.append(
            f"  {name:<10} "
            + "  ".join(
                f"{layout} {per_second(row[layout]['intents per second'])}"
                for layout in layouts
            )
        )
    lines += ["", *b7_table(results["B7"], us, ms_range, per_second, x)]
    return "\n".join(lines)


def b1_instructions_table(b1: dict[str, t.Any]) -> list[str]:
    if "skipped" in b1:
        return [f"B1 instructions skipped: {b1['skipped']}"]

    def count(value: float | None) -> str:
        return "—" if value is None else f"{value:,.0f}"

    lines = [
        f"B1 instructions per intent (callgrind, {b1['valgrind']}), SQLite",
        f"{'intents':>8} {'T1/T2':>11} {'bare transaction':>17} {'notifyqueue':>12}"
        f" {'naive':>12} {'Django':>12}  ratio  whole",
    ]
    for row in b1["rows"]:
        t1, t2 = row["transactions"]
        whole = row.get("whole transaction ratio")
        lines.append(
            f"{row['intents']:>8} {f'{t1}/{t2}':>11}"
            f" {count(row['instructions per transaction']['bare']):>17}"
            f" {count(row['notifyqueue per intent']):>12}"
            f" {count(row['naive per intent']):>12}"
            f" {count(row['django per intent']):>12}"
            f"  {row['ratio']:.2f}x" + (f"  {whole:.2f}x" if whole else "")
        )
    lines.append(
        "  ratio: notifyqueue's per intent over the naive queue's; whole:"
        " notifyqueue's whole transaction over the naive queue's"
    )
    if "repeated run" in b1:
        first, second = b1["repeated run"]["instructions"]
        lines.append(f"  one run counted twice: {first:,} and {second:,} instructions")
    if "django skipped" in b1:
        lines.append(f"  Django skipped: {b1['django skipped']}")
    return lines


def b7_table(
    b7: dict[str, t.Any], *formats: t.Callable[[dict[str, float]], str]
) -> list[str]:
    us, ms_range, per_second, x = formats
    if "skipped" in b7:
        return [f"B7 Celery skipped: {b7['skipped']}"]
    request, publish, worker = b7["request"], b7["publish"], b7["worker"]
    first = "publish opening a connection"
    return [
        f"B7 Celery (Redis at {b7['redis']}): the colour endpoint with its mail"
        " channel on each mode (median per request, min–max)",
        f"  mail inline     {ms_range(request['mail inline'])}  (SMTP on loopback)",
        f"  mail background {ms_range(request['mail background'])}",
        f"  mail celery     {ms_range(request['mail celery'])}  ratio to inline"
        f" {x(request['celery to inline ratio'])}, to background"
        f" {x(request['celery to background ratio'])}",
        f"  one publish {us(publish['publish'])} on a kept connection; one that"
        f" opens its connection {us(publish[first])}",
        f"  one worker (solo pool), do-nothing channel, {worker['tasks']} tasks"
        f" {worker['per commit']} to a commit, from the first publish to the last"
        f" delivery: {per_second(worker['tasks per second'])} (publishing alone"
        f" {per_second(worker['publishes per second'])}; the worker started in"
        f" {worker['worker startup seconds']:.1f} s)",
    ]


def chart(results: dict[str, t.Any], path: Path) -> bool:
    """Draw B1-B3 and B5-B7 as a PNG; False if matplotlib is not installed."""
    try:
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    celery = "skipped" not in results["B7"]
    panels = 6 if celery else 5
    fig, axes = plt.subplots(1, panels, figsize=(21 * panels / 5, 4))
    b1, b2, b3, b5, b6 = axes[:5]
    rows = results["B1"]["rows"]
    sizes = [row["intents"] for row in rows]
    for side in ("notifyqueue", "naive"):
        key = f"{side} per intent"
        medians = [row[key]["median"] * 1e6 for row in rows]
        errors = [
            [(row[key]["median"] - row[key]["min"]) * 1e6 for row in rows],
            [(row[key]["max"] - row[key]["median"]) * 1e6 for row in rows],
        ]
        b1.errorbar(sizes, medians, yerr=errors, marker="o", capsize=3, label=side)
    b1.set_xscale("log")
    b1.set_yscale("log")
    low, high = b1.get_ylim()
    b1.set_yticks([y for y in (1, 2, 3, 5, 10, 20, 30, 50, 100) if low <= y <= high])
    b1.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    b1.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    b1.set_xlabel("intents per transaction")
    b1.set_ylabel("µs per intent (commit excluded)")
    b1.set_title("B1 per-intent cost")
    b1.legend()
    names = list(results["B2"])
    b2_sides = (
        (-0.3, "notifyqueue", "notifyqueue", "ratio"),
        (-0.1, "notifyqueue background", "background", "background ratio"),
        (0.1, "notifyqueue durable", "durable (ratio to notifyqueue)", "durable ratio"),
        (0.3, "undecorated", "undecorated", None),
    )
    for offset, side, label, ratio in b2_sides:
        heights = [results["B2"][n][side]["median"] * 1e3 for n in names]
        b2.bar([i + offset for i in range(len(names))], heights, width=0.2, label=label)
        for i, name in enumerate(names):
            if ratio is not None:
                b2.annotate(
                    f"{results['B2'][name][ratio]['median']:.2f}x",
                    (i + offset, heights[i]),
                    ha="center",
                    va="bottom",
                    fontsize="x-small",
                )
    b2.set_xticks(range(len(names)), names)
    b2.set_ylabel("ms per request")
    b2.set_title("B2 request overhead")
    b2.set_ylim(top=b2.get_ylim()[1] * 1.4)
    b2.legend(loc="upper left", fontsize="small")
    servers = [row["server"] for row in results["B3"]]
    for offset, side, label in (
        (-0.2, "notifyqueue", "notifyqueue (one connection)"),
        (0.2, "naive", "one connection per message"),
    ):
        b3.bar(
            [i + offset for i in range(len(servers))],
            [row[side]["median"] * 1e3 for row in results["B3"]],
            width=0.4,
            label=label,
        )
    for i, row in enumerate(results["B3"]):
        b3.annotate(
            f"{row['speed-up']['median']:.2f}x faster",
            (i, row["naive"]["median"] * 1e3),
            ha="center",
            va="bottom",
        )
    b3.set_xticks(range(len(servers)), servers)
    b3.set_ylabel(f"ms for {results['B3'][0]['emails']} emails")
    b3.set_title("B3 mail")
    b3.set_ylim(top=b3.get_ylim()[1] * 1.25)
    b3.legend(loc="upper left")
    row = results["B5"]
    configs = (
        ("background", "mail background", f"{row['background ratio']['median']:.2f}x"),
        ("no mail", "no mail", None),
        ("inline", "mail inline", f"{row['inline ratio']:.0f}x"),
    )
    for i, (key, _, ratio) in enumerate(configs):
        height = row[key]["median"] * 1e3
        b5.bar(i, height, width=0.6, color=f"C{i}")
        if ratio is not None:
            b5.annotate(ratio, (i, height), ha="center", va="bottom")
    b5.set_yscale("log")
    b5.set_xticks(range(len(configs)), [label for _, label, _ in configs])
    b5.set_ylabel("ms per request (log scale)")
    b5.set_title(f"B5 SMTP stalling {row['smtp data delay']:g} s")
    b5.set_ylim(1, b5.get_ylim()[1] * 2)
    names = list(results["B6"])
    first = results["B6"][names[0]]
    layouts = [key for key in first if key.endswith(" per commit")]
    width = 0.8 / len(layouts)
    for k, layout in enumerate(layouts):
        offset = (k - (len(layouts) - 1) / 2) * width
        b6.bar(
            [i + offset for i in range(len(names))],
            [results["B6"][n][layout]["intents per second"]["median"] for n in names],
            width=width,
            label=layout,
        )
    b6.axhline(1000, color="grey", linestyle="--", linewidth=1, label="1,000/s")
    b6.set_xticks(range(len(names)), names)
    b6.set_ylabel("intents per second")
    b6.set_title(f"B6 drainer, {first['rows']} rows, batch {first['batch']}")
    b6.legend(loc="upper left", fontsize="small")
    b6.set_ylim(top=b6.get_ylim()[1] * 1.3)
    if celery:
        b7_chart(results["B7"], axes[5])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def b7_chart(b7: dict[str, t.Any], axis: t.Any) -> None:
    """B7's request times by mail delivery mode, the worker's rate in the title."""
    request = b7["request"]
    sides = ("inline", "background", "celery")
    for i, side in enumerate(sides):
        spread = request[f"mail {side}"]
        height = spread["median"] * 1e3
        axis.bar(
            i,
            height,
            width=0.6,
            color=f"C{i}",
            yerr=[
                [height - spread["min"] * 1e3],
                [spread["max"] * 1e3 - height],
            ],
            capsize=3,
        )
    celery_height = request["mail celery"]["median"] * 1e3
    axis.annotate(
        f"{request['celery to inline ratio']['median']:.2f}x inline,"
        f" {request['celery to background ratio']['median']:.2f}x background",
        (2, celery_height),
        ha="center",
        va="bottom",
        fontsize="small",
        xytext=(0, 8),
        textcoords="offset points",
    )
    axis.set_xticks(range(len(sides)), [f"mail {side}" for side in sides])
    axis.set_ylabel("ms per request")
    rate = b7["worker"]["tasks per second"]["median"]
    axis.set_title(f"B7 Celery: publish to Redis; one worker {rate:.0f} tasks/s")
    axis.set_ylim(top=axis.get_ylim()[1] * 1.25)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="seconds, not minutes")
    parser.add_argument(
        "--out",
        type=Path,
        help="where to write the JSON and the chart; default benchmarks/results,"
        " or a new temporary directory with --quick (the README's figures are"
        " from a full run)",
    )
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = Path(tempfile.mkdtemp()) if args.quick else RESULTS
    started = time.perf_counter()
    results = run(args.quick)
    results["seconds"] = round(time.perf_counter() - started, 1)
    print(table(results))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "benchmarks.json").write_text(json.dumps(results, indent=2) + "\n")
    if chart(results, args.out / "benchmarks.png"):
        print(f"\nWrote {args.out}/benchmarks.json and benchmarks.png")
    else:
        print(
            f"\nWrote {args.out}/benchmarks.json (no chart: matplotlib not installed)"
        )
    print(f"Ran in {results['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
