"""The custody of a chunk (kdgen.worker.custody), engine-free: its legal moves and what each does to
the lease (renewed, deleted, or left as a released marker), the attempt count and the partial
progress; every illegal move raises."""

from __future__ import annotations

import json

import pytest

from kdgen import storage
from kdgen.fleet import partial
from kdgen.fleet.heartbeat import Heartbeat
from kdgen.fleet.leases import ClaimStore
from kdgen.worker import custody as cu
from kdgen.worker.custody import Custodian, IllegalTransition


@pytest.fixture()
def fleet(tmp_path):
    out = str(tmp_path / "out")
    claims = ClaimStore(out, "me:0", ttl_s=60.0)
    hb = Heartbeat(claims)
    saver = partial.Saver()
    yield out, claims, hb, Custodian(out, claims, hb, saver)
    hb.stop()
    saver.close()


def claim(claims, name):
    url = claims.url(name)
    return json.loads(storage.read_bytes(url)) if storage.exists(url) else None


def segment(out, name):
    storage.write_bytes(storage.join(partial.chunk_dir(out, name), "x-1-00000.jsonl"), b"{}\n")


def test_taken_feeding_complete_committed_deletes_lease_and_partials(fleet):
    out, claims, hb, keeper = fleet
    x = keeper.take("a", claims.try_take("a"))
    assert x.state == cu.TAKEN and hb.held() == ["a"] and keeper.busy("a") and not keeper.idle()
    x.start_feeding()
    assert x.state == cu.FEEDING and keeper.busy("a")
    x.complete()
    assert x.state == cu.COMPLETE and not keeper.busy("a") and keeper.idle()  # with the committer
    segment(out, "a")
    x.partials = True
    x.committed(created=True)
    assert x.state == cu.COMMITTED and hb.held() == [] and claim(claims, "a") is None
    assert storage.list_names(partial.chunk_dir(out, "a")) == []
    assert keeper.open == set()


@pytest.mark.parametrize("when", [cu.TAKEN, cu.FEEDING, cu.COMPLETE])
def test_hand_back_leaves_a_released_marker_without_a_failed_attempt(fleet, when):
    out, claims, hb, keeper = fleet
    lease = claims.try_take("a")
    lease.attempt = 3
    x = keeper.take("a", lease)
    segment(out, "a")
    x.partials = True
    if when != cu.TAKEN:
        x.start_feeding()
    if when == cu.COMPLETE:
        x.complete()
    x.hand_back()
    body = claim(claims, "a")
    assert x.state == cu.HANDED_BACK and hb.held() == [] and body["released"] and body["attempt"] == 2
    assert storage.list_names(partial.chunk_dir(out, "a"))  # kept for the next holder


@pytest.mark.parametrize("when", [cu.TAKEN, cu.FEEDING])
def test_drop_deletes_lease_and_partials_off_the_thread(fleet, when):
    out, claims, hb, keeper = fleet
    x = keeper.take("a", claims.try_take("a"))
    if when == cu.FEEDING:
        x.start_feeding()
    segment(out, "a")
    x.partials = True
    x.drop()
    assert x.state == cu.DROPPED and hb.held() == [] and claim(claims, "a") is None
    keeper.saver.pool.shutdown(wait=True)  # the cleanup runs on the saver
    assert storage.list_names(partial.chunk_dir(out, "a")) == []


def test_attempts_count_only_while_feeding_and_are_written_to_the_claim(fleet):
    out, claims, hb, keeper = fleet
    x = keeper.take("a", claims.try_take("a"))
    with pytest.raises(IllegalTransition):
        x.count_attempt()  # not in the engine yet
    x.start_feeding()
    assert x.count_attempt() == 2 and x.count_attempt() == 3
    assert claim(claims, "a")["attempt"] == 3 and hb.held() == ["a"]
    x.complete()
    with pytest.raises(IllegalTransition):
        x.count_attempt()


def test_a_winning_backup_copy_deletes_the_holders_claim(fleet):
    out, claims, hb, keeper = fleet
    holder = ClaimStore(out, "other:1", ttl_s=60.0)
    assert holder.try_take("a") is not None
    copy = keeper.take("a", None, backup=True)
    assert copy.attempt == 1 and not copy.lost and keeper.busy("a")
    copy.start_feeding()
    copy.complete()
    copy.committed(created=True)
    assert claim(claims, "a") is None  # how the holder learns to stop


def test_a_losing_backup_copy_leaves_the_holders_claim(fleet):
    out, claims, hb, keeper = fleet
    holder = ClaimStore(out, "other:1", ttl_s=60.0)
    assert holder.try_take("a") is not None
    copy = keeper.take("a", None, backup=True)
    copy.start_feeding()
    copy.complete()
    copy.committed(created=False)
    assert claim(claims, "a")["owner"] == "other:1"


ENDED = (cu.COMMITTED, cu.HANDED_BACK, cu.DROPPED)


def moved_to(keeper, claims, state):
    """A custody brought to `state` by legal moves."""
    x = keeper.take(state, claims.try_take(state))
    path = {cu.TAKEN: [], cu.FEEDING: ["start_feeding"], cu.COMPLETE: ["start_feeding", "complete"],
            cu.COMMITTED: ["start_feeding", "complete", "committed"], cu.HANDED_BACK: ["hand_back"],
            cu.DROPPED: ["drop"]}[state]
    for move in path:
        getattr(x, move)(*([True] if move == "committed" else []))
    assert x.state == state
    return x


MOVES = {"start_feeding": cu.FEEDING, "complete": cu.COMPLETE, "committed": cu.COMMITTED,
         "hand_back": cu.HANDED_BACK, "drop": cu.DROPPED}
ILLEGAL = [(state, move) for state in (cu.TAKEN, cu.FEEDING, cu.COMPLETE) + ENDED for move, to in MOVES.items()
           if to not in cu.MOVES.get(state, ())]


@pytest.mark.parametrize("state,move", ILLEGAL)
def test_every_illegal_move_raises_and_changes_nothing(fleet, state, move):
    out, claims, hb, keeper = fleet
    x = moved_to(keeper, claims, state)
    before = claim(claims, state)
    with pytest.raises(IllegalTransition):
        getattr(x, move)(*([True] if move == "committed" else []))
    assert x.state == state and claim(claims, state) == before


def test_the_table_of_moves():
    """Only these moves exist; an ended chunk never moves again."""
    assert cu.MOVES == {cu.TAKEN: {cu.FEEDING, cu.DROPPED, cu.HANDED_BACK},
                        cu.FEEDING: {cu.COMPLETE, cu.DROPPED, cu.HANDED_BACK},
                        cu.COMPLETE: {cu.COMMITTED, cu.HANDED_BACK}}
    assert len(ILLEGAL) == 3 * 5 + 2 + 2 + 3  # every move from an ended state, and the missing ones


def test_stopping_hands_back_what_is_queued_or_fed_but_not_what_is_committing(fleet):
    out, claims, hb, keeper = fleet
    queued = keeper.take("q", claims.try_take("q"))
    fed = keeper.take("f", claims.try_take("f"))
    fed.start_feeding()
    committing = keeper.take("c", claims.try_take("c"))
    committing.start_feeding()
    committing.complete()
    copy = keeper.take("b", None, backup=True)
    assert keeper.hand_back_all() == 2
    assert queued.state == fed.state == copy.state == cu.HANDED_BACK and committing.state == cu.COMPLETE
    assert claim(claims, "q")["released"] and claim(claims, "f")["released"] and not claim(claims, "c").get("released")
    assert hb.held() == ["c"]


def test_stored_elsewhere_reports_are_taken_once(fleet):
    keeper = fleet[3]
    keeper.report_stored("a")
    keeper.report_stored("b")
    assert keeper.stored_reports() == {"a", "b"} and keeper.stored_reports() == set()
