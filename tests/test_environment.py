"""CPU threads and device choice from the job's environment (SLURM, torchrun, a laptop)."""

from __future__ import annotations

import os

import pytest
import torch

from oasis_ldm.distributed import DeviceError, pick_device, slurm_gave_gpus
from oasis_ldm.threads import available_cpus, configure_threads

MASK = len(os.sched_getaffinity(0))


def test_slurm_share_wins_over_the_mask():
    assert available_cpus({"SLURM_CPUS_PER_TASK": "1"}) == 1
    assert available_cpus({"SLURM_CPUS_PER_TASK": str(MASK + 10)}) == MASK  # never more than we may use


def test_torchrun_ranks_share_the_node_mask():
    assert available_cpus({"LOCAL_WORLD_SIZE": str(MASK)}) == 1
    assert available_cpus({}) == MASK
    # Under srun the mask is already the task's own: not divided again.
    assert available_cpus({"LOCAL_WORLD_SIZE": str(MASK), "SLURM_STEP_ID": "0"}) == MASK


def test_configure_threads_follows_slurm_unless_the_user_chose():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(max(2, MASK))
        assert configure_threads({"SLURM_CPUS_PER_TASK": "1"}) == 1 and torch.get_num_threads() == 1
        torch.set_num_threads(2)
        assert configure_threads({"SLURM_CPUS_PER_TASK": "1", "OMP_NUM_THREADS": "2"}) == 2
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_gpu_job_that_sees_no_gpu_fails_instead_of_falling_back(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "SLURM_GPUS_ON_NODE"):
        monkeypatch.delenv(name, raising=False)
    assert pick_device("auto") == torch.device("cpu")
    monkeypatch.setenv("SLURM_JOB_GPUS", "2,3")
    assert slurm_gave_gpus() == "SLURM_JOB_GPUS=2,3"
    with pytest.raises(DeviceError, match=r"SLURM gave this job GPUs \(SLURM_JOB_GPUS=2,3\) but torch sees no CUDA"):
        pick_device("auto")
    assert pick_device("cpu") == torch.device("cpu")  # asked for explicitly: allowed
    monkeypatch.setenv("SLURM_JOB_GPUS", "(null)")
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "0")
    assert pick_device("auto") == torch.device("cpu")
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "4")
    with pytest.raises(DeviceError, match="SLURM_GPUS_ON_NODE=4"):
        pick_device("auto")
