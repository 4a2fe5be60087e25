"""The fault drill: what clusters do to runs, done to tiny runs of `vilbert pretrain`, and
what came of each (named, survived, or not). Prints one table row per case.

    python benchmarks/fault_drill.py [--out runs/fault-drill] [--cases damaged-truncated ...]

Cases: a newest checkpoint damaged four ways (truncated, zero-filled, a file deleted, 64
bytes flipped) then `--resume auto`; a second start into a directory being written; a
changed model and a changed ZeRO stage on resume; a hung (SIGSTOP) and a killed rank of
two under torchrun; an MLflow server that is down at the start and comes up mid-run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
MODEL_STATES = "mp_rank_00_model_states.pt"


def metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def last_line(text: str, *needles: str) -> str:
    """The last line that holds one of `needles`, from where the log line starts (a progress
    bar may share its terminal line)."""
    lines = [line for line in text.splitlines() if any(n in line for n in needles)]
    line = lines[-1] if lines else (text.strip().splitlines() or [""])[-1]
    starts = [line.find(m) for m in ("ERROR ", "WARNING ", "vilbert ") if m in line]
    return line[min(starts) if starts else 0:][:200]


class Drill:
    def __init__(self, out: Path):
        self.out = out
        self.world = out / "toy"
        if not (self.world / "train/index.json").exists():
            from shards.toyworld import write_toyworld
            write_toyworld(self.world, 600, 100, feature_dim=32)

    def config(self, name: str, **sections) -> Path:
        directory = self.out / name
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        config = {"output_dir": str(directory / "run"), "deepspeed": str(ROOT / "deepspeed_configs/zero1_fp32.json"),
                  "model": {"preset": "tiny", "overrides": {"vocab_size": 30522}},
                  "data": {"shards": str(self.world / "train"), "batch_size": 8, "workers": 0, "shuffle_buffer": 50},
                  "optim": {"steps": 6, "global_batch_size": 8, "lr": 1e-3},
                  "checkpoint": {"every_steps": 3, "keep_last": 5},
                  "tracking": {"uri": f"sqlite:///{directory / 'mlflow.db'}", "experiment": "drill", "log_every": 1,
                               "system_metrics": False}}
        for key, value in sections.items():
            config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
        (directory / "config.yaml").write_text(yaml.safe_dump(config))
        return directory / "config.yaml"

    def pretrain(self, config: Path, *extra: str, launcher=("python", "-m")) -> subprocess.CompletedProcess:
        return subprocess.run([*([sys.executable, "-m"] if launcher[0] == "python" else launcher), "vilbert",
                               "pretrain", "--config", str(config), *extra], env=ENV, cwd=ROOT, capture_output=True,
                              text=True, timeout=900)

    # --- the cases: each returns (outcome, evidence) ------------------------------------------------
    def damaged(self, how: str) -> tuple[str, str]:
        config = self.config(f"damaged-{how}")
        self.pretrain(config)
        run = config.parent / "run"
        target = run / "checkpoints/step00000006" / MODEL_STATES
        data = target.read_bytes()
        if how == "truncated":
            target.write_bytes(data[: len(data) // 2])
        elif how == "zero-filled":
            target.write_bytes(bytes(len(data)))
        elif how == "deleted":
            target.unlink()
        else:
            target.write_bytes(bytes(b ^ 0xFF for b in data[:64]) + data[64:])
        done = self.pretrain(config, "--resume", "auto", "optim.steps=9")
        steps = [m["step"] for m in metrics(run)]
        set_aside = (run / "checkpoints/damaged/step00000006").is_dir()
        ok = done.returncode == 0 and steps == list(range(1, 10)) and set_aside
        return ("survived: resumed from step 3" if ok else f"FAILED (exit {done.returncode})",
                last_line(done.stderr, "is damaged"))

    def double_start(self) -> tuple[str, str]:
        config = self.config("double-start", optim={"steps": 400})
        first = subprocess.Popen([sys.executable, "-m", "vilbert", "pretrain", "--config", str(config)], env=ENV,
                                 cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not metrics(config.parent / "run"):
            time.sleep(0.2)
        second = self.pretrain(config, "--resume", "auto")
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=300)
        steps = [m["step"] for m in metrics(config.parent / "run")]
        ok = second.returncode == 2 and steps == sorted(set(steps))
        return ("named: refused (exit 2), first run untouched" if ok else f"FAILED (exit {second.returncode})",
                last_line(second.stderr, "is being written"))

    def changed(self, what: str) -> tuple[str, str]:
        config = self.config(f"changed-{what}")
        self.pretrain(config)
        change = "model.preset=small" if what == "model" else f"deepspeed={ROOT / 'deepspeed_configs/zero2_fp32.json'}"
        done = self.pretrain(config, "--resume", "auto", change)
        ok = done.returncode == 1 and "cannot resume" in done.stderr
        return ("named: refused (exit 1)" if ok else f"FAILED (exit {done.returncode})",
                last_line(done.stderr, "cannot resume"))

    def lost_rank(self, how: str) -> tuple[str, str]:
        config = self.config(f"rank-{how}", optim={"steps": 5000, "global_batch_size": 16},
                             checkpoint={"every_steps": 5}, distributed={"heartbeat_s": 30})
        job = subprocess.Popen(["torchrun", "--nproc_per_node", "2", "-m", "vilbert", "pretrain", "--config",
                                str(config)], env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
        run = config.parent / "run"
        while not any(m["step"] >= 6 for m in metrics(run)):
            time.sleep(0.2)
        pid = json.loads((run / ".ranks/rank-00001.json").read_text())["pid"]
        os.kill(pid, signal.SIGSTOP if how == "hung" else signal.SIGKILL)
        began = time.time()
        _, stderr = job.communicate(timeout=600)
        seconds = time.time() - began
        for target in (lambda: os.killpg(job.pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
            try:
                target()
            except ProcessLookupError:
                pass
        named = f"rank 1 on {socket.gethostname()} (PID {pid}"
        ok = job.returncode != 0 and named in stderr
        return (f"named: job ended after {seconds:.0f} s" if ok else f"FAILED (exit {job.returncode})",
                last_line(stderr, named))

    def mlflow_outage(self) -> tuple[str, str]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        config = self.config("mlflow-outage", optim={"steps": 60}, checkpoint={"every_steps": 5},
                             tracking={"uri": f"http://127.0.0.1:{port}", "retry_s": 5})
        store = config.parent / "server.db"
        job = subprocess.Popen([sys.executable, "-m", "vilbert", "pretrain", "--config", str(config)], env=ENV,
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while not any(m["step"] >= 10 for m in metrics(config.parent / "run")):  # logged while the server is down
            time.sleep(0.2)
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{store}",
                                   "--artifacts-destination", str(config.parent / "artifacts"),  # not ./mlartifacts
                                   "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], env=ENV,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            _, stderr = job.communicate(timeout=600)
            import mlflow

            client = mlflow.MlflowClient(f"http://127.0.0.1:{port}")
            state = json.loads((config.parent / "run/tracking.json").read_text())
            steps = [m.step for m in client.get_metric_history(state["run_id"], "train/loss")]
            late = client.get_run(state["run_id"]).data.tags.get("tracking.late_steps")
        finally:
            os.killpg(server.pid, signal.SIGKILL)
        ok = job.returncode == 0 and steps == list(range(1, 61))
        return (f"survived: {len(steps)} of 60 steps in MLflow, each once ({late or 0} late)" if ok
                else f"FAILED (exit {job.returncode}, steps {steps[:3]}...{steps[-3:]})",
                last_line(stderr, "MLflow"))


CASES = {"damaged-truncated": lambda d: d.damaged("truncated"),
         "damaged-zero-filled": lambda d: d.damaged("zero-filled"),
         "damaged-deleted": lambda d: d.damaged("deleted"), "damaged-flipped": lambda d: d.damaged("flipped"),
         "double-start": Drill.double_start, "changed-model": lambda d: d.changed("model"),
         "changed-zero": lambda d: d.changed("zero"), "rank-hung": lambda d: d.lost_rank("hung"),
         "rank-killed": lambda d: d.lost_rank("killed"), "mlflow-outage": Drill.mlflow_outage}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/fault-drill")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    drill = Drill(ROOT / args.out)
    print(f"fault drill, {time.strftime('%Y-%m-%d')}, {socket.gethostname()}, {os.cpu_count()} cores\n")
    print("| case | outcome | the line it printed |\n|---|---|---|", flush=True)
    failed = 0
    for name in args.cases:
        began = time.time()
        try:
            outcome, evidence = CASES[name](drill)
        except Exception as e:  # a case that breaks the drill is a result too
            outcome, evidence = f"FAILED ({type(e).__name__})", str(e)[:160]
        failed += outcome.startswith("FAILED")
        print(f"| {name} | {outcome} ({time.time() - began:.0f} s) | `{evidence.replace('|', '/')}` |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
