"""The draining consumer: how a replica takes requests from its deployment's queue and answers them.

A replica that becomes free takes what is waiting (up to what it can run soon) in one round trip, runs it,
and stores all the results with one script call that also acknowledges the messages. When the queue is
empty it blocks on the queue, so an idle replica costs nothing and a lone request starts at once.
Messages stay in the replica's in-flight hash until acknowledged; if the replica dies, its pool or the
deployment's reaper puts them back on the queue, counting a delivery (see `celery_serve._wire.delivery`).

Faults it survives without losing or repeating work needlessly:
- a connection fault of any kind (reset, timeout, Redis restart) never ends the replica: it resets its
  connections and goes on; results not yet stored are retried until they are;
- a take whose reply was lost (the script ran after the client gave up) is found by reconciling what Redis says
  the replica holds with what it knows it holds, and handed back;
- a message a replica died holding (a suspect) runs alone, one at a time, so a request that crashes its replica
  is isolated and its batch mates are not blamed; unreadable messages go to the dead-letter list at once;
- after SIGTERM nothing new starts: what was taken and not started is handed back.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from celery_serve._wire import keys as _keys
from celery_serve._wire import results as _results
from celery_serve._wire.connections import BLOCK_S, REDIS_FAULTS, command_timeout
from celery_serve._wire.envelope import SUSPECT_MARK, Envelope, build_message, parse_message
from celery_serve.exceptions import BadRequestError
from celery_serve.workers import streaming as _streaming
from celery_serve.workers.affinity import AffinityTaker
from celery_serve.workers.batching import ArrivalRate, Outcome, wait_budget
from celery_serve.workers.events import TaskEvents
from celery_serve.workers.graceful import drain
from celery_serve.workers.replica import Replica
from celery_serve.workers.replica_redis import Done, Liveness, QueueOps, ReplicaStats, Token, acknowledge_only

logger = logging.getLogger(__name__)
T = TypeVar("T")


_MAX_TAKE = 256
_TAKE_BUDGET_S = 0.005  # take as many requests as this replica can finish in about this long
RECONCILE_EVERY_S = 5.0
# A message Redis records as held by this replica that the replica never heard of, seen this long apart, is
# an orphan (a take whose reply was lost): longer than any take can be in flight (blocking pop + timeout).
ORPHAN_AFTER_S = BLOCK_S + 2 * command_timeout() + 5.0


class ReplicaServer:
    """Runs a replica: takes requests, runs them (sync inline, async concurrently), answers in batches."""

    def __init__(self, url: str, replica: Replica, replica_id: str | None = None) -> None:
        self.replica = replica
        self.config = replica.spec.config
        self.replica_id = replica_id or f"{replica.name}@{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.ops = QueueOps(url, replica.spec, self.replica_id)
        self.ops.batched = lambda: self.replica.max_batch_size > 1  # a batch fills from a drain, never pop by pop
        self.stats = ReplicaStats()
        self.heartbeat = Liveness(
            url,
            self.ops,
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started_at": time.time(),
                "deployed_at": replica.app.deployed_at,
            },
            self.stats,
            int(self.config.get("max_deliveries") or 3),
        )
        self.max_ongoing = int(self.config.get("max_ongoing_requests") or 100)
        self._ongoing: set[asyncio.Task[None]] = set()
        self._done: list[Done] = []
        self._running: dict[str, asyncio.Task[None]] = {}
        self._flushing: asyncio.Task[None] | None = None
        self._slot = asyncio.Event()
        self._stopping = asyncio.Event()
        self._handing_back = False
        self._service_s = 0.0
        self._arrivals = ArrivalRate()
        self._held: set[str] = set()  # tokens of messages taken and not yet acknowledged or handed back
        self._claimed: dict[bytes, int] = {}  # messages taken by the blocking pop (a claim list may hold twins)
        self._orphans: dict[str | bytes, float] = {}  # held in Redis, unknown here: first seen at (monotonic)
        self.events = TaskEvents.from_env(url)  # Celery task events for Flower, published in batches
        # a multiplexed deployment takes its models' queues first (see celery_serve.workers.affinity)
        self._affinity = AffinityTaker(self.ops, replica) if replica.is_multiplexed else None
        self._taker = self._affinity.take if self._affinity is not None else self.ops.take
        self.streams = _streaming.StreamRunner(self)

    async def run(self) -> None:
        await self.replica.start()
        self.heartbeat.register()
        self.heartbeat.start()
        self.events.start()
        logger.info("replica %s serving %s", self.replica_id, self.ops.queue)
        cancels = asyncio.create_task(self._listen_for_cancels())
        reconciler = asyncio.create_task(self._reconcile_forever())
        try:
            await self._loop()
        finally:
            cancels.cancel()
            reconciler.cancel()
            await self._drain_ongoing(graceful=True)
            await asyncio.to_thread(self.events.stop)
            handed_back = await asyncio.to_thread(self.heartbeat.unregister)
            if handed_back:
                logger.warning(
                    "replica %s handed %d unfinished requests back to %s", self.replica_id, handed_back, self.ops.queue
                )
            await self.replica.stop()
            if self._affinity is not None:
                self._affinity.close()
            await self.ops.close()

    def stop(self) -> None:
        self._stopping.set()
        self._slot.set()

    async def _loop(self) -> None:
        while not self._stopping.is_set():
            free = self.max_ongoing - len(self._ongoing)
            if free <= 0:
                self._slot.clear()
                await self._slot.wait()
                continue
            items = await self._take(min(free, self._take_limit()), block_s=1.0)
            self._arrivals.observe(len(items))
            if not items:
                continue
            if self._stopping.is_set():
                await self._hand_back([token for token, _ in items], "the replica is stopping")
                break
            suspects = [i for i, (_, raw) in enumerate(items) if SUSPECT_MARK in raw]
            if suspects:
                await self._run_suspect(items, suspects[0])
            else:
                await self._process(items)
            self._schedule_flush()
            await asyncio.sleep(0)  # let the results go out before the next take is sent
            await self.streams.heads_out()  # and the heads of the streams this take started

    async def _take(self, limit: int, block_s: float) -> list[tuple[Token, bytes]]:
        """Take work; on any connection fault, reset the connections, pause briefly and report nothing taken
        (a take that did reach Redis is found by the reconciler)."""
        try:
            items = await self._taker(limit, block_s=block_s)
        except REDIS_FAULTS as exc:
            logger.warning("replica %s could not take work from Redis (%r); retrying", self.replica_id, exc)
            await self.ops.reset_connections(exc, taking=True)
            await asyncio.sleep(0.5)
            return []
        for token, raw in items:
            self._hold(token, raw)
        return items

    def _hold(self, token: Token, raw: bytes) -> None:
        if isinstance(token, bytes):
            self._claimed[raw] = self._claimed.get(raw, 0) + 1
        else:
            self._held.add(token)

    def _release(self, token: Token) -> None:
        if isinstance(token, bytes):
            raw = token[1:]
            left = self._claimed.get(raw, 0) - 1
            if left > 0:
                self._claimed[raw] = left
            else:
                self._claimed.pop(raw, None)
        else:
            self._held.discard(token)

    async def _hand_back(self, tokens: list[Token], why: str) -> None:
        """Put taken, unstarted messages back on the queue (not counted as deliveries)."""
        if not tokens:
            return
        while True:
            try:
                await self.ops.hand_back(tokens)
                break
            except REDIS_FAULTS as exc:
                logger.warning("could not hand back %d requests (%r); retrying", len(tokens), exc)
                await self.ops.reset_connections(exc)
                await asyncio.sleep(0.5)
        for token in tokens:
            self._release(token)
        logger.info("replica %s handed back %d requests: %s", self.replica_id, len(tokens), why)

    async def _run_suspect(self, items: list[tuple[Token, bytes]], index: int) -> None:
        """Run a message a replica died holding, alone: nothing else runs meanwhile, so if it kills this
        replica too, only it is blamed (its delivery count grows toward max_deliveries); everything else taken
        with it goes back to the queue, to run as usual."""
        token, raw = items[index]
        others = [t for i, (t, _) in enumerate(items) if i != index]
        await self._hand_back(others, "a suspect runs alone")
        await self._drain_ongoing()
        logger.warning("replica %s runs a redelivered request alone (its replica died holding it)", self.replica_id)
        await self._process([(token, raw)])
        for task in list(self._ongoing):
            await asyncio.wait([task])
        self._schedule_flush()
        if self._flushing is not None:
            await self._flushing

    def _take_limit(self) -> int:
        batch = self.replica.max_batch_size
        if self._service_s <= 0:
            return max(batch, 32 if self._ongoing else 1)
        return max(batch, min(_MAX_TAKE, int(_TAKE_BUDGET_S / self._service_s)))

    def _observe(self, seconds: float) -> None:
        self._service_s = seconds if self._service_s == 0 else 0.8 * self._service_s + 0.2 * seconds

    async def _process(self, items: list[tuple[Token, bytes]]) -> None:
        """Start everything one take brought: batched methods as batches, the rest one by one."""
        groups: dict[str, list[tuple[Token, Envelope]]] = {}
        started = time.perf_counter()
        inline = 0
        for token, env in await self._admit(items):
            batch = self.replica.batch_config(env)
            if batch is not None:
                groups.setdefault(env.method, []).append((token, env))
            else:
                inline += await self._dispatch(token, env)
        if inline:
            self._observe((time.perf_counter() - started) / inline)
        for method, group in groups.items():
            await self._fill(method, group)
            await self._run_batch(group)

    async def _admit(self, items: list[tuple[Token, bytes]]) -> list[tuple[Token, Envelope]]:
        """Parse what was taken; answer unreadable and expired requests at once, and drop the steps of
        pipelines that already ended."""
        parsed = []
        now = time.time()
        for token, raw in items:
            try:
                env = parse_message(raw)
            except BadRequestError as exc:
                logger.error("dead-lettering an unreadable message from %s: %s", self.ops.queue, exc)
                self._bury_later(token, f"a replica of '{self.replica.name}' cannot read the message: {exc}")
                continue
            if not self._skip_if_expired(token, env, now):
                parsed.append((token, env))
        ended = await self._ended_elsewhere(parsed)
        admitted = []
        for token, env in parsed:
            if env.job_id in ended:
                logger.info("dropping %s %s: its pipeline %s already ended", env.task_name, env.task_id, env.job_id)
                self._done.append(acknowledge_only(token))
                continue
            if isinstance(token, bytes):  # straight from the blocking pop: DRAIN did not mark its job
                self.ops.mark_running(env.job_id)
            admitted.append((token, env))
            self.events.received(env)
        return admitted

    async def _ended_elsewhere(self, taken: list[tuple[Token, Envelope]]) -> set[str]:
        """The ended jobs among those taken steps name in another cluster slot. On one Redis the take itself
        drops a cancelled job's message (it reads the job in the same script); a step whose job is in another
        slot cannot, so its job is read here, one pipelined round trip per take that has such steps. A fault
        reading them runs the steps (the step's hand-on reads the job again)."""
        elsewhere = {env.job_id for _, env in taken if "serve_chain_job" in env.headers}
        if not elsewhere:
            return set()
        try:
            return await self.ops.ended_jobs(elsewhere)
        except REDIS_FAULTS as exc:
            logger.warning("could not read the status of %d pipelines (%r): running their steps", len(elsewhere), exc)
            return set()

    def _bury_later(self, token: Token, reason: str) -> None:
        task = asyncio.create_task(self._bury(token, reason))
        self._ongoing.add(task)
        task.add_done_callback(self._finished)

    async def _bury(self, token: Token, reason: str) -> None:
        while True:
            try:
                await self.ops.bury(token, reason)
                self._release(token)
                return
            except REDIS_FAULTS as exc:
                logger.warning("could not dead-letter a message (%r); retrying", exc)
                await self.ops.reset_connections(exc)
                await asyncio.sleep(0.5)

    def _skip_if_expired(self, token: Token, env: Envelope, now: float | None = None) -> bool:
        """Answer a request whose deadline passed before it started (it is not run); True if so.

        Checked when a request is taken and again just before it starts: requests taken together wait
        for the ones before them, and may pass their deadline meanwhile."""
        if env.deadline is None or (now or time.time()) <= env.deadline:
            return False
        logger.info("skipping %s %s: its deadline passed before it started", env.task_name, env.task_id)
        self._answer(token, env, _results.expired(env.job_id, self.replica.name))
        self.events.expired(env)
        return True

    async def _fill(self, method: str, group: list[tuple[Token, Envelope]]) -> None:
        """Wait briefly for more requests to join a batch, when the arrival rate says some are coming."""
        batch = self.replica.batch_config(group[0][1])
        if batch is None:
            return
        window = wait_budget(len(group), batch.max_batch_size, batch.batch_wait_timeout_s, self._arrivals)
        deadline = time.monotonic() + window
        while len(group) < batch.max_batch_size and (remaining := deadline - time.monotonic()) > 0:
            more = await self._take(batch.max_batch_size - len(group), block_s=remaining)
            if not more:
                break
            if self._stopping.is_set() or any(SUSPECT_MARK in raw for _, raw in more):
                await self._hand_back([t for t, _ in more], "not joining a batch")
                break
            for token, env in await self._admit(more):
                if env.method == method:
                    group.append((token, env))
                else:
                    await self._dispatch_or_batch_alone(token, env)

    async def _dispatch_or_batch_alone(self, token: Token, env: Envelope) -> None:
        if self.replica.batch_config(env) is not None:
            await self._run_batch([(token, env)])
        else:
            await self._dispatch(token, env)

    async def _run_batch(self, group: list[tuple[Token, Envelope]]) -> None:
        batch = self.replica.batch_config(group[0][1])
        size = batch.max_batch_size if batch else len(group)
        for start in range(0, len(group), size):
            self.stats.record_batch(len(group[start : start + size]))
        if self.replica.method(group[0][1].method).is_async:
            task = asyncio.create_task(self._run_batch_now(group))
            self._ongoing.add(task)
            task.add_done_callback(self._finished)
        else:
            await self._run_batch_now(group)

    async def _run_batch_now(self, group: list[tuple[Token, Envelope]]) -> None:
        if self._stopping.is_set():
            await self._hand_back([token for token, _ in group], "the replica is stopping")
            return
        now = time.time()
        group = [(token, env) for token, env in group if not self._skip_if_expired(token, env, now)]
        if not group:
            return
        outcomes = await self.replica.run_batch([env for _, env in group])
        for (token, env), outcome in zip(group, outcomes, strict=True):
            await self._finish(token, env, outcome)

    async def _dispatch(self, token: Token, env: Envelope) -> int:
        """Start one request; returns 1 when it ran inline (synchronously), 0 when it runs as a task."""
        if self._stopping.is_set():
            await self._hand_back([token], "the replica is stopping")
            return 0
        self.stats.record_batch(1)
        if self._skip_if_expired(token, env):
            return 0
        if self._is_async(env):
            task = asyncio.create_task(self._run_async(token, env))
            self._ongoing.add(task)
            self._running[env.job_id] = task
            task.add_done_callback(self._finished)
            return 0
        await self._finish(token, env, await self.replica.run(env))
        return 1

    def _is_async(self, env: Envelope) -> bool:
        """Does this request run as a task (async code, or sync code in the replica's threads)?"""
        return self.replica.runs_concurrently(env)

    async def _run_async(self, token: Token, env: Envelope) -> None:
        try:
            outcome = await self.replica.run(env)
        except asyncio.CancelledError:
            if self._handing_back:  # left unacknowledged: unregistering puts it back on the queue
                return
            logger.info("%s %s cancelled while running", env.task_name, env.task_id)
            self._answer(token, env, _results.cancelled(env.job_id))
            return
        finally:
            self._running.pop(env.job_id, None)
        await self._finish(token, env, outcome)

    async def _finish(self, token: Token, env: Envelope, outcome: Outcome) -> None:
        """Answer the caller, or, for a pipeline step that succeeded, hand the result to the next step."""
        outcome = _streaming.check(env, outcome, self.replica.name)
        if outcome.ok and _streaming.is_stream(outcome.value):  # answered when its stream ends
            self.streams.start(token, env, outcome.value)
            return
        self.events.finished(env, outcome)
        if outcome.ok and (env.chain or env.chord):
            try:
                await self._forward(token, env, outcome.value)
                return
            except Exception as exc:  # noqa: BLE001 - e.g. a result that is not JSON: the request fails
                outcome = Outcome(error=exc)
        self._answer(token, env, await self.replica.record(env, outcome))

    async def _forward(self, token: Token, env: Envelope, value: Any) -> None:
        fire_key = ""
        if env.chord:
            branch = env.chord
            results = await self._retrying(
                "record a parallel branch", lambda: self.ops.chord_add(branch, value, env.retention_s)
            )
            if results is None:  # other branches still running: the last one to finish goes on
                self._done.append(acknowledge_only(token))
                return
            value, fire_key = results, env.chord["key"]
        chain = env.chain
        if not chain:
            self._answer(token, env, await self.replica.record(env, Outcome(value=value)))
            return
        stage, rest = chain[-1], chain[:-1]
        steps = stage["tasks"] if stage.get("subtask_type") == "serve_parallel" else [stage]
        chord = (
            {"key": _keys.chord(env.job_id, stage["options"]["group_id"]), "size": len(steps)}
            if len(steps) > 1 or stage.get("subtask_type") == "serve_parallel"
            else None
        )
        messages = []
        for index, step in enumerate(steps):
            target = step["serve"]
            messages.append(
                (
                    step["options"]["queue"],
                    build_message(
                        task_id=step["options"]["task_id"],
                        app=target["app"],
                        deployment=target["deployment"],
                        method=target["method"],
                        queue=step["options"]["queue"],
                        args=[value],
                        deadline=env.deadline,
                        reply_to=env.reply_to,
                        retention_s=env.retention_s,
                        job_id=env.job_id,
                        chain=rest,
                        chord={**chord, "index": index} if chord else None,
                        http_reply=env.http_reply,
                        job_elsewhere=self.ops.cluster,
                    ),
                )
            )
        await self._retrying(
            "hand a result to the next step",
            lambda: self.ops.forward(token, messages, fire_key, env.task_id, env.job_id),
        )
        self._release(token)

    async def _retrying(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """Run an idempotent Redis call until it succeeds: a connection fault must not fail the request."""
        delay = 0.1
        while True:
            try:
                return await call()
            except REDIS_FAULTS as exc:
                logger.warning("could not %s (%r); retrying", what, exc)
                await self.ops.reset_connections(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _reconcile_forever(self) -> None:
        while True:
            await asyncio.sleep(RECONCILE_EVERY_S)
            try:
                await self.reconcile()
            except Exception as exc:  # noqa: BLE001 - it must keep running: it is what recovers lost takes
                logger.warning("could not reconcile held messages: %r", exc)

    async def reconcile(self, now: float | None = None) -> int:
        """Hand back messages Redis says this replica holds that it never heard of (a take whose reply was
        lost after the script ran): seen twice, ORPHAN_AFTER_S apart. Returns how many were handed back."""
        tokens, claimed = await self.ops.held()
        now = time.monotonic() if now is None else now
        unknown: set[str | bytes] = {t for t in tokens if t not in self._held}
        counts: dict[bytes, int] = {}
        for raw in claimed:
            counts[raw] = counts.get(raw, 0) + 1
            if counts[raw] > self._claimed.get(raw, 0):
                unknown.add(b"@" + raw)
        self._orphans = {k: self._orphans.get(k, now) for k in unknown}
        due = [k for k, first in self._orphans.items() if now - first >= ORPHAN_AFTER_S]
        if not due:
            return 0
        n = await self.ops.hand_back(due)
        for k in due:
            self._orphans.pop(k, None)
        if n:
            logger.warning("replica %s handed back %d requests whose take reply was lost", self.replica_id, n)
        return n

    async def _listen_for_cancels(self) -> None:
        """Cancel running async requests whose job was cancelled (sync work cannot be interrupted).

        Survives Redis going away for any time: it subscribes again until that works (a pub/sub object
        whose subscribe failed must not be read: redis-py raises RuntimeError, which used to end this
        task for good, and with it every later cancel on this replica). A cancel published while it was
        not subscribed is not heard, so after subscribing again it reads its running jobs' states."""
        channel = _keys.cancel_channel(self.replica.app.name, self.replica.name)
        pubsub: Any = None
        lost = False
        try:
            while True:
                try:
                    if pubsub is None:
                        pubsub = self.ops.redis.pubsub(ignore_subscribe_messages=True)
                        await pubsub.subscribe(channel)
                        if lost:
                            lost = False
                            logger.info("cancel listener subscribed again")
                            await self._cancel_missed()
                    message = await pubsub.get_message(timeout=BLOCK_S)
                except REDIS_FAULTS as exc:
                    if not lost:
                        logger.warning("cancel listener lost Redis (%r); subscribing again", exc)
                    lost = True
                    await _close_pubsub(pubsub)
                    pubsub = None
                    await asyncio.sleep(0.5)
                    continue
                if message is None:
                    continue
                task = self._running.get(message["data"].decode())
                if task is not None:
                    task.cancel()
        finally:
            await _close_pubsub(pubsub)

    async def _cancel_missed(self) -> None:
        """Cancel the running requests whose job reads cancelled (their cancel came while unsubscribed)."""
        running = list(self._running.items())
        if not running:
            return
        pipe = self.ops.redis.pipeline(transaction=False)
        for job_id, _ in running:
            pipe.hget(_keys.job(job_id), "status")
        for (job_id, task), status in zip(running, await pipe.execute(), strict=True):
            if status == b"cancelled" and not task.done():
                logger.info("job %s was cancelled while the cancel listener was away; stopping it", job_id)
                task.cancel()

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._ongoing.discard(task)
        self._slot.set()
        self._schedule_flush()

    def _answer(self, token: Token, env: Envelope, record: str, stream_tail: str = "") -> None:
        """Queue the result for the next COMPLETE call (with a streamed response's last entry: its tail)."""
        started = self.ops.marks.answered(env.job_id)
        reply = env.reply_to if env.reply_to and env.reply_to.startswith(_keys.REPLY_PREFIX) else ""
        status = _results.job_status(record)
        if status != "succeeded":
            self.stats.errors += 1
        self._done.append(Done(token, env.job_id, reply, record, status, env.retention_s, started, stream_tail))

    def _schedule_flush(self) -> None:
        if self._done and (self._flushing is None or self._flushing.done()):
            self._flushing = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        while self._done:
            batch, self._done = self._done, []
            delay = 0.1
            while True:
                try:
                    await self.ops.complete(batch)
                    break
                except REDIS_FAULTS as exc:  # retried until stored: an answered request must not be lost
                    logger.warning("could not store %d results (%r); retrying", len(batch), exc)
                    await self.ops.reset_connections(exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
            for item in batch:
                self._release(item.token)

    async def _drain_ongoing(self, graceful: bool = False) -> None:
        """Wait for what runs; stopping (`graceful`), within the graceful-shutdown options (see `drain`)."""
        if graceful:
            await drain(self._ongoing, self.config, self.replica_id, before_cancel=self._hand_back_on_cancel)
        elif self._ongoing:
            await asyncio.wait(self._ongoing, timeout=float(self.config.get("request_timeout_s", 60)))
        self._schedule_flush()
        if self._flushing is not None:
            await self._flushing

    def _hand_back_on_cancel(self) -> None:
        """Past the graceful-shutdown timeout: what is cancelled now is handed back, not answered."""
        self._handing_back = True


async def _close_pubsub(pubsub: Any) -> None:
    if pubsub is None:
        return
    try:
        await pubsub.aclose()
    except REDIS_FAULTS:
        pass
