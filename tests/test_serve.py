"""`mailkit serve` with the bounce listener: one process, both services, clean SIGTERM."""

from __future__ import annotations

import signal
import smtplib
import subprocess
import sys
import urllib.request
from pathlib import Path

from sqlalchemy import func, select

from mailkit.storage import open_db
from mailkit.storage.schema import bounce_rejects


def test_serve_runs_tracking_and_bounce_listener_together(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path}/ws.db"
    open_db(db_url).dispose()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mailkit.cli",
            "--db",
            db_url,
            "serve",
            "--port",
            "0",
            "--bounce-smtp",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        http_url = smtp_port = None
        for _ in range(10):
            line = proc.stdout.readline()
            if "bounce SMTP listener on smtp://" in line:
                smtp_port = int(line.rsplit(":", 1)[1])
            if "tracking server listening on " in line:
                http_url = line.split("listening on ")[1].strip()
            if http_url and smtp_port:
                break
        assert http_url and smtp_port, proc.stderr.read()
        with urllib.request.urlopen(f"{http_url}/healthz", timeout=30) as response:
            assert response.status == 200
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as client:
            client.sendmail(
                "MAILER-DAEMON@mx.example.jp",
                ["bounces@shop.example.jp"],
                "From: MAILER-DAEMON@mx.example.jp\r\nSubject: hello\r\n\r\nnot a bounce\r\n",
            )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert proc.returncode == 0
    db = open_db(db_url)
    with db.connect() as conn:
        kept_aside = conn.execute(select(func.count()).select_from(bounce_rejects)).scalar_one()
    db.dispose()
    assert kept_aside == 1  # recorded before the 250, kept aside, nobody suppressed
