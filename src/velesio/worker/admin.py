"""Models at run time: LOAD, UNLOAD and UPDATE from a router (the operator API, router/admin_routes.py), and
``keep_alive``: a model idle that long has its backend process stopped and is loaded again by its next job.

Every change ends with the routers told at once: a change of the models a worker serves (a model loaded,
unloaded, or given other slots) by a new READY to each router, which replaces that worker's models; a
change of state (a model loading, draining, asleep) by a HEARTBEAT. See docs/protocol.md "Models at run
time". One change per model at a time (``LoadedModel.lock``; a second LOAD, UNLOAD or UPDATE of a model
already changing is answered ``conflict``)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from velesio.mesh import messages
from velesio.mesh.protocol import Command

from . import memory
from .models import LoadedModel, keep_alive_of, model_config, model_limits, size_of, start_process, unavailable
from .supervisor import BackendProcess

if TYPE_CHECKING:
    from .runtime import RouterLink, Worker

log = logging.getLogger("velesio.worker")


class AdminError(Exception):
    """A LOAD, UNLOAD or UPDATE that cannot be done: answered with REPLY ``code`` (protocol.REPLY_CODES)."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.code, self.details = code, details


class ModelAdmin:
    def __init__(self, worker: Worker):
        self.worker = worker
        self.changing: set[str] = set()  # models with a LOAD, UNLOAD or UPDATE in progress
        self.starting: set[BackendProcess] = set()  # processes a wake or a slot change is starting
        self._tasks: set[asyncio.Task] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # ---- the commands ------------------------------------------------------------------------------
    def handle(self, link: RouterLink, command: Command, body: dict[str, Any]) -> None:
        request_id = body.get("id")
        if not isinstance(request_id, str):
            log.warning("%s from router %s without an id: ignored", command.name, link.address)
            return
        handler = {Command.LOAD: self.load, Command.UNLOAD: self.unload, Command.UPDATE: self.update}[command]
        self.spawn(self._answer(link, command, request_id, handler(body)))

    async def _answer(self, link: RouterLink, command: Command, request_id: str,
                      work: Coroutine[Any, Any, dict[str, Any]]) -> None:
        try:
            done = await work
            body = messages.reply(request_id, **done)
        except AdminError as exc:
            log.warning("%s refused: %s", command.name, exc)
            body = messages.reply(request_id, code=exc.code, message=str(exc), details=exc.details)
        except Exception as exc:  # a bug here must not end the worker; the operator hears of it
            log.exception("%s failed", command.name)
            body = messages.reply(request_id, code="internal_error", message=f"{type(exc).__name__}: {exc}")
        link.send(Command.REPLY, body)

    def _claim(self, name: str) -> None:
        if name in self.changing:
            raise AdminError("conflict", f"model {name} is being changed on worker {self.worker.name}; "
                                         "try again when that is done")
        self.changing.add(name)

    async def load(self, body: dict[str, Any]) -> dict[str, Any]:
        w = self.worker
        entry = body.get("model")
        try:
            cfg = model_config(entry, "model", w.backend_classes)
            assert isinstance(entry, dict)  # model_config said so
            limits = model_limits(entry, "model", w.cancel_grace_s)
            keep = keep_alive_of(entry.get("keep_alive"), "model")
            size = size_of(entry, cfg, "model")
        except ValueError as exc:
            raise AdminError("invalid_request", str(exc)) from None
        name = cfg.name
        self._claim(name)
        try:
            existing = w.models.get(name)
            if existing is not None and existing.phase == "sleeping":
                failed = await self.wake(existing)  # loading a model asleep wakes it, with its own settings
                if failed is not None:
                    raise AdminError(*failed)
                return {"model": existing.advert()}
            if existing is not None or name in w.loading:
                raise AdminError("conflict", f"worker {w.name} already serves a model named {name}; unload it "
                                             "first, or change its slots")
            why = unavailable(cfg, w.backend_classes)
            cls = w.backend_classes.get(cfg.backend)
            if why is not None or cls is None:
                raise AdminError("invalid_request", f"worker {w.name} cannot load model {name}: {why}")
            if cfg.path and not os.path.exists(cfg.path):
                raise AdminError("invalid_request", f"{cfg.path} does not exist on worker {w.name} (a model's path "
                                                    "is read by the worker, on its host)")
            why = await self.make_room(name, size)
            if why is not None:
                raise AdminError("insufficient_memory", f"worker {w.name} cannot load model {name}: {why}",
                                 self.memory_details(size))
            process = BackendProcess(cfg, cls, w, limits, log_level=w.log_level, log_json=w.log_json,
                                     threads=w.threads)
            model = LoadedModel(cfg, process, cls.kind, backend_cls=cls, limits=limits, keep_alive_s=keep,
                                size_mb=size, phase="loading")
            w.loading[name] = model
            w.beat()  # routers show it loading
            try:
                reason = await start_process(process)
            finally:
                w.loading.pop(name, None)
            if reason is not None:
                w.beat()
                raise AdminError("load_failed", f"model {name} failed to load on worker {w.name}: {reason}")
            model.phase = "serving"
            model.last_used = time.monotonic()
            w.models[name] = model
            w.unloaded.pop(name, None)
            w.failures = [f for f in w.failures if f.get("model") != name]
            w.announce()
            log.info("model %s loaded at run time (%d slot(s))", name, cfg.slots)
            return {"model": model.advert()}
        finally:
            self.changing.discard(name)

    async def unload(self, body: dict[str, Any]) -> dict[str, Any]:
        w = self.worker
        name, move = str(body.get("model")), bool(body.get("move"))
        model = w.models.get(name)
        if model is None:
            if name in w.loading:
                raise AdminError("conflict", f"model {name} is still loading on worker {w.name}")
            raise AdminError("model_not_found", f"worker {w.name} serves no model named {name}")
        self._claim(name)
        try:
            async with model.lock:  # after a wake or a slot change in progress
                model.phase = "draining"
                w.beat()  # no new job: the routers hear it before any job they may have to move
                moved = 0
                for rj, _wire in list(model.pending):  # waiting for a wake that will not come: moved in any case
                    w.hand_back(rj, f"model {name} was unloaded from worker {w.name}")
                    moved += 1
                if move:
                    for rj in [rj for rj in w.running.values() if rj.model == name]:
                        w.hand_back(rj, f"model {name} was unloaded from worker {w.name}")
                        moved += 1
                jobs = sum(1 for rj in w.running.values() if rj.model == name)
                if jobs:
                    log.info("unloading model %s: waiting for its %d job(s) to finish", name, jobs)
                while any(rj.model == name for rj in w.running.values()):
                    await asyncio.sleep(0.05)
                del w.models[name]
                w.unloaded[name] = time.monotonic()
                w.announce()
                await asyncio.gather(model.process.stop(), *(p.stop() for p in model.retired))
                model.retired.clear()
            log.info("model %s unloaded%s", name, f" ({moved} job(s) moved)" if moved else "")
            return {"moved": moved}
        finally:
            self.changing.discard(name)

    async def update(self, body: dict[str, Any]) -> dict[str, Any]:
        w = self.worker
        name = str(body.get("model"))
        model = w.models.get(name)
        if model is None:
            raise AdminError("model_not_found", f"worker {w.name} serves no model named {name}")
        slots = body.get("slots")
        if slots is not None and (isinstance(slots, bool) or not isinstance(slots, int) or slots < 1):
            raise AdminError("invalid_request", f"slots: a whole number >= 1, not {slots!r}")
        try:
            keep = keep_alive_of(body.get("keep_alive"), "model") if "keep_alive" in body else model.keep_alive_s
        except ValueError as exc:
            raise AdminError("invalid_request", str(exc)) from None
        self._claim(name)
        try:
            async with model.lock:
                model.keep_alive_s = keep
                if slots is not None and slots != model.config.slots:
                    await self._resize(model, slots)
                    w.announce()
                else:
                    w.beat()
            return {"model": model.advert()}
        finally:
            self.changing.discard(name)

    async def _resize(self, model: LoadedModel, slots: int) -> None:
        """Fewer slots, or a model asleep: the new number applies at once (a backend process keeps what it
        made for more). More slots on a running model: a backend may size itself by its slots (llama.cpp makes
        a context per slot), so a new process is started with them beside the one serving, which goes on
        serving meanwhile and finishes its jobs after the switch."""
        w, name = self.worker, model.config.name
        config = dataclasses.replace(model.config, slots=slots)
        if slots < model.config.slots or model.phase == "sleeping":
            log.info("model %s: %d -> %d slot(s)", name, model.config.slots, slots)
            model.config = config
            return
        why = await self.make_room(name, model.size_mb, exclude=None)
        if why is not None:
            raise AdminError("insufficient_memory",
                             f"more slots start a second backend process of model {name} on worker {w.name} "
                             f"beside the one serving, and {why}", self.memory_details(model.size_mb))
        assert model.backend_cls is not None
        process = BackendProcess(config, model.backend_cls, w, model.limits, log_level=w.log_level,
                                 log_json=w.log_json, threads=w.threads)
        reason = await self._start(process)
        if reason is not None:
            raise AdminError("load_failed", f"model {name} failed to load with {slots} slots on worker {w.name}: "
                                            f"{reason}")
        old, model.process, model.config = model.process, process, config
        log.info("model %s: %d -> %d slot(s); backend process %s replaces %s", name, old.config.slots, slots,
                 process.pid, old.pid)
        if old.jobs:
            old.retiring = True
            model.retired.append(old)  # stopped by the watchdog once its jobs are over
        else:
            await old.stop()
        for rj, wire in model.pending:  # none unless it slept; they belong to the new process
            process.run(rj, wire, w.partial_window_s)
        model.pending.clear()

    async def _start(self, process: BackendProcess) -> str | None:
        self.starting.add(process)  # the worker stops it too if it stops meanwhile
        try:
            return await start_process(process)
        finally:
            self.starting.discard(process)

    # ---- memory ----------------------------------------------------------------------------------
    def committed_mb(self, exclude: LoadedModel | None = None) -> int:
        """What the worker's models take by their estimates: those with a process, or loading one."""
        w = self.worker
        return sum(m.size_mb or 0 for m in (*w.models.values(), *w.loading.values())
                   if m is not exclude and m.phase != "sleeping")

    def memory_details(self, need: int | None) -> dict[str, Any]:
        w = self.worker
        return {"need_mb": need, "free_mb": memory.free_mb(w.device), "budget_mb": w.memory_budget_mb,
                "committed_mb": self.committed_mb()}

    async def make_room(self, name: str, need: int | None, exclude: LoadedModel | None = None) -> str | None:
        """Why ``need`` MB do not fit (None: they do), after stopping models idle with a ``keep_alive`` (the
        least recently used first) that are in the way."""
        while True:
            why = memory.refusal(name, need, free=memory.free_mb(self.worker.device),
                                 budget_mb=self.worker.memory_budget_mb, committed_mb=self.committed_mb(exclude))
            if why is None:
                return None
            idle = [m for m in self.worker.models.values() if m is not exclude and self.may_sleep(m)]
            if not idle:
                return why
            victim = min(idle, key=lambda m: m.last_used)
            if not await self.sleep(victim, f"to make room for model {name}"):
                return why

    # ---- keep_alive ------------------------------------------------------------------------------
    def may_sleep(self, model: LoadedModel) -> bool:
        """An idle model with a ``keep_alive``, whose process is ready and which nothing else is changing."""
        return (model.keep_alive_s is not None and model.phase == "serving" and not model.busy
                and not model.pending and not model.retired and model.process.state == "ready"
                and not model.lock.locked() and model.config.name not in self.changing)

    def idle_check(self, now: float) -> None:
        """The watchdog's look at ``keep_alive``: stop the process of each model idle past it."""
        for model in list(self.worker.models.values()):
            if (model.keep_alive_s is not None and now - model.last_used >= model.keep_alive_s
                    and self.may_sleep(model)):
                self.spawn(self.sleep(model, f"idle for {now - model.last_used:.0f}s "
                                             f"(keep_alive {model.keep_alive_s:g}s)"))

    async def sleep(self, model: LoadedModel, why: str) -> bool:
        """Stop an idle model's process to free its memory; it stays advertised and its next job wakes it."""
        if not self.may_sleep(model):
            return False
        async with model.lock:
            model.phase = "sleeping"
            self.worker.beat()
            await model.process.stop()
        log.info("model %s asleep, backend process stopped (%s); its next job loads it again", model.config.name,
                 why)
        return True

    async def wake(self, model: LoadedModel) -> tuple[str, str] | None:
        """Load a sleeping model again and run the jobs waiting for it; None when done, else (code, why not):
        then the waiting jobs end with that error and the model sleeps on, so that a later job tries again."""
        w, name = self.worker, model.config.name
        async with model.lock:
            if model.phase != "sleeping":
                return None  # awake already (another job woke it), or being unloaded
            model.phase = "waking"
            w.beat()
            code = "insufficient_memory"
            why = await self.make_room(name, model.size_mb, exclude=model)
            if why is None:
                assert model.backend_cls is not None
                process = BackendProcess(model.config, model.backend_cls, w, model.limits, log_level=w.log_level,
                                         log_json=w.log_json, threads=w.threads)
                reason = await self._start(process)
                if reason is None:
                    model.process, model.phase = process, "serving"
                    model.last_used = time.monotonic()
                    pending, model.pending = model.pending, []
                    for rj, wire in pending:
                        if (rj.job_id, rj.attempt) in w.running:
                            process.run(rj, wire, w.partial_window_s)
                    w.beat()
                    log.info("model %s awake again (%d job(s) were waiting)", name, len(pending))
                    return None
                code, why = "internal_error", f"model {name} could not be loaded again: {reason}"
            else:
                why = f"worker {w.name} cannot load model {name} again: {why}"
            model.phase = "sleeping"
            for rj, _wire in list(model.pending):
                w.end_waiting(rj, code, why)
            w.beat()
            log.error("%s", why)
            return code, why

    def wake_soon(self, model: LoadedModel) -> None:
        self.spawn(self.wake(model))
