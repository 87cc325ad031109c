"""The command line: add_parser/run (what `cpuformer serve` calls) and `python -m cpuformer.serving MODEL`."""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time


from serving_testlib import free_port, httpx

import cpuformer.serving as serving


def test_add_parser_defaults():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    serving.add_parser(sub)
    args = parser.parse_args(["serve", "/some/dir"])
    assert (args.command, args.model, args.host, args.port, args.max_batch) == ("serve", "/some/dir", "127.0.0.1",
                                                                                8000, 8)
    assert args.api_key is None


def test_run_reports_a_bad_directory(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    serving._arguments(parser)
    assert serving.run(parser.parse_args([str(tmp_path / "missing")])) == 2
    assert "error" in capsys.readouterr().err


def test_module_entry_point_serves(llama_dir):
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "cpuformer.serving", llama_dir, "--port", str(port),
                             "--model-name", "m", "--max-output-tokens", "8", "--max-input-tokens", "32",
                             "--log-level", "warning"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.communicate()[1].decode()
            assert time.time() < deadline
            time.sleep(0.1)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions",
                       json={"model": "m", "prompt": "the cat", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    finally:
        proc.send_signal(signal.SIGINT)  # as Ctrl-C: a graceful shutdown, exit status 0
        try:
            out, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert b"http://127.0.0.1:%d/v1" % port in err
