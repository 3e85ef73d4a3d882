"""Print what one password hash costs with the app's scrypt settings.

    .venv/bin/python bench/password_hash.py [ROUNDS]

Reports the median and worst time of hash_password over ROUNDS (default 20)
runs, and the throughput of 2 threads (the app allows 2 hashes at a time).
"""

import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import app  # noqa: E402


def main(rounds):
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        app.hash_password("correct horse battery staple")
        times.append((time.perf_counter() - started) * 1000)
    print(
        f"scrypt n=2^{app.SCRYPT_N.bit_length() - 1} r={app.SCRYPT_R} p={app.SCRYPT_P}: "
        f"median {statistics.median(times):.0f} ms, max {max(times):.0f} ms over {rounds} hashes"
    )
    done = 0
    lock = threading.Lock()

    def worker():
        nonlocal done
        for _ in range(rounds // 2):
            app.hash_password("x")
            with lock:
                done += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(f"4 threads, 2 hash slots: {done / (time.perf_counter() - started):.1f} hashes/s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
