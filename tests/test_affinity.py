"""Cache-aware routing (router/affinity.py, Scheduler._place): a conversation's next turn goes to the worker
that served its last one while load allows, elsewhere when that worker is busy; through the fake mesh."""

from __future__ import annotations

from velesio.router.affinity import PrefixIndex
from velesio.testing.mesh import FakeMesh

W1, W2 = b"w1", b"w2"
SYSTEM = "You are the innkeeper of a small village tavern. Answer in one short sentence. " * 2


def chat(*turns: str) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": SYSTEM}]
    for i, text in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return messages


def turn_one(mesh: FakeMesh, text: str) -> tuple[bytes, list[dict[str, str]]]:
    """Run one conversation's first turn to its end; (the worker it ran on, its messages)."""
    messages = chat(text)
    rec = mesh.submit("chat", messages=messages)
    request = mesh.request_for(rec)
    where = mesh.where(request)
    mesh.final(where, request)
    return where, messages


def first_turns(mesh: FakeMesh, texts: list[str]) -> list[bytes]:
    """Several conversations' first turns arriving together; the workers they ran on."""
    recs = [mesh.submit("chat", messages=chat(text)) for text in texts]
    requests = [mesh.request_for(rec) for rec in recs]
    homes = [mesh.where(request) for request in requests]
    for home, request in zip(homes, requests, strict=True):
        mesh.final(home, request)
    return homes


def two_workers(slots: int = 2, **kw) -> FakeMesh:
    mesh = FakeMesh(**kw)
    mesh.join(W1, slots=slots)
    mesh.join(W2, slots=slots)
    return mesh


def test_the_next_turn_goes_where_the_last_one_ran():
    mesh = two_workers()
    names = ["Alice", "Bob", "Carol", "Dave"]
    homes = dict(zip(names, first_turns(mesh, [f"Hello, I am {name} and I would like a room for the night, please."
                                              for name in names]), strict=True))
    assert set(homes.values()) == {W1, W2}  # together they fill both workers
    for name, home in homes.items():
        rec = mesh.submit("chat", messages=chat(f"Hello, I am {name} and I would like a room for the night, please.",
                                                "Of course, traveller.", "How much is it?"))
        request = mesh.request_for(rec)
        assert mesh.where(request) == home, name
        mesh.final(home, request)


def test_a_busy_home_sends_the_turn_elsewhere():
    mesh = two_workers(slots=1)
    home, first = turn_one(mesh, "I am Alice and I would like a room for the night, please, with a view.")
    other = W2 if home == W1 else W1
    blocker = mesh.submit("chat", messages=chat("Someone else entirely, with a long and different question."))
    assert mesh.where(mesh.request_for(blocker)) in (W1, W2)
    if mesh.where(mesh.request_for(blocker)) != home:  # make sure the home is the busy one
        mesh.final(other, mesh.request_for(blocker))
        blocker = mesh.submit("chat", messages=chat("I am Alice and I would like a room for the night, please, "
                                                    "with a view.", "Yes.", "Breakfast?"))
        assert mesh.where(mesh.request_for(blocker)) == home
    rec = mesh.submit("chat", messages=first + [{"role": "assistant", "content": "Yes."},
                                                {"role": "user", "content": "And a bath?"}])
    assert mesh.where(mesh.request_for(rec)) == other  # no free slot at home: not held back for the cache


def test_a_free_worker_takes_a_later_job_it_has_cached_while_the_head_waits_for_its_own():
    mesh = two_workers(slots=1)
    names = ["Alice", "Bob"]
    homes = dict(zip(names, first_turns(mesh, [f"I am {name}; tell me about the roads to the north, the mountain "
                                              "pass." for name in names]), strict=True))
    assert homes["Alice"] != homes["Bob"]
    # Alice's home gets busy with a new conversation; the next turns of Alice and Bob queue up in that order.
    busy = mesh.submit("chat", messages=chat("A stranger asks something else entirely, at great length."))
    busy_req = mesh.request_for(busy)
    busy_at = mesh.where(busy_req)
    name_at_busy = "Alice" if homes["Alice"] == busy_at else "Bob"
    name_free = "Bob" if name_at_busy == "Alice" else "Alice"
    free_at = homes[name_free]
    blocker = mesh.submit("chat", messages=chat("Another stranger, also long enough to be matched by blocks."))
    blocker_req = mesh.request_for(blocker)
    assert mesh.where(blocker_req) == free_at  # both workers busy now
    later = {}
    for name in (name_at_busy, name_free):
        later[name] = mesh.submit("chat", messages=chat(
            f"I am {name}; tell me about the roads to the north, the mountain pass.", "It is snowy.", "Thanks."))
    assert mesh.scheduler.queue_depth() == 2
    mesh.final(free_at, blocker_req)  # the free worker takes the turn it has cached, though it is second
    assert mesh.where(mesh.request_for(later[name_free])) == free_at
    mesh.final(busy_at, busy_req)
    assert mesh.where(mesh.request_for(later[name_at_busy])) == busy_at


def test_least_loaded_routing_ignores_the_cache():
    mesh = two_workers(routing="least_loaded")
    assert mesh.scheduler.affinity is None
    where, first = turn_one(mesh, "I am Alice and I would like a room for the night, please, with a view.")
    recs = [mesh.submit("chat", messages=first + [{"role": "user", "content": f"turn {i}"}]) for i in range(2)]
    assert {mesh.where(mesh.request_for(r)) for r in recs} == {W1, W2}


def test_the_index_is_bounded_and_forgets_a_worker():
    index = PrefixIndex(max_blocks=50, block=8)
    for i in range(100):
        index.record("m", f"conversation {i:04d} " * 4, "w1")
    assert len(index) <= 50
    index.record("m", "shared prefix, then more text", "w2")
    assert index.match("m", "shared prefix, then more text and a new turn")["w2"] >= 24
    assert index.match("other-model", "shared prefix, then more text") == {}
    index.drop_worker("w2")
    assert "w2" not in index.match("m", "shared prefix, then more text")


def test_a_worker_that_leaves_is_forgotten():
    mesh = two_workers()
    home, first = turn_one(mesh, "I am Alice and I would like a room for the night, please, with a view.")
    mesh.leave(home)
    assert not mesh.scheduler.affinity.match("m", "".join(
        f"\x1e{m['role']}\x1f{m['content']}" for m in first))
