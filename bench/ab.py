"""Compare the search's cost at two revisions: `app.run_search` of an earlier
commit's app.py against the working tree's, over the same distinct queries of
the bench mix, in one process, alternating, with the answers compared.

    BENCH_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres \\
        .venv/bin/python bench/ab.py --base 299ad73 --pages 100000

It searches the database an earlier `bench/run.py --reuse` run left
(whoknows_bench_N on BENCH_DATABASE_URL), with the queries it wrote
(bench/data/queries-N.txt). Each round runs both revisions once over the
queries, in alternating order, so that the machine's drift hits both alike,
and prints the CPU (user and system) and the wall time per query of each, and
whether every answer (the page ids shown and the total) was the same. The
base revision runs from its own tree (`git archive`), with its own SQL.
"""

import argparse
import importlib.util
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import prometheus_client

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from run import connect_like_the_app, database_url, distinct_queries, read_mix  # noqa: E402  (bench/run.py's)


def load_app(name, folder):
    """Import folder/app.py as a module called name (each revision registers
    its metrics anew, so the registry is emptied first)."""
    # The registry has no public way to forget every metric.
    for collector in list(prometheus_client.REGISTRY._collector_to_names):
        prometheus_client.REGISTRY.unregister(collector)
    spec = importlib.util.spec_from_file_location(name, folder / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def checkout(revision, folder):
    """Write the tree of revision into folder."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision], capture_output=True, check=False)
    if archive.returncode != 0:
        raise SystemExit(f"bench/ab.py: git archive {revision}: {archive.stderr.decode().strip()}")
    with tempfile.TemporaryFile() as file:
        file.write(archive.stdout)
        file.seek(0)
        with tarfile.open(fileobj=file) as tar:
            tar.extractall(folder, filter="data")


def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_all(module, conn, queries):
    """Return (CPU ms per query, wall ms per query, answers) of one pass."""
    answers = []
    cpu, wall = cpu_seconds(), time.perf_counter()
    for language, q in queries:
        result = module.run_search(conn, q, language, 1)
        answers.append(([row["id"] for row in result.rows], result.total))
    count = len(queries)
    return (cpu_seconds() - cpu) * 1000 / count, (time.perf_counter() - wall) * 1000 / count, answers


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the revision to compare the working tree with")
    parser.add_argument("--pages", type=int, default=100_000, help="the corpus of an earlier bench run")
    parser.add_argument("--queries", type=int, default=2000, help="distinct queries of the mix")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    server_url = os.environ.get("BENCH_DATABASE_URL")
    mix_file = ROOT / "bench" / "data" / f"queries-{args.pages}.txt"
    if not server_url or not mix_file.exists():
        raise SystemExit("bench/ab.py: needs BENCH_DATABASE_URL and an earlier `bench/run.py --pages N` run's data")
    queries = distinct_queries(read_mix(mix_file), args.queries)
    os.environ.setdefault("SECRET_KEY", "bench-ab-" + "0" * 32)  # nothing is signed; the module wants one
    with tempfile.TemporaryDirectory() as folder:
        checkout(args.base, Path(folder))
        revisions = {args.base: load_app("app_base", Path(folder)), "working tree": load_app("app_new", ROOT)}
        url = database_url(server_url, f"whoknows_bench_{args.pages}")
        with connect_like_the_app(url) as conn:
            for module in revisions.values():  # warm the caches and the prepared statements
                run_all(module, conn, queries)
            figures = {name: [] for name in revisions}
            for round_ in range(args.rounds):
                order = list(revisions.items())
                for name, module in order if round_ % 2 == 0 else reversed(order):
                    figures[name].append(run_all(module, conn, queries))
    base, new = figures.values()
    same = all(b[2] == n[2] for b, n in zip(base, new))
    print(f"{len(queries):,} distinct queries of the {args.pages:,}-page mix, {args.rounds} rounds")
    for name, runs in figures.items():
        cpu = [run[0] for run in runs]
        wall = [run[1] for run in runs]
        print(
            f"{name}: CPU ms/query median {statistics.median(cpu):.3f} ({', '.join(f'{x:.3f}' for x in cpu)}); "
            f"wall median {statistics.median(wall):.3f} ({', '.join(f'{x:.3f}' for x in wall)})"
        )
    print("the same answers:", "yes" if same else "NO")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
