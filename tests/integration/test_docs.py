"""The documentation's commands, run: every command of the README and the first example of
every page of docs/, as written, on small inputs, in a scratch directory that holds the
project's configs.

"Small inputs" is the only change a command gets, and every change is in the table below:
fewer toy-world images, two training steps of a few samples, two CPU processes for eight
GPUs, a dry run for a SLURM submission, a free port. A command that would stop doing what
the page says when run this way fails here."""

import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import transformers

from helpers import ENV, ROOT, write_hub_model

PAGES = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
# What every training command of the docs adds, so that it runs in seconds (the toy world it
# reads is the scratch directory's, written by an earlier command of the same page).
SMALL_RUN = ["optim.steps=2", "eval.every_steps=0", "eval.max_batches=1", "eval.probe_images=4", "data.batch_size=4",
             "optim.global_batch_size=8", "checkpoint.every_steps=2", "tracking.log_every=1", "data.shuffle_buffer=16"]
SMALL_SIZES = [(r"--images \d+", "--images 64"), (r"--val-images \d+", "--val-images 16"),
               (r"--steps \d+", "--steps 1"), (r"--num_gpus \d+", "--num_gpus 2")]  # two CPU processes for 8 GPUs
TRAINS = re.compile(r"(vilbert|--module vilbert|launch/slurm\.py) (pretrain|finetune)\b")
NOT_RUN = {  # commands that are not run here, and why that is sound
    "make test": "the command that runs these tests",
    "pip install": "what `make install` runs before the tests (checked against the Makefile below)",
}


def code_blocks(path: Path) -> list[tuple[str, str]]:
    return re.findall(r"^```(\w*)\n(.*?)^```", path.read_text(), re.S | re.M)


def commands(block: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.split(" #")[0].strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def scratch(tmp_path):
    """A directory that looks like the project root (configs, DeepSpeed files, launcher,
    benchmarks) with a Hugging Face cache holding a tiny `bert-base-uncased`, as
    `hf download` leaves it (paper.yaml names it), and a small caption shard set."""
    for name in ("configs", "deepspeed_configs", "launch", "benchmarks", "Makefile"):
        (tmp_path / name).symlink_to(ROOT / name)
    write_hub_model(tmp_path / "hub", "bert-base-uncased", transformers.BertForMaskedLM(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)))
    from shards.toyworld import write_toyworld

    write_toyworld(tmp_path / "captions", 64, 16, feature_dim=32)  # what a SLURM dry run checks the config against
    env = {**ENV, "HF_HUB_CACHE": str(tmp_path / "hub"), "DS_ACCELERATOR": "cpu", "TQDM_DISABLE": "1"}
    return tmp_path, env


def run_small(command: str, cwd: Path, env: dict) -> None:
    """`command` on small inputs (the changes named in the module's tables), checked."""
    for pattern, small in SMALL_SIZES:
        command = re.sub(pattern, small, command)
    argv = shlex.split(command)
    if argv[0] == "vilbert":
        argv = [sys.executable, "-m", "vilbert", *argv[1:]]
    if argv[0] == "python":
        argv[0] = sys.executable
    world = cwd / "runs/toyworld"
    if "launch/slurm.py" in command:  # the sbatch script, after every check a submission makes
        argv += ["--dry-run", f"data.shards={cwd}/captions/train", f"eval.shards={cwd}/captions/val"]  # for CC
    elif TRAINS.search(command):
        argv += SMALL_RUN
    if argv[:2] == ["make", "demo"]:
        argv = ["make", "-o", "install", "demo", f"PY={sys.executable}", f"TOY={world}", "TOY_IMAGES=64",
                "TOY_VAL_IMAGES=16", "ARGS=" + " ".join([f"output_dir={cwd}/runs/toy", f"data.shards={world}/train",
                                                          f"eval.shards={world}/val", *SMALL_RUN])]
    if argv[0] == "mlflow":
        return serve_once(argv, cwd, env)
    done = subprocess.run(argv, cwd=ROOT if argv[0] == "make" else cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"{command}\n{shlex.join(argv)}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"


def serve_once(argv: list[str], cwd: Path, env: dict) -> None:
    """`mlflow ui ...` answers on its port (a free one) with the runs of the store it names."""
    port = _free_port()
    argv = [*argv[:argv.index("--port") + 1], str(port)] if "--port" in argv else [*argv, "--port", str(port)]
    server = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(120):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/") as page:
                    assert page.status == 200
                    return
            except OSError:
                assert server.poll() is None, server.stderr.read()[-2000:]
                time.sleep(0.5)
        raise AssertionError(f"{shlex.join(argv)} did not answer within a minute")
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_every_page_is_in_the_readme_table_and_the_readme_is_a_front_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert set(PAGES) == set(re.findall(r"\(docs/([\w-]+\.md)\)", readme))


def test_the_readme_pip_commands_are_what_make_install_runs():
    install = (ROOT / "Makefile").read_text().split("install:")[1].split("\n\n")[0]
    pip = [c for lang, b in code_blocks(ROOT / "README.md") if lang == "bash" for c in commands(b)
           if c.startswith("pip install")]
    assert len(pip) == 3
    for command in pip:
        package = command.split("pip install ")[1].split()[-1].strip('"')
        assert package.replace('".', ".").strip('"') in install.replace('"', ""), (command, install)


def test_the_readme_commands(scratch):
    cwd, env = scratch
    ran = []
    for lang, block in code_blocks(ROOT / "README.md"):
        for command in commands(block) if lang == "bash" else []:
            if not any(command.startswith(skipped) for skipped in NOT_RUN):
                run_small(command, cwd, env)
                ran.append(command.split()[0])
    assert ran == ["make", "python", "deepspeed", "mlflow", "vilbert"]  # the demo, SLURM, one node, MLflow, ablation


@pytest.mark.parametrize("page", PAGES)
def test_the_first_example_of_every_page(scratch, page):
    cwd, env = scratch
    runnable = [(lang, block) for lang, block in code_blocks(ROOT / "docs" / page) if lang in ("bash", "python")]
    if page in ("architecture.md", "troubleshooting.md"):  # pictures and prose: nothing to run
        assert not runnable
        return
    lang, block = runnable[0]
    if lang == "python":
        done = subprocess.run([sys.executable, "-c", block], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return
    for command in commands(block):
        run_small(command, cwd, env)
