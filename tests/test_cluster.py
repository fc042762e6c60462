"""The cluster's pure rules: the fair share, what a host claims or gives up, how a cluster
of hosts following them settles, and how ``status --cluster`` words it."""

from __future__ import annotations

import random

import pytest

from supervisor_mail import cluster, status


@pytest.mark.parametrize(("accounts", "hosts", "share"), [
    (40, 1, 40), (40, 2, 20), (40, 3, 14), (41, 2, 21), (1, 3, 1), (0, 2, 0), (40, 0, 40)])
def test_fair_share_is_the_ceiling_of_accounts_per_live_host(accounts, hosts, share):
    """ceil(accounts / hosts), a host counting itself, so the shares cover every account."""
    assert cluster.fair_share(accounts, hosts) == share
    assert share * max(1, hosts) >= accounts


@pytest.mark.parametrize(("held", "share", "moves"), [
    (20, 20, (0, 0)), (40, 20, (0, 20)), (12, 14, (2, 0)), (0, 14, (14, 0)), (14, 13, (0, 1))])
def test_a_host_claims_up_to_its_share_and_gives_up_only_what_is_above(held, share, moves):
    """Below the share: claim the difference; above: give up the excess; at it: nothing."""
    assert cluster.rebalance(held, share) == moves


class Model:
    """Hosts following take_part's rules on one table of leases: each round every live host,
    in a random order, counts the live hosts and what it holds (given-up leases do not
    count), then claims free leases or gives some up; a given-up lease, and every lease
    of a host gone, is free from the next round on (it lapses)."""

    def __init__(self, accounts: int, seed: int):
        self.holder: dict[int, str | None] = dict.fromkeys(range(accounts))
        self.releasing: set[int] = set()
        self.hosts: list[str] = []
        self.moves = 0
        self.rnd = random.Random(seed)

    def round(self) -> None:
        lapsing = set(self.releasing)
        for host in self.rnd.sample(self.hosts, len(self.hosts)):
            held = [a for a, h in self.holder.items() if h == host and a not in self.releasing]
            claim, give_up = cluster.rebalance(
                len(held), cluster.fair_share(len(self.holder), len(self.hosts)))
            free = [a for a, h in self.holder.items()
                    if h is None or h not in self.hosts or (a in lapsing and h != host)]
            for acntid in free[:claim]:
                self.holder[acntid] = host
                self.releasing.discard(acntid)
                self.moves += 1
            self.releasing.update(sorted(held, reverse=True)[:give_up])
        for acntid in lapsing & self.releasing:
            self.holder[acntid] = None  # not taken this round: free for anyone
            self.releasing.discard(acntid)

    def counts(self) -> list[int]:
        return sorted(sum(1 for a, h in self.holder.items() if h == host and
                          a not in self.releasing) for host in self.hosts)

    def settle(self, rounds: int = 10) -> int:
        """Rounds until a round moves nothing (every account held); fails if none does."""
        for n in range(1, rounds + 1):
            before = self.moves
            self.round()
            if self.moves == before and None not in self.holder.values() \
                    and not self.releasing:
                return n
        raise AssertionError(f"not settled after {rounds} rounds: {self.counts()}")


@pytest.mark.parametrize("seed", range(5))
def test_hosts_joining_one_by_one_settle_at_the_fair_share_and_stay_there(seed):
    """Hosts joining one by one settle at the fair shares within 3 rounds, then move nothing."""
    model = Model(40, seed)
    expected = {1: [40], 2: [20, 20], 3: [12, 14, 14], 4: [10, 10, 10, 10]}
    for n, host in enumerate("abcd", 1):
        model.hosts.append(host)
        assert model.settle() <= 3
        assert model.counts() == expected[n]
        moves = model.moves
        for _ in range(5):
            model.round()
        assert model.moves == moves, "a settled cluster moved leases"


@pytest.mark.parametrize("seed", range(5))
def test_the_accounts_of_a_host_gone_move_to_the_others_at_once(seed):
    """A host gone: the survivors take all its accounts at once and settle at 20 each."""
    model = Model(40, seed)
    model.hosts += ["a", "b", "c"]
    model.settle()
    model.hosts.remove("b")
    model.round()
    assert None not in model.holder.values()
    assert all(h in ("a", "c") for h in model.holder.values())
    model.settle()
    assert model.counts() == [20, 20]


def test_id_ranges_compacts_runs():
    """Account lists in status --cluster read as ranges."""
    assert status.id_ranges([1, 2, 3, 5, 7, 8]) == "1-3, 5, 7-8"
    assert status.id_ranges([4]) == "4"
    assert status.id_ranges([]) == "-"


def test_render_cluster_shows_hosts_leases_and_moves():
    """status --cluster's text: hosts with heartbeat, state, leases; unleased; moves."""
    now = 1_700_000_000.0
    data = {"version": 1, "host_id": "mail-a", "generated_at": now, "lease_ttl": 60,
            "hosts": [{"host_id": "mail-a", "hostname": "a.example.org", "pid": 4711,
                       "version": "0.1.0", "lease_ttl": 60, "started_at": now - 3600,
                       "heartbeat_age": 1.5, "live": True, "leases": 3, "releasing": 1,
                       "accounts": [1, 2, 3, 9], "synced_last_hour": 3},
                      {"host_id": "mail-b", "hostname": "b.example.org", "pid": 4800,
                       "version": "0.1.0", "lease_ttl": 60, "started_at": now - 7200,
                       "heartbeat_age": 192.0, "live": False, "leases": 0, "releasing": 0,
                       "accounts": [], "synced_last_hour": 0}],
            "unleased": [7], "database": {"error": None},
            "moves": [{"acntid": 9, "from": "mail-b", "to": "mail-a", "generation": 4,
                       "reason": "expired", "moved_at": now - 30}]}
    text = status.render_cluster(data)
    lines = text.splitlines()
    assert lines[0] == "supervisor_mail cluster, seen from mail-a (lease_ttl 60s)"
    row_a = next(line for line in lines if line.startswith("mail-a (this host)"))
    assert row_a.split()[3:] == ["a.example.org", "4711", "0.1.0", "1.5s", "live", "3", "1",
                                 "3", "1-3,", "9"]
    row_b = next(line for line in lines if line.startswith("mail-b "))
    assert row_b.split()[1:] == ["b.example.org", "4800", "0.1.0", "3m12s", "gone", "0", "0",
                                 "0", "-"]
    assert "1 accounts no live host holds: 7" in text
    move = next(line for line in lines if "expired" in line)
    assert move.split()[-5:] == ["9", "mail-b", "mail-a", "4", "expired"]
    assert "30s ago" in move
