"""What a user sees of an ablation in MLflow's UI, in a real browser: starts `mlflow ui` on
loopback over the ablation's store and takes headless-Chromium screenshots of

    runs.png     the experiment's runs table in the ablation's saved view (model-training
                 view, the parent run expanded, the cells' values and deciding metrics as columns)
    compare.png  MLflow's compare view of the ablation's fine-tunes

(A run's chart page is not among them: headless Chromium's virtual time ends before its
charts have drawn.)

    python benchmarks/mlflow_screenshots.py configs/ablations/paper_toy.yaml --out docs/images/ablation

Needs Chromium (`apt-get install chromium` on Debian, about a minute). Prints the URL of each
screenshot, so the same pages can be opened by hand.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(uri: str, port: int) -> subprocess.Popen:
    server = subprocess.Popen(["mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    for _ in range(120):
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                return server
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit(f"mlflow ui did not answer on port {port} within a minute")


def screenshot(browser: str, url: str, path: Path, size: str = "1600,1000") -> None:
    """`url` as Chromium shows it after 20 s of the page's (virtual) time."""
    done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--window-size={size}", "--virtual-time-budget=20000", f"--screenshot={path}", url],
                          capture_output=True, text=True, timeout=120)
    if not path.exists():
        raise SystemExit(f"{browser} took no screenshot of {url}:\n{done.stderr[-2000:]}")
    print(f"{path}: {url}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ablation", help="the ablation file (its store, experiment and name)")
    parser.add_argument("--out", default="docs/images/ablation", help="folder for the PNGs")
    args = parser.parse_args()
    browser = next((b for b in BROWSERS if shutil.which(b)), None)
    if browser is None:
        raise SystemExit("no Chromium found: `apt-get install chromium` (Debian) and run again")

    import mlflow

    from vilbert.ablation.parent import STATE_FILE
    from vilbert.ablation.spec import load_ablation
    from vilbert.train.tracking import view_url

    ablation = load_ablation(args.ablation)
    state = ablation.output_dir / STATE_FILE
    if not state.exists():
        raise SystemExit(f"{ablation.name} has not run yet (no {state}): `vilbert ablate {args.ablation}` first")
    parent = json.loads(state.read_text())["parent_run_id"]
    client = mlflow.MlflowClient(ablation.uri)
    experiment = client.get_experiment_by_name(ablation.experiment).experiment_id
    finetunes = [r for r in client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent}' and "
                                                              "tags.`ablation.stage` != 'pretrain'")
                 if r.info.status == "FINISHED"]
    if not finetunes:
        raise SystemExit(f"{ablation.name} has no finished fine-tune to compare yet")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = serve(ablation.uri, port)
    try:
        base = f"http://127.0.0.1:{port}"
        screenshot(browser, view_url(experiment, ablation.name, base), out / "runs.png")
        ids = json.dumps([r.info.run_id for r in finetunes])
        screenshot(browser, f"{base}/#/compare-runs?runs={ids}&experiments={json.dumps([experiment])}"
                            "&workflowType=machine_learning",
                   out / "compare.png")
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
