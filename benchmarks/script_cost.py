"""Where Redis CPU per request goes inside the hot-path scripts: message size against calls per script.

    python benchmarks/script_cost.py [--requests 3000] [--batch 8] [--rounds 3] [--no-aof] [--against REV]
                                     [--per-script] [--floor]

Runs the request path's three scripts (ENQUEUE, DRAIN, COMPLETE: what a sync request costs Redis besides
the reply listener's pop) straight against a private redis-server with AOF on, in batches as a loaded
gateway and replica send them, with messages of three sizes (the same envelope, its HTTP headers padded).
Then a script that makes N `redis.call`s, to price one call from Lua. Prints Redis CPU (INFO cpu) and
script time (INFO commandstats) per request; rounds alternate the sizes, so quote the medians.
With `--against REV` the scripts of git revision REV run too, alternating with these in every round, and
the ratios (these / REV's) are printed: before and after on the same Redis in the same run.
With `--per-script` it also splits the script time between ENQUEUE, DRAIN and COMPLETE (Redis's own count of
EVALSHA time, read after every call).
With `--floor` two stripped versions of the scripts run too, alternating, as bounds on what any rework of the
scripts could save while a Redis queue stays between gateway and replica: "no-records" keeps the queue, the
in-flight copy and the reply list but writes no job hash, no result key and no running mark (no GET /jobs, no
cancel, no first-answer-wins); "bare-queue" is only LPUSH, RPOP and the reply's LPUSH (at-most-once). Their Redis
CPU is printed as a fraction of these scripts'.
"""

from __future__ import annotations

import argparse
import re
import socket
import statistics
import subprocess
import tempfile
import time
import types
import uuid

import redis

from celery_serve._wire import envelope, scripts

QUEUE, INFLIGHT, CLAIM, REPLY = "serve.a.B", "serve:inflight:{serve.a.B}:r1", "serve:claim:{serve.a.B}:r1", "serve:r:g"
RECORD = '{"status":"SUCCESS","result":null,"traceback":null,"children":[],"task_id":"x"}'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_s(r: redis.Redis) -> float:
    info = r.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def message(task_id: str, pad: int) -> str:
    headers = [["host", "127.0.0.1:8000"], ["user-agent", "python-httpx/0.27"], ["accept", "*/*"]]
    if pad:
        headers.append(["x-pad", "p" * pad])
    http = {"method": "GET", "path": "/", "query": "", "headers": headers, "body": ""}
    return envelope.build_message(
        task_id=task_id,
        app="a",
        deployment="B",
        method="__call__",
        deadline=time.time() + 60,
        reply_to=REPLY,
        http=http,
    )


def scripts_at(rev: str) -> types.ModuleType:
    """`celery_serve._wire.scripts` as it was at git revision `rev`."""
    source = subprocess.run(
        ["git", "show", f"{rev}:app/_wire/scripts.py"], capture_output=True, text=True, check=True
    ).stdout
    module = types.ModuleType(f"scripts@{rev}")
    exec(compile(source, f"scripts.py@{rev}", "exec"), module.__dict__)  # noqa: S102 - our own file, from git
    return module


def request_path(
    r: redis.Redis,
    pad: int,
    requests: int,
    batch: int,
    source: types.ModuleType = scripts,
    split: dict[str, float] | None = None,
) -> tuple[float, float, int]:
    """Redis CPU and script time per request (µs), and the message's size. With `split`, each script's time per
    request goes into it too (Redis's EVALSHA time, read after every call: the CPU figure then includes those reads)."""
    enqueue, drain, complete = (r.register_script(s) for s in (source.ENQUEUE, source.DRAIN, source.COMPLETE))
    stride = int(re.search(r"for i = 3, #ARGV, (\d+) do", source.COMPLETE).group(1))  # type: ignore[union-attr]
    spent = dict.fromkeys(("ENQUEUE", "DRAIN", "COMPLETE"), 0)
    last = 0

    def measured(name: str) -> None:
        """Charge the EVALSHA time since the last reading to `name` ('' for none)."""
        nonlocal last
        if split is not None:
            now = evalsha_usec(r)
            if name:
                spent[name] += now - last
            last = now

    r.config_resetstat()
    cpu0 = cpu_s(r)
    for _ in range(0, requests, batch):
        ids = [str(uuid.uuid4()) for _ in range(batch)]
        keys: list[str] = []
        argv: list[str] = [str(batch)]
        for tid in ids:
            keys += [f"serve:job:{{celery-task-meta-{tid}}}", "unused", QUEUE]
            deadline = str(time.time() + 60)
            argv += ["1", "-1", tid, str(time.time()), "3600", "a", "B", "__call__", deadline, "0", REPLY, "sync"]
            argv.append(message(tid, pad))
        measured("")
        enqueue(keys=keys, args=argv)
        measured("ENQUEUE")
        taken = drain(keys=[QUEUE, CLAIM, INFLIGHT], args=[str(batch), "t", str(time.time())])
        measured("DRAIN")
        done: list[str] = [str(time.time()), "60"]
        for i in range(0, len(taken), 2):
            done += [taken[i].decode(), ids[i // 2], REPLY, RECORD, "succeeded", "3600", ""]
            done += [""] * (stride - 7)  # a later field (the stream tail, 8 since 2026-12-04): empty here
        complete(keys=[INFLIGHT, CLAIM], args=done)
        measured("COMPLETE")
        r.delete(REPLY)
    cpu = (cpu_s(r) - cpu0) / requests * 1e6
    script_us = evalsha_usec(r) / requests
    if split is not None:
        split.update({name: total / requests for name, total in spent.items()})
    return cpu, script_us, len(message(str(uuid.uuid4()), pad))


def floors() -> dict[str, types.ModuleType]:
    """The stripped scripts of `--floor`: same keys and arguments as the real ones, less work per request."""
    enqueue = (
        scripts._EACH
        + """
local pending, order, out = {}, {}, {}
local k, a = 1, 2
for j = 1, tonumber(ARGV[1]) do
  local q = tonumber(ARGV[a])
  local queue = KEYS[k + 2]
  if not pending[queue] then pending[queue] = {}; order[#order + 1] = queue end
  local messages = pending[queue]
  messages[#messages + 1] = ARGV[a + 12]
  out[j] = {0, ARGV[a + 2]}
  k, a = k + 2 + q, a + 12 + q
end
for _, queue in ipairs(order) do call_with_all('LPUSH', queue, pending[queue]) end
return out
"""
    )
    take = """
local out = {}
local ms = redis.call('RPOP', KEYS[1], tonumber(ARGV[1]))
if ms then for n, m in ipairs(ms) do out[#out + 1] = ARGV[2] .. n; out[#out + 1] = m end end
"""
    reply = """
local replies, order, tokens = {}, {}, {}
for i = 3, #ARGV, 8 do
  local list = ARGV[i + 2]
  if not replies[list] then replies[list] = {}; order[#order + 1] = list end
  local records = replies[list]
  records[#records + 1] = ARGV[i + 3]
  tokens[#tokens + 1] = ARGV[i]
end
for _, list in ipairs(order) do
  call_with_all('LPUSH', list, replies[list])
  redis.call('EXPIRE', list, tonumber(ARGV[2]))
end
"""
    no_records = types.ModuleType("no-records")
    no_records.ENQUEUE = enqueue  # type: ignore[attr-defined]
    no_records.DRAIN = scripts._EACH + take + "call_with_all('HSET', KEYS[3], out)\nreturn out\n"  # type: ignore[attr-defined]
    no_records.COMPLETE = scripts._EACH + reply + "call_with_all('HDEL', KEYS[1], tokens)\nreturn 1\n"  # type: ignore[attr-defined]
    bare = types.ModuleType("bare-queue")
    bare.ENQUEUE = enqueue  # type: ignore[attr-defined]
    bare.DRAIN = take + "return out\n"  # type: ignore[attr-defined]
    bare.COMPLETE = scripts._EACH + reply + "return 1\n"  # type: ignore[attr-defined]
    return {"no-records": no_records, "bare-queue": bare}


def evalsha_usec(r: redis.Redis) -> int:
    """Microseconds Redis has spent in EVALSHA since its statistics were reset."""
    return int(r.info("commandstats").get("cmdstat_evalsha", {}).get("usec", 0))


def call_price(r: redis.Redis, calls: int, size: int, n: int = 3000) -> tuple[float, float]:
    """Script time and Redis CPU (µs) of one script that makes `calls` HSETs of `size`-byte values."""
    body = "for i = 1, tonumber(ARGV[1]) do redis.call('HSET', KEYS[1], 'f' .. i, ARGV[2]) end return 1"
    sha = r.script_load(body)
    value = "x" * size
    r.config_resetstat()
    cpu0 = cpu_s(r)
    pipe = r.pipeline(transaction=False)
    for i in range(n):
        pipe.evalsha(sha, 1, "h", calls, value)
        if i % 50 == 49:
            pipe.execute()
    pipe.execute()
    usec = float(r.info("commandstats")["cmdstat_evalsha"]["usec_per_call"])
    return usec, (cpu_s(r) - cpu0) / n * 1e6


def per_script(r: redis.Redis, requests: int, batch: int) -> dict[str, float]:
    """Each hot-path script's time per request (µs): Redis's own count of EVALSHA time, read after every call."""
    split: dict[str, float] = {}
    request_path(r, 0, requests, batch, split=split)
    return split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=8, help="requests per script call")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-aof", action="store_true", help="run Redis without its append-only file")
    parser.add_argument("--against", metavar="REV", help="also run the scripts of this git revision (before/after)")
    parser.add_argument("--per-script", action="store_true", help="split the script time between the three scripts")
    parser.add_argument("--floor", action="store_true", help="also run stripped scripts: bounds on any rework")
    args = parser.parse_args()
    variants = {"this": scripts, **({args.against: scripts_at(args.against)} if args.against else {})}
    if args.floor:
        variants.update(floors())
    with tempfile.TemporaryDirectory() as folder:
        port = free_port()
        proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(port),
                "--save",
                "",
                "--appendonly",
                "no" if args.no_aof else "yes",
                "--dir",
                folder,
            ],
            stdout=subprocess.DEVNULL,
        )
        try:
            r = redis.Redis(port=port)
            for _ in range(100):
                try:
                    r.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.05)
            sizes: dict[tuple[str, int], list[tuple[float, float]]] = {}
            length: dict[int, int] = {}
            for _ in range(args.rounds):
                for pad in (0, 400, 1400):
                    for name, source in variants.items():
                        cpu, script_us, length[pad] = request_path(r, pad, args.requests, args.batch, source)
                        sizes.setdefault((name, pad), []).append((cpu, script_us))
            print(f"request path (ENQUEUE+DRAIN+COMPLETE, batches of {args.batch}), medians of {args.rounds}:")
            for (name, pad), runs in sizes.items():
                cpu = statistics.median(c for c, _ in runs)
                script_us = statistics.median(s for _, s in runs)
                print(
                    f"  {name:>10} message {length[pad]:5d} B: Redis CPU {cpu:6.1f} us/request, "
                    f"script time {script_us:5.1f} us"
                )
            if args.against:
                for pad in (0, 400, 1400):
                    ratios = [
                        a[0] / b[0] for a, b in zip(sizes[("this", pad)], sizes[(args.against, pad)], strict=True)
                    ]
                    shown = ", ".join(f"{x:.2f}" for x in ratios)
                    print(
                        f"  Redis CPU this / {args.against}, message {length[pad]} B: {statistics.median(ratios):.2f} ({shown})"
                    )
            for name in ("no-records", "bare-queue") if args.floor else ():
                for pad in (0, 400, 1400):
                    ratios = [a[0] / b[0] for a, b in zip(sizes[(name, pad)], sizes[("this", pad)], strict=True)]
                    shown = ", ".join(f"{x:.2f}" for x in ratios)
                    print(
                        f"  Redis CPU {name} / this, message {length[pad]} B: {statistics.median(ratios):.2f} ({shown})"
                    )
            if args.per_script:
                split = per_script(r, args.requests, args.batch)
                print(f"script time per request by script (batches of {args.batch}, message {length[0]} B):")
                print("  " + ", ".join(f"{name} {us:.1f} us" for name, us in split.items()))
            print("one script making N redis.call (HSET):")
            for calls in (0, 8, 32):
                for size in (10, 1000):
                    usec, cpu = call_price(r, calls, size)
                    print(f"  N={calls:2d}, {size:4d} B values: script time {usec:6.1f} us, Redis CPU {cpu:6.1f} us")
        finally:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
