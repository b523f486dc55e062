"""Installs like a real tool: the wheel built from this tree, installed (not editable) into a
fresh virtualenv and run from another folder, has every shipped task, study, reference, claims
file and run config, and trains. The fresh venv takes its dependencies from the test's own
environment (a path entry, no download), but the adapterbench it runs is the wheel's."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def run(cmd, **kw):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert p.returncode == 0, (cmd, p.stdout[-3000:], p.stderr[-3000:])
    return p.stdout


def test_wheel_installs_and_runs_outside_the_checkout(tmp_path, task_yamls, data_dir):
    import site
    import sysconfig
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
         str(ROOT)])
    wheel = next((tmp_path / "dist").glob("adapterbench-*.whl"))
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    py = venv / "bin" / "python"
    run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)])
    target = Path(run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())
    deps = [p for p in (*site.getsitepackages(), sysconfig.get_paths()["purelib"]) if Path(p).is_dir()]
    (target / "zz_deps.pth").write_text("\n".join(dict.fromkeys(deps)) + "\n")   # plain paths: no editable hooks
    away = tmp_path / "elsewhere"
    away.mkdir()
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path),
           "ADAPTERBENCH_CACHE": str(tmp_path / "cache")}
    where = run([str(py), "-c", "import adapterbench; print(adapterbench.__file__)"], cwd=away, env=env)
    assert str(target) in where and str(ROOT) not in where
    out = run([str(venv / "bin" / "adapterbench"), "ls", "tasks"], cwd=away, env={**env, "COLUMNS": "200"})
    assert all(t in out for t in ("rte", "mrpc", "stsb", "sst2", "cola", "mnli_mismatched", "sick", "cb"))
    run([str(venv / "bin" / "adapterbench"), "validate", "quickstart"], cwd=away, env=env)   # a shipped study by name
    run([str(venv / "bin" / "adapterbench"), "validate", str(target / "adapterbench" / "configs" / "claims" /
                                                              "reproduce_minilm.yaml")], cwd=away, env=env)
    out = run([str(venv / "bin" / "adapterbench"), "extract", "--task", str(task_yamls["toy"]), "--model", "tiny-bert",
               "--data-dir", str(data_dir), "--out", str(away / "runs"), "train.max_steps=2"], cwd=away, env=env)
    assert (next((away / "runs").glob("extract/pfeiffer/toy/*")) / "metrics.json").is_file()
    assert (target / "adapterbench" / "interop" / "peer_bench.py").is_file()        # bench --peer works installed


def test_installed_script_survives_sigusr1_outside_training(tmp_path, task_yamls, data_dir):
    """The README tells users to send USR1 before a job's time ends: the installed console script
    enters through cli.main() like `python -m adapterbench`, so a USR1 that arrives while no
    training loop runs (here: a study waiting for a run another worker holds) is ignored."""
    import json
    import os
    import signal
    import socket
    import time
    from adapterbench.study import plan as S
    y = tmp_path / "study.yaml"
    y.write_text(f"name: w\ntasks: [{task_yamls['toy']}]\nseeds: [1]\nmodels: [tiny-bert]\nout_dir: {tmp_path / 'runs'}\n"
                 f"defaults: {{data: {{data_dir: {data_dir}}}, train: {{max_steps: 1, log_with: [none]}}}}\n"
                 f"methods: [{{name: pfeiffer}}]\n")
    os.environ["ADAPTERBENCH_CACHE"] = str(tmp_path / "cache")
    node = S.plan(S.load_study(y))[0]
    node.folder.parent.mkdir(parents=True, exist_ok=True)
    now = time.time()
    lock = node.folder.with_name(node.folder.name + ".lock")
    lock.write_text(json.dumps({"pid": 1, "host": socket.gethostname() + "-elsewhere", "job": None, "started": now,
                                "heartbeat": now}))                  # held by a live worker on another host
    script = Path(sys.executable).parent / "adapterbench"
    proc = subprocess.Popen([str(script), "run", str(y)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        time.sleep(15)                                               # planned, now waiting for the other worker
        assert proc.poll() is None
        proc.send_signal(signal.SIGUSR1)
        time.sleep(3)
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
