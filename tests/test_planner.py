"""The planner's decision, ``due_tasks``, driven by a fake clock: every interval of the
settings table, logged in or not, the backoffs, priorities, discovery, and the daily lo
start across midnight and DST."""

from datetime import datetime, time, timezone
from zoneinfo import ZoneInfo

import pytest

from supervisor_mail import config
from supervisor_mail.planner import (
    DISCOVER,
    ERROR_RETRY,
    HI_FULL,
    HI_RECENT,
    LO_FULL,
    AccountState,
    FolderState,
    daily_start,
    due_tasks,
    last_daily_start,
)
from supervisor_mail.states import TaskKind

UTC = timezone.utc
WARSAW = ZoneInfo("Europe/Warsaw")
NEW_YORK = ZoneInfo("America/New_York")
CFG = config.Config({s.name: s.default for s in config.SETTINGS})
NOW = datetime(2024, 6, 12, 12, 0, tzinfo=UTC).timestamp()  # 12:00 UTC, lo start 20:00
FRESH = NOW - 60  # synced a minute ago


def account(acntid=1, auth_error=None, active=None, listed=FRESH, error=None):
    return AccountState(acntid, auth_error, active, listed, error)


def folder(emfdid=10, priority="hi", user_priority=None, recent=FRESH, full=FRESH, error=None,
           gone=None, acntid=1, name="INBOX"):
    return FolderState(acntid, emfdid, name, priority, user_priority, recent, full, error, gone)


def plan(*folders, accounts=None, now=NOW, cfg=CFG, tz=UTC):
    """due_tasks at ``now``; by default for one account whose folders were just listed."""
    return due_tasks(accounts or [account(listed=now - 60)], folders, cfg, now, tz)


def kinds(tasks):
    return {t.emfdid: t.kind for t in tasks}


def local(tz, *args):
    """Epoch seconds of a local wall time (first occurrence when repeated)."""
    return datetime(*args, tzinfo=tz).timestamp()


# --- hi folders ------------------------------------------------------------------------------

def test_hi_recent_sync_every_hi_recent_interval_when_logged_in():
    """Owner logged in: a hi folder's recent sync is due exactly hi_recent_interval after the
    last one, with that instant as its due time, and not a second before."""
    me = [account(active=NOW - 10)]
    assert plan(folder(recent=NOW - 599, full=NOW - 1000), accounts=me) == []
    [task] = plan(folder(recent=NOW - 600, full=NOW - 1000), accounts=me)
    assert (task.kind, task.priority, task.due) == (TaskKind.SYNC_RECENT, HI_RECENT, NOW)
    [task] = plan(folder(recent=NOW - 700, full=NOW - 1000), accounts=me)
    assert task.due == NOW - 100


def test_hi_recent_sync_every_hi_recent_interval_nl_when_not_logged_in():
    """Owner not logged in (never active, or active too long ago): every hi_recent_interval_nl."""
    for me in ([account(active=None)], [account(active=NOW - 901)]):
        assert plan(folder(recent=NOW - 1799, full=NOW - 1799), accounts=me) == []
        assert kinds(plan(folder(recent=NOW - 1800, full=NOW - 1800), accounts=me)) == {
            10: TaskKind.SYNC_RECENT}


def test_logged_in_means_active_within_logged_in_window():
    """Active exactly logged_in_window ago still counts as logged in; a second more does not."""
    stale = folder(recent=NOW - 700, full=NOW - 700)
    assert plan(stale, accounts=[account(active=NOW - 900)]) != []
    assert plan(stale, accounts=[account(active=NOW - 901)]) == []
    narrow = CFG.replace(sync__logged_in_window=60)
    assert plan(stale, accounts=[account(active=NOW - 61)], cfg=narrow) == []


def test_hi_full_sync_every_hi_full_interval_when_logged_in():
    """Owner logged in: a full sync every hi_full_interval; it replaces a due recent sync."""
    me = [account(active=NOW)]
    assert plan(folder(recent=NOW, full=NOW - 3599), accounts=me) == []
    [task] = plan(folder(recent=NOW - 3000, full=NOW - 3600), accounts=me)
    assert (task.kind, task.priority, task.due) == (TaskKind.SYNC_FULL, HI_FULL, NOW)


def test_hi_full_sync_every_hi_full_interval_nl_when_not_logged_in():
    """Owner not logged in: a full sync every hi_full_interval_nl."""
    assert plan(folder(recent=NOW, full=NOW - 4799)) == []
    assert kinds(plan(folder(recent=NOW, full=NOW - 4800))) == {10: TaskKind.SYNC_FULL}


def test_a_full_sync_counts_as_a_recent_one():
    """A full sync fetches new mail too, so a recent sync waits its interval after it."""
    me = [account(active=NOW)]
    assert plan(folder(recent=NOW - 5000, full=NOW - 100), accounts=me) == []
    assert plan(folder(recent=None, full=NOW - 100), accounts=me) == []


def test_never_synced_hi_folder_gets_a_full_sync_due_now():
    """A hi folder never synced needs everything: a full sync, due at once."""
    [task] = plan(folder(recent=None, full=None))
    assert (task.kind, task.priority, task.due) == (TaskKind.SYNC_FULL, HI_FULL, NOW)


def test_intervals_follow_the_settings():
    """Each of the four hi intervals is read from its setting, not assumed."""
    cfg = CFG.replace(sync__hi_recent_interval=60, sync__hi_recent_interval_nl=120,
                      sync__hi_full_interval=300, sync__hi_full_interval_nl=400)
    me, away = [account(active=NOW)], [account()]
    assert kinds(plan(folder(recent=NOW - 60, full=NOW - 100), accounts=me, cfg=cfg)) == {
        10: TaskKind.SYNC_RECENT}
    assert plan(folder(recent=NOW - 60, full=NOW - 100), accounts=away, cfg=cfg) == []
    assert kinds(plan(folder(recent=NOW - 120, full=NOW - 120), accounts=away, cfg=cfg)) == {
        10: TaskKind.SYNC_RECENT}
    assert kinds(plan(folder(recent=NOW, full=NOW - 300), accounts=me, cfg=cfg)) == {
        10: TaskKind.SYNC_FULL}
    assert plan(folder(recent=NOW, full=NOW - 300), accounts=away, cfg=cfg) == []
    assert kinds(plan(folder(recent=NOW, full=NOW - 400), accounts=away, cfg=cfg)) == {
        10: TaskKind.SYNC_FULL}


# --- priorities ------------------------------------------------------------------------------

def test_off_and_gone_folders_are_never_synced():
    """Priority off (the role's or the user's) and folders gone from the server: no task."""
    never = dict(recent=None, full=None)
    assert plan(folder(priority="off", **never)) == []
    assert plan(folder(priority="hi", user_priority="off", **never)) == []
    assert plan(folder(priority="hi", gone=NOW - 10, **never)) == []
    assert plan(folder(priority="lo", gone=NOW - 10, **never)) == []


def test_user_priority_overrides_the_roles():
    """The user's priority wins: lo made hi gets hi intervals, hi made lo waits for the
    daily start."""
    hi_now = folder(priority="lo", user_priority="hi", recent=NOW - 1800, full=NOW - 1800)
    [task] = plan(hi_now)
    assert (task.kind, task.priority) == (TaskKind.SYNC_RECENT, HI_RECENT)
    synced_after_start = datetime(2024, 6, 11, 20, 30, tzinfo=UTC).timestamp()
    lo_now = folder(priority="hi", user_priority="lo", recent=synced_after_start,
                    full=synced_after_start)
    assert plan(lo_now) == []


# --- backoffs --------------------------------------------------------------------------------

def test_account_in_imap_auth_backoff_is_left_alone_for_auth_error_retry():
    """A refused login parks the whole account (folders and discovery) for auth_error_retry."""
    due = folder(recent=None, full=None)
    parked = account(auth_error=NOW - 1799, listed=None)
    assert plan(due, accounts=[parked]) == []
    back = account(auth_error=NOW - 1800, listed=None)
    assert kinds(plan(due, accounts=[back])) == {0: TaskKind.DISCOVER, 10: TaskKind.SYNC_FULL}
    short = CFG.replace(sync__auth_error_retry=60)
    assert plan(due, accounts=[account(auth_error=NOW - 60)], cfg=short) != []


def test_failed_folder_waits_error_retry_then_is_retried():
    """A folder whose last sync failed is not retried on every pass but after ERROR_RETRY."""
    failing = dict(recent=None, full=None)
    assert plan(folder(error=NOW - 1, **failing)) == []
    assert plan(folder(error=NOW - ERROR_RETRY + 1, **failing)) == []
    assert kinds(plan(folder(error=NOW - ERROR_RETRY, **failing))) == {10: TaskKind.SYNC_FULL}
    assert ERROR_RETRY > CFG.planner.interval


def test_account_error_delays_only_its_discovery():
    """An account-wide failure delays the next folder listing, not its folders' syncs."""
    me = [account(listed=None, error=NOW - 10)]
    assert kinds(plan(folder(recent=None, full=None), accounts=me)) == {10: TaskKind.SYNC_FULL}
    me = [account(listed=None, error=NOW - ERROR_RETRY)]
    assert kinds(plan(accounts=me)) == {0: TaskKind.DISCOVER}


def test_sync_disabled_plans_nothing():
    """sync.enabled = false: no task at all, whatever is due."""
    off = CFG.replace(sync__enabled=False)
    assert plan(folder(recent=None, full=None), accounts=[account(listed=None)], cfg=off) == []


def test_folders_of_accounts_not_given_are_ignored():
    """Only the accounts passed in (the ones this host plans for) get tasks."""
    assert plan(folder(acntid=2, recent=None, full=None), accounts=[account(1)]) == []


# --- discovery -------------------------------------------------------------------------------

def test_first_discovery_comes_first_then_every_hi_full_interval():
    """An account never listed gets a discovery task ahead of everything; after that a
    listing is due again every hi_full_interval, behind the syncs."""
    [task] = plan(accounts=[account(listed=None)])
    assert (task.kind, task.emfdid, task.priority, task.due) == (TaskKind.DISCOVER, 0,
                                                                 HI_RECENT, NOW)
    assert plan(accounts=[account(listed=NOW - 3599)]) == []
    [task] = plan(accounts=[account(listed=NOW - 3600)])
    assert (task.kind, task.priority, task.due) == (TaskKind.DISCOVER, DISCOVER, NOW)


def test_one_task_per_folder_for_many_accounts():
    """Each due folder yields one task, of the right account, whatever else is due."""
    accounts = [account(n, active=NOW if n % 2 else None) for n in range(1, 5)]
    folders = [folder(emfdid=n * 10 + k, acntid=n, recent=NOW - 2000, full=NOW - 2000 * k)
               for n in range(1, 5) for k in range(1, 4)]
    tasks = plan(*folders, accounts=accounts)
    assert sorted(t.emfdid for t in tasks) == sorted(f.emfdid for f in folders)
    assert all(t.acntid == t.emfdid // 10 for t in tasks)


# --- lo folders: the daily start -----------------------------------------------------------

def test_lo_folder_is_due_once_a_day_from_lo_sync_start():
    """A lo folder synced after yesterday's start waits until today's; at the start it is
    due, with the start as its due time; synced after it, it waits for tomorrow."""
    cfg = CFG.replace(sync__lo_sync_start=time(20, 0))
    yesterday_evening = local(WARSAW, 2024, 6, 11, 20, 30)
    lo = folder(priority="lo", recent=None, full=yesterday_evening)
    assert plan(lo, now=local(WARSAW, 2024, 6, 12, 19, 59, 59), cfg=cfg, tz=WARSAW) == []
    start = local(WARSAW, 2024, 6, 12, 20, 0)
    [task] = plan(lo, now=start, cfg=cfg, tz=WARSAW)
    assert (task.kind, task.priority, task.due) == (TaskKind.SYNC_FULL, LO_FULL, start)
    synced = folder(priority="lo", recent=None, full=start + 300)
    assert plan(synced, now=local(WARSAW, 2024, 6, 13, 19, 0), cfg=cfg, tz=WARSAW) == []


def test_missed_daily_start_is_made_up_at_once():
    """The engine was down at the start (days ago even): the lo folder is due at the next
    pass, whatever the hour, and a never-synced lo folder too."""
    three_days_ago = local(WARSAW, 2024, 6, 9, 21, 0)
    morning = local(WARSAW, 2024, 6, 12, 9, 0)
    [task] = plan(folder(priority="lo", full=three_days_ago), now=morning, tz=WARSAW)
    assert task.due == local(WARSAW, 2024, 6, 11, 20, 0)
    assert kinds(plan(folder(priority="lo", recent=None, full=None), now=morning,
                      tz=WARSAW)) == {10: TaskKind.SYNC_FULL}


def test_daily_start_across_midnight():
    """With the start at 23:30, just after midnight the start that counts is yesterday's."""
    cfg = CFG.replace(sync__lo_sync_start=time(23, 30))
    after_midnight = local(WARSAW, 2024, 6, 13, 0, 15)
    before_start = folder(priority="lo", full=local(WARSAW, 2024, 6, 12, 23, 29))
    after_start = folder(priority="lo", full=local(WARSAW, 2024, 6, 12, 23, 31))
    assert plan(before_start, now=after_midnight, cfg=cfg, tz=WARSAW) != []
    assert plan(after_start, now=after_midnight, cfg=cfg, tz=WARSAW) == []
    midnight = time(0, 0)
    assert last_daily_start(local(WARSAW, 2024, 6, 13, 0, 0), midnight, WARSAW) == local(
        WARSAW, 2024, 6, 13, 0, 0)
    assert last_daily_start(local(WARSAW, 2024, 6, 12, 23, 59, 59), midnight, WARSAW) == local(
        WARSAW, 2024, 6, 12, 0, 0)


@pytest.mark.parametrize("tz, spring, autumn", [
    (WARSAW, (2024, 3, 31), (2024, 10, 27)),
    (NEW_YORK, (2024, 3, 10), (2024, 11, 3)),
], ids=["Europe/Warsaw", "America/New_York"])
def test_daily_start_on_dst_days_is_the_local_time(tz, spring, autumn):
    """On the 23- and 25-hour days the start is still 20:00 local, so 23 or 25 hours after
    the previous one."""
    at = time(20, 0)
    for day, hours in ((spring, 23), (autumn, 25)):
        start = daily_start(datetime(*day).date(), at, tz)
        assert datetime.fromtimestamp(start, tz).replace(tzinfo=None) == datetime(*day, 20, 0)
        before = daily_start(datetime.fromtimestamp(start - 86400 - 7200, tz).date(), at, tz)
        assert start - before == hours * 3600


@pytest.mark.parametrize("tz, day, gap_end_utc", [
    (WARSAW, (2024, 3, 31), datetime(2024, 3, 31, 1, 0, tzinfo=UTC)),     # 02:00 -> 03:00
    (NEW_YORK, (2024, 3, 10), datetime(2024, 3, 10, 7, 0, tzinfo=UTC)),   # 02:00 -> 03:00
], ids=["Europe/Warsaw", "America/New_York"])
def test_start_inside_the_spring_forward_gap_is_the_end_of_the_gap(tz, day, gap_end_utc):
    """02:30 does not exist that day: the start is 03:00, when the clock jumps past it, and
    a lo folder synced the evening before is due from then, once."""
    at = time(2, 30)
    start = daily_start(datetime(*day).date(), at, tz)
    assert start == gap_end_utc.timestamp()
    cfg = CFG.replace(sync__lo_sync_start=at)
    lo = folder(priority="lo", full=start - 6 * 3600)
    assert plan(lo, now=start - 1, cfg=cfg, tz=tz) == []
    assert plan(lo, now=start, cfg=cfg, tz=tz) != []
    assert plan(folder(priority="lo", full=start + 60), now=start + 20 * 3600, cfg=cfg,
                tz=tz) == []


@pytest.mark.parametrize("tz, day, first_utc", [
    (WARSAW, (2024, 10, 27), datetime(2024, 10, 27, 0, 30, tzinfo=UTC)),  # 02:30 CEST
    (NEW_YORK, (2024, 11, 3), datetime(2024, 11, 3, 5, 30, tzinfo=UTC)),  # 01:30 EDT
], ids=["Europe/Warsaw", "America/New_York"])
def test_start_in_the_repeated_autumn_hour_counts_once(tz, day, first_utc):
    """The wall clock shows the start twice: the first counts; a folder synced after it is
    not due again when the clock shows the start the second time."""
    at = datetime.fromtimestamp(first_utc.timestamp(), tz).time()
    start = daily_start(datetime(*day).date(), at, tz)
    assert start == first_utc.timestamp()
    second = start + 3600
    assert datetime.fromtimestamp(second, tz).time() == at  # the clock shows it again
    cfg = CFG.replace(sync__lo_sync_start=at)
    synced = folder(priority="lo", full=start + 60)
    assert plan(synced, now=second + 60, cfg=cfg, tz=tz) == []
    assert last_daily_start(second + 60, at, tz) == start
    assert plan(folder(priority="lo", full=start - 60), now=second + 60, cfg=cfg, tz=tz) != []
