"""Issue 12 must-show, by hand: a coordinator and a parameter server with their state directories
on a 16 MiB tmpfs that is filled up mid-training. ``recover HOLD_S``: the filler is removed after
HOLD_S seconds (the job should go on and succeed); ``stay``: it stays (the coordinator should exit
161 after 30 s of refused commits). Needs root (mount). Prints the job's state every few seconds,
exit codes and counts of the relevant log events. Usage:
``python tools/full_disk_check.py recover 12`` (from the repository root, with the venv's python).
"""

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = str(Path(sys.executable).with_name("lepton"))
scenario = sys.argv[1]  # "recover" (space returns after HOLD s) or "stay" (stays full)
HOLD = float(sys.argv[2]) if len(sys.argv) > 2 else 15
root = Path(tempfile.mkdtemp(prefix=f"lepton-full-disk-{scenario}-"))
M = root / "mnt"
M.mkdir(exist_ok=True)
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(M)], check=True)
procs = {}


def start(name, argv):
    procs[name] = subprocess.Popen([BIN, *argv], stdout=open(root / f"{name}.log", "w"), stderr=subprocess.STDOUT)


def status(addr):
    p = subprocess.run([BIN, "status", "--coordinator", addr, "--json"], capture_output=True, text=True, timeout=20)
    try:
        return json.loads(p.stdout)
    except Exception:
        return {"state": f"unreachable rc={p.returncode}"}


try:
    start(
        "coordinator",
        [
            "coordinator",
            "--listen",
            "127.0.0.1:0",
            "--ready-file",
            str(root / "c.json"),
            "--state-dir",
            str(M / "coord"),
            "--parameter-servers",
            "1",
            "--epochs",
            "40",
            "--shards",
            "8",
            "--checkpoint-every",
            "5",
            "--log-format",
            "json",
        ],
    )
    while not (root / "c.json").exists():
        time.sleep(0.2)
    addr = json.loads((root / "c.json").read_text())["address"]
    start(
        "ps-0",
        ["ps", "--coordinator", addr, "--listen", "127.0.0.1:0", "--state-dir", str(M / "ps0"), "--log-format", "json"],
    )
    for i in range(2):
        start(f"worker-{i}", ["worker", "--coordinator", addr, "--step-delay", "0.01", "--log-format", "json"])
    while True:
        s = status(addr)
        if s.get("state") == "training":
            time.sleep(3)
            break
        time.sleep(0.5)
    print("before fill:", s.get("state"), s.get("epoch"), flush=True)
    t0 = time.monotonic()
    subprocess.run(["dd", "if=/dev/zero", f"of={M}/filler", "bs=64k"], capture_output=True)
    print(
        "filled:",
        subprocess.run(["df", "-h", str(M)], capture_output=True, text=True).stdout.splitlines()[-1],
        flush=True,
    )
    freed = False
    while True:
        el = time.monotonic() - t0
        if scenario == "recover" and not freed and el > HOLD:
            (M / "filler").unlink()
            freed = True
            print(f"t={el:.1f}s space returned", flush=True)
        s = (
            status(addr)
            if procs["coordinator"].poll() is None
            else {"state": f"coordinator exited {procs['coordinator'].returncode}"}
        )
        codes = {n: p.poll() for n, p in procs.items()}
        print(f"t={el:.1f}s state={s.get('state')} epoch={s.get('epoch')} exits={codes}", flush=True)
        if all(c is not None for c in codes.values()) or el > 120:
            break
        time.sleep(2)
    for p in procs.values():
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
    print("logs in", root)
    print("exit codes:", {n: p.returncode for n, p in procs.items()})
    for n in procs:
        text = (root / f"{n}.log").read_text()
        print(
            n,
            {
                k: text.count(k)
                for k in [
                    "checkpoint_failed",
                    "checkpoint_recovered",
                    "state_not_saved",
                    "state_saved_again",
                    "state_not_saved_giving_up",
                    "INTERNAL",
                    "Traceback",
                    "rpc_rejected",
                ]
            },
        )
finally:
    for p in procs.values():
        if p.poll() is None:
            p.kill()
    subprocess.run(["umount", str(M)])
