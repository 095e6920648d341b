"""What serving costs a real model: MiniLM embeddings in-process against the same model behind celery-serve.

    python benchmarks/model_throughput.py [--seconds 12] [--concurrency 64] [--num-cpus N] [--json out.json]

One run, bounded in time (about 1.5 minutes with the defaults):

1. The ceiling: the model called in this process (no serving) at batch 1 and at batch 32, with the thread
   count the served replica uses (`--num-cpus`, default the Embedder's `num_cpus`).
2. Served over HTTP, one sentence per request: `examples.embeddings` (the Embedder, `@batch` on its
   `__call__`) and an unbatched twin defined here (same code, no `@batch`: one model call per request),
   each at concurrency 1 and at `--concurrency`.
3. p50/p99 latency, requests/s (= sentences/s), the mean batch size the replicas report (the runtime's
   per-replica stats in Redis), served/raw ratios against the targets: batched serving >= 90% of raw
   batch-32 throughput, and p50 at concurrency 1 within 2 ms of the raw batch-1 p50.

Sentences are generated deterministically, 10-20 words each. Raw and served runs use the same ones: batch 1
and concurrency 1 cycle through the first 16; batch 32 cycles through the first `--concurrency` (at least
32), and at that concurrency every connection sends its own one, so batches mix lengths in both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._load import Result, build_request, run_load  # noqa: E402
from celery_serve import deployment  # noqa: E402
from examples.embeddings import MAX_BATCH_SIZE, NUM_CPUS, Embedder  # noqa: E402

RAW_B1_S = 4.0
RAW_B32_S = 8.0
WARMUP_S = 2.0
C1_SENTENCES = 16
TARGET_THROUGHPUT = 0.90
TARGET_ADDED_MS = 2.0


class _OneAtATime(Embedder.func_or_class):  # type: ignore[misc,name-defined]
    """The Embedder without `@batch` on `__call__`: the model runs once for every request."""

    def __call__(self, request: Any) -> Any:
        (result,) = super().__call__([request])
        if isinstance(result, Exception):
            raise result
        return result


UnbatchedEmbedder = deployment(name="UnbatchedEmbedder", num_cpus=NUM_CPUS)(_OneAtATime)


def sentences(n: int, seed: int = 7) -> list[str]:
    """`n` different sentences of 10 to 20 words, the same every run."""
    openers = "|Yesterday|Last week|To be honest|As usual|Surprisingly|Once again|On Monday morning".split("|")
    subjects = (
        "the delivery driver|our new neighbour|the hotel staff|my sister|the support team|this little cafe|"
        "the city council|the museum guide|the airline|a friend from work|the restaurant downstairs|"
        "the software update|the new manager|our landlord"
    ).split("|")
    verbs = "handled explained delivered cancelled recommended fixed described organised ignored reviewed".split()
    objects = (
        "the late order|the broken heating|our weekend trip|the quarterly report|a surprise birthday dinner|"
        "the noisy train journey|the new pricing plan|the lost luggage|the garden party|the morning meeting"
    ).split("|")
    tails = (
        "with surprising patience and care|far more slowly than anyone expected|"
        "before the rain started this afternoon|without saying a single word to anyone|"
        "while everyone waited outside in the cold|and then asked for our honest feedback|"
        "in a way that made the whole day better|although the instructions were rather confusing|"
        "just in time for the long holiday weekend|after three emails and two phone calls||quickly"
    ).split("|")
    rng = random.Random(seed)
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        opener = rng.choice(openers)
        parts = [rng.choice(subjects), rng.choice(verbs), rng.choice(objects), rng.choice(tails)]
        text = (f"{opener}, " if opener else "") + " ".join(" ".join(parts).split())
        text = text[0].upper() + text[1:] + "."
        if 10 <= len(text.split()) <= 20 and text not in seen:
            seen.add(text)
            out.append(text)
    return out


@dataclass
class Row:
    """One line of the table: a raw model measurement or a served scenario."""

    label: str
    concurrency: int | None
    ok: int
    errors: int
    p50_ms: float
    p99_ms: float
    per_s: float
    mean_batch: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "concurrency": self.concurrency,
            "ok": self.ok,
            "errors": self.errors,
            "p50_ms": round(self.p50_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
            "sentences_per_s": round(self.per_s, 1),
            "mean_batch": None if self.mean_batch is None else round(self.mean_batch, 2),
            **self.extra,
        }


def _pct(data: list[float], q: float) -> float:
    data = sorted(data)
    return data[min(len(data) - 1, int(q * len(data)))] * 1000


def measure_raw(encoder: Any, texts: list[str], batch_size: int, seconds: float) -> Row:
    """Call the model back to back for `seconds`; latencies are per call (per batch)."""
    chunks = [texts[i : i + batch_size] for i in range(0, len(texts) - batch_size + 1, batch_size)]
    for chunk in chunks[:3]:
        encoder.encode(chunk)  # warm up: first calls allocate
    latencies: list[float] = []
    started = time.perf_counter()
    i = 0
    while time.perf_counter() - started < seconds:
        t0 = time.perf_counter()
        encoder.encode(chunks[i % len(chunks)])
        latencies.append(time.perf_counter() - t0)
        i += 1
    elapsed = time.perf_counter() - started
    return Row(
        f"raw model, batch {batch_size} (in-process)",
        None,
        len(latencies) * batch_size,
        0,
        statistics.median(latencies) * 1000,
        _pct(latencies, 0.99),
        len(latencies) * batch_size / elapsed,
        float(batch_size),
    )


def _merge(label: str, concurrency: int, parts: list[Result], sequential: bool) -> Result:
    merged = Result(label, concurrency)
    for part in parts:
        merged.latencies_s += part.latencies_s
        merged.errors += part.errors
        for status, n in part.statuses.items():
            merged.statuses[status] = merged.statuses.get(status, 0) + n
    times = [p.elapsed_s for p in parts]
    merged.elapsed_s = sum(times) if sequential else max(times)
    return merged


async def load(label: str, port: int, path: str, texts: list[str], concurrency: int, seconds: float) -> Result:
    """`concurrency` keep-alive connections, each sending its own sentence, one per request.

    Concurrency 1 goes through `C1_SENTENCES` sentences one after another.
    """
    raws = [build_request("127.0.0.1", port, path, "POST", json.dumps(t).encode()) for t in texts]

    def one_connection(raw: bytes, max_seconds: float) -> Any:
        return run_load(label, "127.0.0.1", port, raw, concurrency=1, requests=10**9, max_seconds=max_seconds, warmup=0)

    if concurrency == 1:
        parts = [await one_connection(raw, seconds / C1_SENTENCES) for raw in raws[:C1_SENTENCES]]
        return _merge(label, 1, parts, sequential=True)
    runs = [one_connection(raws[i % len(raws)], seconds) for i in range(concurrency)]
    return _merge(label, concurrency, list(await asyncio.gather(*runs)), sequential=False)


class BatchStats:
    """The replicas' own counters (requests, batches), refreshed in Redis by each replica's heartbeat."""

    def __init__(self, redis_url: str, app_name: str, deployment_name: str) -> None:
        from celery_serve._wire import keys as _keys
        from celery_serve._wire.connections import sync_client

        self.redis = sync_client(redis_url)
        self.key = _keys.replica_stats(app_name, deployment_name)

    def snapshot(self, after: float, timeout_s: float = 6.0) -> tuple[int, int] | None:
        """(requests, batches) summed over replicas, from reports written after `after` (time.time())."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            entries = [json.loads(v) for v in self.redis.hgetall(self.key).values()]
            if entries and all(e.get("at", 0) >= after for e in entries):
                return sum(e["requests"] for e in entries), sum(e["batches"] for e in entries)
            time.sleep(0.1)
        return None


def mean_batch(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    if before is None or after is None or after[1] == before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def serve_scenarios(
    label: str, port: int, path: str, stats: BatchStats, texts: list[str], concurrency: int, seconds: float
) -> list[Row]:
    asyncio.run(load("warm-up", port, path, texts, concurrency, WARMUP_S))
    rows = []
    mark = stats.snapshot(time.time())
    for conc, secs in ((1, seconds / 2), (concurrency, seconds)):
        result = asyncio.run(load(label, port, path, texts, conc, secs))
        after = stats.snapshot(time.time())
        statuses = {str(k): v for k, v in sorted(result.statuses.items())}
        batch = mean_batch(mark, after)
        rows.append(
            Row(
                label,
                conc,
                result.ok,
                result.errors,
                result.p50_ms,
                result.p99_ms,
                result.rps,
                batch,
                statuses,
            )
        )
        mark = after
    return rows


def print_table(rows: list[Row]) -> None:
    head = ("scenario", "conc", "ok", "err", "p50 ms", "p99 ms", "sent/s", "batch")
    line = "{:<38} {:>4} {:>6} {:>4} {:>8} {:>8} {:>7} {:>5}"
    print(line.format(*head))
    for r in rows:
        conc = "-" if r.concurrency is None else str(r.concurrency)
        batch = "?" if r.mean_batch is None else f"{r.mean_batch:.1f}"
        print(line.format(r.label, conc, r.ok, r.errors, f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}", f"{r.per_s:.1f}", batch))


def main() -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--seconds", type=float, default=12.0, help="per scenario at --concurrency (half at 1)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--num-cpus", type=float, default=NUM_CPUS, help="replicas' num_cpus = torch threads")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: raw model and replicas on the GPU")
    parser.add_argument("--num-gpus", type=float, default=1.0, help="each served replica's GPU share (with cuda)")
    args = parser.parse_args()
    gpu = args.device != "cpu"

    texts = sentences(max(args.concurrency, MAX_BATCH_SIZE, C1_SENTENCES))

    from examples._model import MODEL_NAME, Encoder

    started = time.monotonic()
    load_before = os.getloadavg()[0]
    # The same thread count a replica of num_cpus=N gets (get_replica_context().num_threads).
    encoder = Encoder(max(1, int(args.num_cpus)), batch_size=MAX_BATCH_SIZE, device="cuda:0" if gpu else "cpu")
    threads = encoder.threads
    where = "GPU (cuda:0)" if gpu else "CPU"
    print(f"{MODEL_NAME} on {where}, {threads} torch thread(s), {len(texts)} sentences of 10-20 words", flush=True)
    rows = [
        measure_raw(encoder, texts[:C1_SENTENCES], 1, RAW_B1_S),
        measure_raw(encoder, texts, MAX_BATCH_SIZE, RAW_B32_S),
    ]
    raw1, raw32 = rows
    print(f"raw: batch 1 {raw1.per_s:.1f}/s, batch {MAX_BATCH_SIZE} {raw32.per_s:.1f}/s", flush=True)
    del encoder

    import celery_serve as serve
    from celery_serve._runtime import serve as _serve
    from celery_serve._runtime.launcher import free_port

    port = free_port()
    variants: list[tuple[str, str, str, Any]] = [
        ("batched", "Embedder", "served @batch (examples.embeddings)", Embedder),
        ("unbatched", "UnbatchedEmbedder", "served unbatched twin", UnbatchedEmbedder),
    ]
    try:
        for app_name, _, _, dep in variants:
            options: dict[str, Any] = {"num_cpus": args.num_cpus}
            if gpu:
                options["num_gpus"] = args.num_gpus  # a GPU queue, replicas pinned with CUDA_VISIBLE_DEVICES
            application = dep.options(**options).bind()
            serve.run(application, name=app_name, route_prefix=f"/{app_name}", port=port)
        print(f"served: both variants up after {time.monotonic() - started:.0f}s", flush=True)
        for app_name, dep_name, label, _ in variants:
            stats = BatchStats(_serve.redis_url(), app_name, dep_name)
            rows += serve_scenarios(label, port, f"/{app_name}", stats, texts, args.concurrency, args.seconds)
    finally:
        serve.shutdown()

    b1, bn, u1, un = rows[2:]
    throughput_ratio = bn.per_s / raw32.per_s
    added_ms = b1.p50_ms - raw1.p50_ms
    print()
    print_table(rows)
    print()
    met = "met" if throughput_ratio >= TARGET_THROUGHPUT else "NOT met"
    print(
        f"served @batch, concurrency {args.concurrency} / raw batch {MAX_BATCH_SIZE}: {throughput_ratio:.1%} "
        f"(target >= {TARGET_THROUGHPUT:.0%}: {met})"
    )
    print(
        f"served @batch p50 at concurrency 1 - raw batch-1 p50: {added_ms:+.2f} ms "
        f"(target <= {TARGET_ADDED_MS:.0f} ms: {'met' if added_ms <= TARGET_ADDED_MS else 'NOT met'})"
    )
    print(f"@batch / unbatched throughput at concurrency {args.concurrency}: {bn.per_s / un.per_s:.2f}x")
    print(f"unbatched served / raw batch 1: {un.per_s / raw1.per_s:.1%}")
    load_after = os.getloadavg()[0]
    print(
        f"total time {time.monotonic() - started:.0f}s; 1-minute load average {load_before:.1f} before, "
        f"{load_after:.1f} after, on {os.cpu_count()} CPUs (other work on the machine skews every figure)"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "model": MODEL_NAME,
                    "threads": threads,
                    "rows": [r.as_dict() for r in rows],
                    "served_batched_over_raw_batch": round(throughput_ratio, 4),
                    "added_p50_ms_concurrency_1": round(added_ms, 3),
                    "batched_over_unbatched": round(bn.per_s / un.per_s, 3),
                    "load_average_before_after": [load_before, load_after],
                },
                fh,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
