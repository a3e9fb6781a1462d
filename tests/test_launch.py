"""Launchers and multi-host start-up requests: the commands and variables they produce."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from lm.runtime.distributed import DistributedSpec, resolve

LAUNCH = Path(__file__).resolve().parent.parent / "launch"


def sh(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None):
    return subprocess.run(
        ["bash", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def test_local_launcher_wires_each_process_to_one_loopback_coordinator():
    shown = 'echo "$LM_PROCESS_ID/$LM_NUM_PROCESSES $LM_COORDINATOR $JAX_NUM_CPU_DEVICES"'
    out = sh(str(LAUNCH / "local.sh"), "3", "bash", "-c", shown, env={"LM_LOCAL_DEVICES": "2"})
    assert out.returncode == 0, out.stderr
    lines = sorted(out.stdout.split("\n")[:-1])
    assert [line.split()[0] for line in lines] == ["0/3", "1/3", "2/3"]
    coordinators = {line.split()[1] for line in lines}
    assert len(coordinators) == 1 and coordinators.pop().startswith("127.0.0.1:")
    assert {line.split()[2] for line in lines} == {"2"}


def test_local_launcher_returns_the_first_failure_and_stops_the_others():
    script = '[ "$LM_PROCESS_ID" = 1 ] && exit 3; sleep 30'
    start = time.monotonic()
    out = sh(str(LAUNCH / "local.sh"), "2", "bash", "-c", script, env={"LM_GRACE_S": "1"})
    assert out.returncode == 3
    assert time.monotonic() - start < 15  # the sleeping process was stopped, not waited for
    assert "a process exited with status 3" in out.stderr
    assert sh(str(LAUNCH / "local.sh"), "x", "true").returncode == 2


def test_tpu_vm_dry_run_prints_the_gcloud_commands():
    out = sh(
        str(LAUNCH / "tpu_vm.sh"),
        *("--name", "lm-pod", "--zone", "us-east5-a", "--run-dir", "gs://bucket/run"),
        *("--accelerator-type", "v5p-512", "--version", "v2-alpha-tpuv5", "--project", "p1"),
        *("--config", "configs/big.yaml", "--spot", "--delete", "--dry-run"),
        *("--", "model.remat=full", "train.sample_prompt=ROMEO: hi"),
    )
    assert out.returncode == 0, out.stderr
    where = "--zone=us-east5-a --project=p1"
    assert out.stdout.splitlines() == [
        f"+ gcloud compute tpus tpu-vm create lm-pod {where} --accelerator-type=v5p-512 "
        "--version=v2-alpha-tpuv5 --spot",
        "+ git archive --format=tar.gz -o /tmp/lm-src.tar.gz HEAD",
        f"+ gcloud compute tpus tpu-vm scp /tmp/lm-src.tar.gz lm-pod:lm-src.tar.gz {where} "
        "--worker=all",
        f"+ gcloud compute tpus tpu-vm ssh lm-pod {where} --worker=all --command 'mkdir -p ~/lm "
        '&& tar xzf ~/lm-src.tar.gz -C ~/lm && python3 -m pip install -q -e "$HOME/lm[tpu]"\'',
        f"+ gcloud compute tpus tpu-vm ssh lm-pod {where} --worker=all --command 'cd ~/lm && "
        "python3 -m lm pretrain --config configs/big.yaml train.run_dir=gs://bucket/run "
        "model.remat=full train.sample_prompt=ROMEO:\\ hi'",
        f"+ gcloud compute tpus tpu-vm delete lm-pod {where} --quiet",
    ]


def test_tpu_vm_names_a_missing_flag():
    out = sh(str(LAUNCH / "tpu_vm.sh"), "--name", "x", "--zone", "z", "--dry-run")
    assert out.returncode == 2
    assert "--run-dir is required" in out.stderr


def test_slurm_script_takes_coordinator_and_ranks_from_slurm(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text('#!/bin/sh\nprintf "gpu-a17\\ngpu-a18\\n"\n')
    # srun runs the task command once per task, as SLURM would on each node.
    (fake / "srun").write_text(
        "#!/usr/bin/env bash\nshift\nfor ((i = 0; i < SLURM_NTASKS; i++)); do "
        'SLURM_PROCID=$i "$@"; done\n'
    )
    for tool in fake.iterdir():
        tool.chmod(0o755)
    env = {
        "PATH": f"{fake}:{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "gpu-a[17-18]",
        "SLURM_NTASKS": "2",
        "SLURM_JOB_ID": "1234",
        "SLURM_JOB_NUM_NODES": "2",
    }
    shown = 'echo "$LM_COORDINATOR $LM_NUM_PROCESSES $LM_PROCESS_ID"'
    out = sh(str(LAUNCH / "slurm.sbatch"), "bash", "-c", shown, env=env)
    assert out.returncode == 0, out.stderr
    port = 61440 + 1234 % 4096
    assert out.stdout.splitlines()[1:] == [f"gpu-a17:{port} 2 0", f"gpu-a17:{port} 2 1"]


def test_gpu_launcher_installs_the_cuda_extra_and_sets_memory_and_xla_flags():
    out = sh(str(LAUNCH / "gpu.sh"), "--dry-run", "finetune", "--config", "c.yaml", env={})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION=0.90" in lines[0]
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in lines[0]
    assert lines[1:] == [
        "+ python3 -m pip install -q -e .[cuda]",
        "+ python3 -m lm finetune --config c.yaml",
    ]


def test_single_process_runs_never_ask_for_jax_distributed():
    assert resolve(env={}, tpu_present=False) is None
    assert resolve(env={"SLURM_NTASKS": "1"}, tpu_present=False) is None
    one = {"LM_COORDINATOR": "h:1", "LM_NUM_PROCESSES": "1", "LM_PROCESS_ID": "0"}
    assert resolve(env=one, tpu_present=False) is None


def test_multi_host_requests_come_from_flags_then_env_then_slurm_then_tpu():
    env = {
        "LM_COORDINATOR": "10.0.0.1:1234",
        "LM_NUM_PROCESSES": "4",
        "LM_PROCESS_ID": "3",
        "SLURM_NTASKS": "8",
        "LM_HEARTBEAT_S": "7",
    }
    assert resolve("h:9", 2, 1, env=env) == DistributedSpec("flags", "h:9", 2, 1, 7, 300)
    assert resolve(env=env) == DistributedSpec("env", "10.0.0.1:1234", 4, 3, 7, 300)
    assert resolve(env={"SLURM_NTASKS": "8"}, tpu_present=True).source == "slurm"
    assert resolve(env={}, tpu_present=True) == DistributedSpec("tpu")
    off = {"LM_DISTRIBUTED": "off", "SLURM_NTASKS": "8"}
    assert resolve(env=off, tpu_present=True) is None


@pytest.mark.parametrize(
    "flags, env, message",
    [
        (("h:1", 2, None), {}, "go together"),
        ((None, None, None), {"LM_COORDINATOR": "h:1"}, "LM_NUM_PROCESSES, LM_PROCESS_ID not set"),
        (("h:1", 2, 2), {}, r"Process id 2 is not in \[0, 2\)"),
        (
            (None, None, None),
            {"LM_COORDINATOR": "h:1", "LM_NUM_PROCESSES": "two", "LM_PROCESS_ID": "0"},
            "LM_NUM_PROCESSES='two' must be a whole number",
        ),
    ],
)
def test_incomplete_multi_host_requests_say_what_is_missing(flags, env, message):
    with pytest.raises(ValueError, match=message):
        resolve(*flags, env=env, tpu_present=False)
