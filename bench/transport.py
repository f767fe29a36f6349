"""The SMTP client's own cost: mailkit's connection, pipelined and not, against aiosmtplib.

    .venv/bin/python bench/transport.py [N] [--repeat K] [--loop uvloop|asyncio]

Two embedded sinks run in their own processes, one offering PIPELINING and one not
(``Sink(pipelining=False)``). Each contender sends N (default 4,000) pre-built ~8 KB messages,
one recipient each, over 8 connections:

  pipelined   mailkit's SMTPConnection against the sink that offers PIPELINING
  one-by-one  mailkit's SMTPConnection against the sink that does not
  aiosmtplib  aiosmtplib.SMTP.sendmail on the same sink (the baseline)

It prints, per contender and round, the client's CPU per message (this process), the sink's CPU
per message (read from /proc) and messages per second; the last line gives the ratio of the
client CPU of aiosmtplib to mailkit's pipelined connection (best round of each). CPU per
message is the figure to compare on a shared machine; the rate depends on the load. The client
runs on the event loop mailkit runs on (``--loop``, else ``MAILKIT_EVENT_LOOP``, else uvloop).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import sys
import time
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

import aiosmtplib

from mailkit._aio import EVENT_LOOP_ENV, load_event_loop_name, run_sync
from mailkit.dispatch import SMTPConnection
from mailkit.sink import Sink

CONNECTIONS = 8
SENDER = "news@shop.example.jp"
MESSAGE = (
    b"From: news@shop.example.jp\r\nTo: member@example.jp\r\nSubject: bench\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    + (b"x" * 76 + b"\r\n")
    * 105
)


def _serve(pipe: Connection, pipelining: bool) -> None:
    with Sink(max_message_size=None, pipelining=pipelining) as sink:
        pipe.send(sink.port)
        pipe.recv()


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _recipient(i: int) -> str:
    return f"member{i:06d}@mail{i % 97}.example.jp"


async def send_mailkit(port: int, n: int) -> None:
    async def one(k: int) -> None:
        async with SMTPConnection(f"smtp://127.0.0.1:{port}") as conn:
            for i in range(k, n, CONNECTIONS):
                outcome = await conn.send(SENDER, _recipient(i), MESSAGE)
                assert outcome.kind == "sent", outcome

    await asyncio.gather(*(one(k) for k in range(CONNECTIONS)))


async def send_aiosmtplib(port: int, n: int) -> None:
    async def one(k: int) -> None:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
        await smtp.connect()
        for i in range(k, n, CONNECTIONS):
            await smtp.sendmail(SENDER, [_recipient(i)], MESSAGE)
        await smtp.quit()

    await asyncio.gather(*(one(k) for k in range(CONNECTIONS)))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description="SMTP client CPU per message.")
    parser.add_argument("n", nargs="?", type=int, default=4000, help="messages per run")
    parser.add_argument("--repeat", type=int, default=3, help="rounds")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), help="the client's event loop")
    args = parser.parse_args(argv)
    if args.loop:
        os.environ[EVENT_LOOP_ENV] = args.loop
    ctx = multiprocessing.get_context("spawn")
    sinks: dict[bool, tuple[Connection, BaseProcess, int]] = {}
    for pipelining in (True, False):
        parent, child = ctx.Pipe()
        process: BaseProcess = ctx.Process(target=_serve, args=(child, pipelining), daemon=True)
        process.start()
        sinks[pipelining] = (parent, process, parent.recv())
    contenders: list[tuple[str, Callable[[int, int], Awaitable[None]], bool]] = [
        ("pipelined", send_mailkit, True),
        ("one-by-one", send_mailkit, False),
        ("aiosmtplib", send_aiosmtplib, False),
    ]
    best: dict[str, float] = {}
    print(
        f"N = {args.n}, {CONNECTIONS} connections, {len(MESSAGE)}-byte message, event loop "
        f"{load_event_loop_name()}; load " + ", ".join(f"{x:.2f}" for x in os.getloadavg())
    )
    try:
        for round_ in range(args.repeat):
            for name, send, pipelining in contenders:
                _, process, port = sinks[pipelining]
                assert process.pid is not None
                cpu, sink_cpu = time.process_time(), _cpu_seconds(process.pid)
                start = time.perf_counter()
                run_sync(send(port, args.n))  # type: ignore[arg-type]
                elapsed = time.perf_counter() - start
                client = (time.process_time() - cpu) / args.n * 1000
                server = (_cpu_seconds(process.pid) - sink_cpu) / args.n * 1000
                best[name] = min(best.get(name, client), client)
                print(
                    f"  round {round_ + 1}: {name:10s} client {client:.3f} ms/msg, "
                    f"sink {server:.3f} ms/msg, {args.n / elapsed:5.0f} msgs/s"
                )
    finally:
        for parent, process, _ in sinks.values():
            parent.send("stop")
            process.join(10)
    print(
        f"client CPU per message: pipelined {best['pipelined']:.3f} ms, one-by-one "
        f"{best['one-by-one']:.3f} ms, aiosmtplib {best['aiosmtplib']:.3f} ms; "
        f"aiosmtplib/pipelined = {best['aiosmtplib'] / best['pipelined']:.1f}"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
