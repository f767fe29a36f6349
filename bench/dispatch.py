"""Dispatch throughput: the raw SMTP ceiling, a naive analyst script, and mailkit's pipeline.

    .venv/bin/python bench/dispatch.py [N] [--repeat K] [--processes P] [--loop L] [--profile]

One embedded sink (mailkit.sink.Sink) runs in its own process, so that it does not share the
sender's interpreter lock; all three contenders send N (default 5,000) messages to it:

1. ceiling  one pre-built ~5 KB message, blasted with aiosmtplib over 16 connections, on the
            event loop mailkit runs on (``--loop``; it makes no difference here: the sink is
            the bottleneck);
2. naive    what an analyst would write: jinja2 render, stdlib EmailMessage, dkimpy sign
            (RSA-2048), smtplib over one reused connection, one recipient at a time;
3. mailkit  send_campaign on a fresh SQLite workspace with N contacts: segment snapshot,
            preflight, render, MIME, DKIM RSA-2048 (DKIMSigner), ledger commits, SMTP, with
            16 connections in all, from P processes (``processes=P``; default: one per CPU
            core, as ``campaign send --processes`` would be run on this machine; the time
            includes forking them, the preflight and the snapshot).

Each contender runs K times (default 3), in rounds (ceiling, mailkit, naive, then again), with
the same N every time; the best run of each counts, since on a shared machine a slower run
measures the other jobs rather than the code. The load average is printed before and after.
It prints messages per second for each and, as its last line, the ratios mailkit/ceiling and
mailkit/naive. Targets on the 2-core development machine: ≥ 0.6 and ≥ 8. ``--profile`` prints
the top of a cProfile of the (first) mailkit run.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import multiprocessing
import os
import pstats
import resource
import smtplib
import sys
import tempfile
import time
from email.message import EmailMessage
from email.policy import SMTP
from multiprocessing.connection import Connection
from pathlib import Path

import aiosmtplib
import dkim
import jinja2
import pandas as pd
from cryptography.hazmat.primitives import serialization

from mailkit._aio import EVENT_LOOP_ENV, load_event_loop_name, run_sync
from mailkit.campaigns import create_campaign
from mailkit.contacts import import_contacts
from mailkit.dispatch import SafetyStop, send_campaign
from mailkit.dkim import DKIMSigner, build_dkim_keypair
from mailkit.sink import Sink
from mailkit.storage import open_db
from mailkit.templates import save_template

CONNECTIONS = 16
SENDER = "news@shop.example.jp"
PREFECTURES = ["東京都", "大阪府", "北海道", "福岡県", "愛知県", "京都府", "沖縄県"]

ITEMS = [f"春物アイテム {i}" for i in range(12)]
# The item list is part of the template, so all three contenders render the same thing.
SET_ITEMS = "{% set items = " + repr(ITEMS) + " %}"
SUBJECT = "{{ name }}様へ 春のセールのご案内（{{ points }}ポイント進呈）"
ITEM = (
    '<tr><td style="padding:8px;border-bottom:1px solid #eee">'
    '<a href="https://shop.example.jp/items/{{ loop.index }}?c={{ coupon }}">'
    '{{ item }}</a></td><td style="padding:8px;text-align:right">¥{{ loop.index * 1280 }}</td></tr>'
)
HTML = (
    SET_ITEMS + '<!doctype html><html><head><meta charset="utf-8"><title>春のセール</title></head>'
    '<body style="font-family:sans-serif;color:#333">'
    '<table width="600" align="center" cellpadding="0" cellspacing="0">'
    '<tr><td style="padding:24px;background:#fbe9ef"><h1 style="margin:0">春のセール</h1></td></tr>'
    '<tr><td style="padding:24px"><p>{{ name }} 様</p>'
    "<p>いつも{{ prefecture }}店をご利用いただき、誠にありがとうございます。"
    "{{ name }}様の現在のポイントは<strong>{{ points }}</strong>ポイントです。"
    "期間中はお買い上げ金額に応じてポイントが二倍になります。ぜひこの機会にご利用ください。</p>"
    '<p>クーポンコード: <strong style="font-size:20px">{{ coupon }}</strong></p>'
    '<table width="100%">'
    "{% for item in items %}" + ITEM + "{% endfor %}"
    "</table>"
    "<p>"
    + "春の新作を多数ご用意しております。店舗とオンラインストアでお待ちしております。"
    * 6
    + "</p>"
    '<p style="font-size:12px;color:#888">このメールは{{ email }}宛にお送りしています。'
    '配信停止は<a href="https://shop.example.jp/unsubscribe?e={{ email }}">こちら</a>。</p>'
    "</td></tr></table></body></html>"
)
TEXT = (
    SET_ITEMS
    + "{{ name }} 様\n\nいつも{{ prefecture }}店をご利用いただき、ありがとうございます。\n"
    "現在のポイント: {{ points }}\nクーポンコード: {{ coupon }}\n\n"
    "{% for item in items %}- {{ item }} https://shop.example.jp/items/{{ loop.index }}\n"
    "{% endfor %}\n"
    + "春の新作を多数ご用意しております。\n" * 6
    + "\n配信停止: https://shop.example.jp/unsubscribe?e={{ email }}\n"
)


def contacts(n: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "email": [f"member{i:06d}@mail{i % 97}.example.jp" for i in range(n)],
            "name": [f"山田 花子{i}" for i in range(n)],
            "prefecture": [PREFECTURES[i % len(PREFECTURES)] for i in range(n)],
            "points": [str(100 + i % 900) for i in range(n)],
            "coupon": [f"SPRING{i:06d}" for i in range(n)],
        }
    )


# -- the sink, in its own process ------------------------------------------------------------


def _serve(pipe: Connection) -> None:
    with Sink(max_message_size=None) as sink:
        pipe.send(sink.port)
        while True:
            command = pipe.recv()
            if command == "count":
                pipe.send(sink.count)
            elif command == "stop":
                break


class RemoteSink:
    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._pipe, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child,), daemon=True)
        self._proc.start()
        self.port: int = self._pipe.recv()
        self.url = f"smtp://127.0.0.1:{self.port}"

    @property
    def count(self) -> int:
        self._pipe.send("count")
        value: int = self._pipe.recv()
        return value

    def stop(self) -> None:
        self._pipe.send("stop")
        self._proc.join(10)


# -- 1. the ceiling ------------------------------------------------------------------------------


def build_one_message() -> bytes:
    env = jinja2.Environment(autoescape=True)
    row = contacts(1).iloc[0].to_dict()
    msg = EmailMessage(policy=SMTP)
    msg["From"] = f"ショップ <{SENDER}>"
    msg["To"] = row["email"]
    msg["Subject"] = env.from_string(SUBJECT).render(**row)
    msg.set_content(env.from_string(TEXT).render(**row))
    msg.add_alternative(env.from_string(HTML).render(**row), subtype="html")
    return msg.as_bytes()


async def blast(url_port: int, n: int, message: bytes) -> None:
    async def one_connection(k: int) -> None:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=url_port, start_tls=False)
        await smtp.connect()
        for i in range(k, n, CONNECTIONS):
            await smtp.sendmail(SENDER, [f"member{i:06d}@mail{i % 97}.example.jp"], message)
        await smtp.quit()

    await asyncio.gather(*(one_connection(k) for k in range(CONNECTIONS)))


def run_ceiling(sink: RemoteSink, n: int) -> float:
    message = build_one_message()
    before = sink.count
    start = time.perf_counter()
    run_sync(blast(sink.port, n, message))  # on the event loop mailkit uses
    elapsed = time.perf_counter() - start
    assert sink.count - before == n
    print(f"  message size {len(message)} bytes")
    return n / elapsed


# -- 2. the naive script ------------------------------------------------------------------------


def run_naive(sink: RemoteSink, n: int, key_pem: bytes) -> float:
    rows = contacts(n).to_dict("records")
    before = sink.count
    start = time.perf_counter()
    env = jinja2.Environment(autoescape=True)
    subject, html, text = (env.from_string(s) for s in (SUBJECT, HTML, TEXT))
    with smtplib.SMTP("127.0.0.1", sink.port) as smtp:
        for row in rows:
            msg = EmailMessage()
            msg["From"] = f"ショップ <{SENDER}>"
            msg["To"] = row["email"]
            msg["Subject"] = subject.render(**row)
            msg.set_content(text.render(**row))
            msg.add_alternative(html.render(**row), subtype="html")
            data = msg.as_bytes(policy=SMTP)
            signature = dkim.sign(data, b"mk2026", b"shop.example.jp", key_pem)
            smtp.sendmail(SENDER, [row["email"]], signature + data)
    elapsed = time.perf_counter() - start
    assert sink.count - before == n
    return n / elapsed


# -- 3. mailkit ----------------------------------------------------------------------------------


def run_mailkit(
    sink: RemoteSink, n: int, signer: DKIMSigner, profile: bool, processes: int = 1
) -> float:
    folder = Path(tempfile.mkdtemp(prefix="mailkit-bench-"))
    db = open_db(f"sqlite:///{folder}/bench.db")
    import_contacts(db, contacts(n), list_name="bench")
    save_template(db, "spring", subject=SUBJECT, html=HTML, text=TEXT)
    campaign = create_campaign(
        db,
        "bench",
        template="spring",
        segment="list == 'bench'",
        from_addr=f"ショップ <{SENDER}>",
    )
    before = sink.count
    profiler = cProfile.Profile()
    start = time.perf_counter()
    cpu = time.process_time()
    children = _children_cpu()
    if profile:
        profiler.enable()
    result = send_campaign(
        db,
        campaign.id,
        sink.url,
        concurrency=CONNECTIONS,
        dkim=signer,
        safety=SafetyStop(enabled=False),
        processes=processes,
    )
    profiler.disable()
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu
    children = _children_cpu() - children
    print(
        f"  mailkit: {elapsed:.2f} s wall, {cpu:.2f} s CPU in this process, {children:.2f} s in "
        f"its senders and preflight helpers ({(cpu + children) / n * 1000:.2f} ms/msg in all)"
    )
    assert result.status == "finished" and result.ledger["sent"] == n, result
    assert sink.count - before == n
    if profile:
        order = "cumulative" if "cumulative" in sys.argv else "tottime"
        pstats.Stats(profiler).sort_stats(order).print_stats(30)
    db.dispose()
    return n / elapsed


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # waited-for children only
    return usage.ru_utime + usage.ru_stime


def _load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description="Dispatch throughput against its baselines.")
    parser.add_argument("n", nargs="?", type=int, default=5000, help="messages per run")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each contender")
    parser.add_argument(
        "--processes", type=int, default=os.cpu_count() or 1, help="mailkit's processes"
    )
    parser.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        help=f"event loop of the ceiling client and mailkit [{EVENT_LOOP_ENV}, else uvloop]",
    )
    parser.add_argument(
        "--profile",
        choices=("tottime", "cumulative"),
        nargs="?",
        const="tottime",
        help="cProfile the first mailkit run (this process only: use with --processes 1)",
    )
    args = parser.parse_args(argv)
    n, repeat, processes, profile = args.n, args.repeat, args.processes, args.profile is not None
    if args.loop:
        os.environ[EVENT_LOOP_ENV] = args.loop  # the forked senders inherit it
    key = build_dkim_keypair()
    signer = DKIMSigner(domain="shop.example.jp", selector="mk2026", rsa_key=key)
    key_pem = key.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    sink = RemoteSink()
    ceilings: list[float] = []
    mailkits: list[float] = []
    naives: list[float] = []
    try:
        print(
            f"N = {n}, {CONNECTIONS} connections, RSA-2048 DKIM, sink in its own process, "
            f"mailkit in {processes} process(es), event loop {load_event_loop_name()}, best of "
            f"{repeat}; {_load()}"
        )
        for k in range(repeat):
            ceilings.append(run_ceiling(sink, n))
            print(f"    run {k + 1}: ceiling {ceilings[-1]:.0f} msgs/s")
            mailkits.append(run_mailkit(sink, n, signer, profile and k == 0, processes))
            print(f"    run {k + 1}: mailkit {mailkits[-1]:.0f} msgs/s")
            naives.append(run_naive(sink, n, key_pem))
            print(f"    run {k + 1}: naive   {naives[-1]:.0f} msgs/s")
    finally:
        sink.stop()
    ceiling, mailkit, naive = max(ceilings), max(mailkits), max(naives)
    print(f"(1) ceiling  aiosmtplib, pre-built message   {ceiling:8.0f} msgs/s")
    print(f"(3) mailkit  full pipeline, {processes} process(es)     {mailkit:8.0f} msgs/s")
    print(f"(2) naive    jinja2+EmailMessage+dkimpy+smtplib {naive:6.0f} msgs/s")
    print(_load())
    print(f"mailkit/ceiling = {mailkit / ceiling:.2f}, mailkit/naive = {mailkit / naive:.1f}")


if __name__ == "__main__":
    main(sys.argv[1:])
