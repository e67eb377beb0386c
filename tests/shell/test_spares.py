"""The pool of spare session processes (issue 17, docs/operations.md §10): ``serve --spares
N`` (default: one per CPU) keeps N started, clients saying HELLO together are each handed
a spare that was already running, and a shutdown leaves no session process behind.

Nothing here depends on timing: a wait for processes to appear has a generous deadline and
is never the assertion."""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.shell.conftest import running
from tests.shell.test_isolation import HOST
from tests.shell.test_serve_drain import Served
from viommud.shell.cli import main
from viommud.shell.client import Client
from viommud.shell.sessions import SPARE_NICE, Spawner, can_renice, default_spares

WORKER = b"viommud.shell.worker"
DEADLINE = 60.0  # seconds the spares may take to start on a loaded machine


def workers(parent: int) -> set[int]:
    """The session processes (running viommud.shell.worker) whose parent is ``parent``."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        # the fields after the command name, which may hold spaces: state, ppid, ...
        fields = stat.rsplit(b")", 1)[1].split()
        if int(fields[1]) == parent and fields[0] != b"Z" and WORKER in cmdline:
            found.add(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def wait_for_workers(parent: int, n: int) -> set[int]:
    deadline = time.monotonic() + DEADLINE
    while len(found := workers(parent)) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


async def async_wait_for_workers(parent: int, n: int) -> set[int]:
    deadline = time.monotonic() + DEADLINE
    while len(found := workers(parent)) < n and time.monotonic() < deadline:  # noqa: ASYNC110 - polls /proc
        await asyncio.sleep(0.05)
    return found


# -- Spawner ------------------------------------------------------------------------------


async def test_the_pool_refills_what_is_taken_and_hands_over_running_spares() -> None:
    spawner = Spawner(spares=3)
    spawner.prepare()
    before = await async_wait_for_workers(os.getpid(), 3)
    assert len(before) == 3
    taken = [await spawner.take(), await spawner.take()]
    try:
        assert {spare.process.pid for spare in taken} <= before  # not started for them
        assert all(spare.process.returncode is None for spare in taken)
        # two replacements were started at once; the pool holds 3 again
        after = await async_wait_for_workers(os.getpid(), 5)
        assert len(after) == 5
        assert before <= after
    finally:
        for spare in taken:
            spare.control.close()
            await spare.process.wait()
        await spawner.close()
    assert not workers(os.getpid())


@pytest.mark.parametrize("reaped", [True, False])
async def test_a_spare_that_died_while_it_waited_is_passed_over(reaped: bool) -> None:
    """Whether or not the event loop has learnt its exit status yet."""
    spawner = Spawner(spares=2)
    spawner.prepare()
    await async_wait_for_workers(os.getpid(), 2)
    await asyncio.wait(spawner._pool)
    dead, other = (task.result() for task in spawner._pool)
    if reaped:
        dead.process.kill()
        await dead.process.wait()
    else:  # the process has exited (a zombie), the loop has not run since
        os.kill(dead.process.pid, signal.SIGKILL)
        deadline = time.monotonic() + DEADLINE
        while alive(dead.process.pid) and time.monotonic() < deadline:
            time.sleep(0.05)  # noqa: ASYNC251 - the loop must not run meanwhile
        assert dead.process.returncode is None
    second = other.process.pid
    taken = await spawner.take()
    try:
        assert taken.process.pid == second
        assert taken.process.returncode is None
    finally:
        taken.control.close()
        await taken.process.wait()
        await spawner.close()
    assert not workers(os.getpid())


async def test_close_ends_every_spare_even_those_being_spawned() -> None:
    spawner = Spawner(spares=4)
    spawner.prepare()
    await asyncio.sleep(0)  # some spawns may be under way, none need have finished
    await spawner.close()
    assert not workers(os.getpid())
    with pytest.raises(RuntimeError, match="stopping"):
        await spawner.take()


@pytest.mark.parametrize("spares", [0, -1])
def test_a_spawner_keeps_at_least_one_spare(spares: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Spawner(spares=spares)


def test_the_default_is_one_spare_per_usable_cpu() -> None:
    assert default_spares() == max(1, len(os.sched_getaffinity(0)))


# -- Server -------------------------------------------------------------------------------


async def test_two_hellos_in_a_row_are_served_by_spares_already_running(tmp_path: Path) -> None:
    async with running(tmp_path, processes=True, backend="emulated", spares=2) as server:
        before = await async_wait_for_workers(os.getpid(), 2)
        assert len(before) == 2
        clients = []
        for _ in range(2):
            client = await Client.connect(server.socket_path, wait=30)
            client.timeout = 30
            await client.hello(host=HOST)
            clients.append(client)
        asker = await Client.connect(server.socket_path, wait=30)
        asker.timeout = 30
        status = await asker.status()
        await asker.close()
        pids = {c["pid"] for c in status["clients"] if c.get("pid") is not None}
        assert len(pids) == 2
        assert pids <= before
        for client in clients:
            await client.close()
    assert not workers(os.getpid())  # the sessions and the refilled spares


# -- serve --spares -----------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "-2", "x", "1.5"])
def test_serve_refuses_a_spares_value_below_one(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--spares", value])
    assert exc.value.code == 2
    assert "expected a number of spare session processes (1 or more)" in capsys.readouterr().err


@pytest.mark.parametrize("spares", [None, 3])
def test_serve_keeps_its_spares_and_leaves_none_behind(tmp_path: Path, spares: int | None) -> None:
    expected = default_spares() if spares is None else spares
    daemon = Served(tmp_path, "--backend", "emulated", *(["--spares", str(spares)] * bool(spares)))
    try:
        found = wait_for_workers(daemon.process.pid, expected)
        assert len(found) == expected
        started = [e for e in daemon.events() if e.get("event") == "server_started"]
        assert started[0]["spares"] == expected
    finally:
        assert daemon.stop() == 0
    assert not [pid for pid in found if alive(pid)]
    assert not workers(daemon.process.pid)


def test_serve_help_names_the_spares_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "--spares N" in out
    assert f"here {default_spares()}" in out


def test_a_killed_spare_does_not_stop_the_daemon(tmp_path: Path) -> None:
    """A spare killed while it waits is passed over: the next HELLO still gets a session."""
    daemon = Served(tmp_path, "--backend", "emulated", "--spares", "2")
    try:
        found = wait_for_workers(daemon.process.pid, 2)
        assert len(found) == 2
        os.kill(min(found), signal.SIGKILL)
        deadline = time.monotonic() + DEADLINE
        while alive(min(found)) and time.monotonic() < deadline:  # exited, its fds closed
            time.sleep(0.05)

        async def hello() -> None:
            client = await Client.connect(daemon.socket, wait=30)
            client.timeout = 30
            await client.hello(host=HOST)
            await client.close()

        asyncio.run(hello())
    finally:
        assert daemon.stop() == 0


# -- spares wait at a low priority --------------------------------------------------------


def _nice(pid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, pid)


async def test_spares_wait_at_nice_19_and_a_taken_one_serves_at_the_daemons() -> None:
    spawner = Spawner(spares=2, lower=True)
    spawner.prepare()
    await async_wait_for_workers(os.getpid(), 2)
    await asyncio.wait(spawner._pool)
    waiting = [task.result().process.pid for task in spawner._pool]
    assert [_nice(pid) for pid in waiting] == [SPARE_NICE, SPARE_NICE]
    taken = await spawner.take()
    try:
        assert taken.process.pid == waiting[0]
        assert _nice(taken.process.pid) == _nice(0)
        await asyncio.wait(spawner._pool)
        assert [_nice(t.result().process.pid) for t in spawner._pool] == [SPARE_NICE] * 2
    finally:
        taken.control.close()
        await taken.process.wait()
        await spawner.close()


async def test_spares_keep_the_daemons_nice_when_it_could_not_give_it_back() -> None:
    spawner = Spawner(spares=1, lower=False)
    spawner.prepare()
    await asyncio.wait(spawner._pool)
    taken = await spawner.take()
    try:
        assert _nice(taken.process.pid) == _nice(0)
        await asyncio.wait(spawner._pool)
        assert _nice(spawner._pool[0].result().process.pid) == _nice(0)
    finally:
        taken.control.close()
        await taken.process.wait()
        await spawner.close()


CAPS_ALL, CAPS_NONE = "CapEff:\t000001ffffffffff\n", "CapEff:\t0000000000000000\n"
CAPS_ONLY_NICE = f"CapEff:\t{1 << 23:016x}\n"
CAPS_ALL_BUT_NICE = f"CapEff:\t{0x1FFFFFFFFFF & ~(1 << 23):016x}\n"


@pytest.mark.parametrize(
    ("status", "rlimit", "nice", "expected"),
    [
        (CAPS_ALL, 0, 0, True),  # root: CAP_SYS_NICE
        (CAPS_ONLY_NICE, 0, 0, True),
        (CAPS_ALL_BUT_NICE, 0, 0, False),  # e.g. a container that dropped it
        (CAPS_NONE, 0, 0, False),  # an ordinary user with the default RLIMIT_NICE
        (CAPS_NONE, 20, 0, True),  # RLIMIT_NICE 20 allows nice 0 again
        (CAPS_NONE, 19, 0, False),
        (CAPS_NONE, 10, 10, True),  # a daemon started at nice 10 needs only 10
        (CAPS_NONE, resource.RLIM_INFINITY, 0, True),
        ("Name:\tx\n", 0, 0, False),  # no CapEff line
    ],
)
def test_can_renice_follows_setpriority_rules(
    status: str, rlimit: int, nice: int, expected: bool
) -> None:
    assert can_renice(status, rlimit, nice) is expected


def test_this_process_can_renice_as_it_says() -> None:
    """can_renice's answer for this very process holds: a child raised to SPARE_NICE gets
    this process's nice value back exactly when it says so."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        os.setpriority(os.PRIO_PROCESS, child.pid, SPARE_NICE)
        try:
            os.setpriority(os.PRIO_PROCESS, child.pid, _nice(0))
            gave_back = True
        except PermissionError:
            gave_back = False
        assert gave_back is can_renice()
    finally:
        child.kill()
        child.wait()
