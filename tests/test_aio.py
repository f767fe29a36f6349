"""The event loop mailkit runs its network I/O on, and the async→sync bridge."""

from __future__ import annotations

import asyncio
import warnings

import pytest
import uvloop

from mailkit._aio import load_event_loop_name, run_sync
from mailkit.errors import ConfigError


async def loop_type() -> type:
    return type(asyncio.get_running_loop())


def test_uvloop_is_the_default_where_it_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MAILKIT_EVENT_LOOP", raising=False)
    assert load_event_loop_name() == "uvloop"
    assert run_sync(loop_type()) is uvloop.Loop


def test_the_standard_loop_can_be_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAILKIT_EVENT_LOOP", " AsyncIO ")
    assert load_event_loop_name() == "asyncio"
    used = run_sync(loop_type())
    assert issubclass(used, asyncio.AbstractEventLoop) and not issubclass(used, uvloop.Loop)


@pytest.mark.parametrize("name", ["uvloop", "asyncio"])
def test_inside_a_running_loop_the_coroutine_runs_on_a_fresh_loop_of_that_kind(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAILKIT_EVENT_LOOP", name)

    async def notebook_cell() -> tuple[type, bool]:
        outer = asyncio.get_running_loop()
        inner = run_sync(loop_type())  # as a notebook's kernel would call it
        return inner, asyncio.get_running_loop() is outer

    inner, same_outer = asyncio.run(notebook_cell())
    assert same_outer
    assert issubclass(inner, uvloop.Loop) == (name == "uvloop")


def test_errors_cross_the_bridge(each_event_loop: str) -> None:
    async def fails() -> None:
        raise LookupError("from the coroutine")

    with pytest.raises(LookupError, match="from the coroutine"):
        run_sync(fails())


def test_an_unknown_loop_name_is_a_config_error_and_leaves_no_stray_coroutine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MAILKIT_EVENT_LOOP", "trio")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "coroutine ... was never awaited" would fail here
        with pytest.raises(ConfigError, match="MAILKIT_EVENT_LOOP='trio': use one of uvloop"):
            run_sync(loop_type())
