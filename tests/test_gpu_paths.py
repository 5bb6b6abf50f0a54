"""The GPU paths, checked on the CPU wherever the mechanism allows (issue 20): device mapping,
array GPU requests, HDF5 locking, host syncs, TF32, sampling noise, a failed peer, start-up
reads and the GPU check itself. What needs a device lives in test_cuda.py."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
import torch
from conftest import REPO, TINY, free_port, quiet_env, run_ranks, train_cmd
from test_metrics import _tf32_in_use, tf32_on  # noqa: F401 (a fixture)
from torch.overrides import TorchFunctionMode

from oasis_ldm.config import load_config
from oasis_ldm.distributed import DeviceError, DistEnv, pick_device


def load_bench(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_launcher(name: str):
    sys.path.insert(0, str(REPO / "launch"))  # the launchers import their `common` module
    try:
        spec = importlib.util.spec_from_file_location(f"launch_{name}", REPO / "launch" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(REPO / "launch"))


# --- 1. device mapping -----------------------------------------------------------------------------


@pytest.fixture
def fake_gpus(monkeypatch):
    """torch sees `count` CUDA devices; returns the indices set_device was given."""
    chosen: list[int] = []

    def see(count: int) -> list[int]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
        return chosen

    return see


def test_a_task_that_sees_a_share_of_the_gpus_takes_its_place_among_them(fake_gpus):
    """--gpu-bind=closest: 8 tasks, each seeing the 4 GPUs of its socket. Tasks 4-7 used to land
    on GPU 0 of theirs, all four of them."""
    chosen = fake_gpus(4)
    assert [pick_device("auto", local_rank).index for local_rank in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert chosen == [0, 1, 2, 3, 0, 1, 2, 3]
    fake_gpus(1)
    assert pick_device("auto", local_rank=3).index == 0  # a task bound to its own GPU


def views(host: str, seen: list[list[str]], first_rank: int = 0) -> list:
    from oasis_ldm.distributed import GpuView

    return [GpuView(first_rank + i, host, i, tuple(g), ",".join(g)) for i, g in enumerate(seen)]


def test_the_ranks_of_a_node_take_distinct_gpus_or_all_refuse_naming_what_they_see():
    from oasis_ldm.distributed import GpuView, assign_gpus

    all_eight = [f"G{i}" for i in range(8)]
    assert assign_gpus(views("n1", [all_eight] * 8)) == {r: r for r in range(8)}  # every task sees all
    sockets = [all_eight[:4]] * 4 + [all_eight[4:]] * 4  # --gpu-bind=closest, block distribution
    assert assign_gpus(views("n1", sockets)) == dict(enumerate([0, 1, 2, 3, 0, 1, 2, 3]))
    cyclic = [all_eight[:4], all_eight[4:]] * 4  # the same, tasks dealt to sockets in turn
    assert assign_gpus(views("n1", cyclic)) == dict(enumerate([0, 0, 1, 1, 2, 2, 3, 3]))
    own = [[g] for g in all_eight[:4]]  # --gpus-per-task=1: each task sees only its own
    assert assign_gpus(views("n1", own) + views("n2", own, first_rank=4)) == {r: 0 for r in range(8)}
    with pytest.raises(DeviceError) as refused:  # more tasks than GPUs: NCCL's "Duplicate GPU"
        assign_gpus(views("n1", [["G0", "G1"]] * 3))
    message = str(refused.value)
    assert "\n" not in message
    assert (
        "rank 2 (LOCAL_RANK=2) on n1 sees 2 GPU(s) (CUDA_VISIBLE_DEVICES=G0,G1), all taken by ranks [0, 1]" in message
    )
    mixed = [*views("n1", [["G0"]]), GpuView(1, "n2", 0, (), "unset", "cpu")]  # a node without a driver
    with pytest.raises(DeviceError, match=r"ranks \[0\] see a CUDA device and ranks \[1\] none"):
        assign_gpus(mixed)


def test_torchruns_local_rank_wins_over_the_srun_task_it_runs_in(monkeypatch, tmp_path):
    """torchrun inside one srun task: every worker has SLURM_LOCALID=0, and all sampled on GPU 0."""
    from oasis_ldm.sampling import worker

    asked = []

    class Stop(Exception):
        pass

    monkeypatch.setattr(worker, "pick_device", lambda device, local_rank: asked.append(local_rank))
    monkeypatch.setattr(worker, "load_pipeline", lambda *a: (_ for _ in ()).throw(Stop()))
    monkeypatch.setenv("SLURM_LOCALID", "0")
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(Stop):
        worker.sample_worker("x", tmp_path, None)
    assert asked == [3]


# --- 2. GPUs of array tasks, and 7. srun's kill-on-bad-exit -------------------------------------------


def dry_run(capsys, launcher: str, *args: str) -> str:
    assert load_launcher(launcher).main([*args, "--dry-run"]) == 0
    return capsys.readouterr().out


def test_an_array_task_asks_for_one_gpu_and_the_docstring_examples_ask_for_gpus(capsys, tmp_path):
    sample = ["--ckpt", "x", "--num-samples", "10", "--out", str(tmp_path / "s")]
    lines = dry_run(capsys, "sample", *sample, "--array", "4", "--gpus-per-node", "4").splitlines()
    assert "#SBATCH --gpus-per-node=1" in lines and "#SBATCH --ntasks-per-node=1" in lines
    assert "#SBATCH --array=0-3%4" in lines
    doc = load_launcher("sample").__doc__.replace("\\\n", " ")
    examples = [line.split("launch/sample.py", 1)[1].split() for line in doc.splitlines() if "launch/sample.py" in line]
    assert len(examples) == 2
    for example in examples:
        flags = [a for a in example if a != "\\"]
        assert "#SBATCH --gpus-per-node=" in dry_run(capsys, "sample", *flags), example


def test_training_jobs_pass_kill_on_bad_exit_to_srun_and_sampling_jobs_do_not(capsys, tmp_path):
    train = dry_run(capsys, "train", "--stage", "vae", "--config", "demo", "--run-dir", str(tmp_path / "r"))
    sample = dry_run(capsys, "sample", "--ckpt", "x", "--num-samples", "4", "--out", str(tmp_path / "s"))
    srun = [line for line in train.splitlines() if line.startswith("srun ")]
    assert len(srun) == 1 and "--kill-on-bad-exit=1" in srun[0].split()
    assert "--kill-on-bad-exit" not in sample  # independent workers: one failing ends no other


# --- 3. the latent cache's HDF5 files ------------------------------------------------------------------


def test_the_latent_cache_opens_every_file_without_hdf5_locking(tmp_path, tiny_h5, monkeypatch):
    """HDF5 file locks fail on NFS (errno 37): every open must pass locking=False."""
    from oasis_ldm.data.dataset import OasisH5Dataset
    from oasis_ldm.models import DiagonalGaussian
    from oasis_ldm.train import latent_cache

    opens = []
    real_file = h5py.File

    def spy(name, mode="r", *args, **kwargs):
        opens.append((Path(name).name, mode, kwargs.get("locking")))
        return real_file(name, mode, *args, **kwargs)

    monkeypatch.setattr(latent_cache.h5py, "File", spy)
    images = OasisH5Dataset(tiny_h5, "train", raw=True)
    encode = lambda rows, flip: DiagonalGaussian(torch.zeros(len(rows), 4, 2, 2))  # noqa: E731
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    path = latent_cache.build_latent_cache(tmp_path / "latents.h5", images, encode, env, {"vae_sha256": "x"}, True)
    latent_cache.LatentDataset(path)
    assert {mode for _, mode, _ in opens} == {"r", "w"} and len(opens) >= 4  # part, merge, check, read
    assert all(locking is False for _, _, locking in opens), opens
    library = [p for p in (REPO / "oasis_ldm").rglob("*.py") if "h5py.File(" in p.read_text()]
    for source in library:  # and so does every other open in the library
        calls = re.findall(r"h5py\.File\([^)]*\)", source.read_text())
        assert all("locking=False" in call for call in calls), (source, calls)


# --- 4. one host sync per step --------------------------------------------------------------------------


def test_every_training_mode_makes_one_host_sync_per_step(tiny_paired_h5):
    """The guard's one read: crop boxes used to be a tensor made from Python values on the device,
    and paired masks a table copied to the device and a bool() read, every micro-batch."""
    result = load_bench("step_probe").count_syncs(tiny_paired_h5, "cpu", TINY, steps=1)
    assert set(result) == set(load_bench("step_probe").MODES)
    assert {mode: r["per_step"] for mode, r in result.items()} == {mode: 1.0 for mode in result}, result


def test_the_sync_spy_sees_what_would_synchronise_on_a_gpu():
    spy = load_bench("step_probe").SyncSpy()
    table, x = torch.arange(4), torch.ones(3)
    with spy:
        y = x * 2
        y.to("cpu")  # made here: on a GPU it is already there
        table.to("cpu", non_blocking=True)  # pinned and non-blocking: no wait
        y.sum().item()
        torch.tensor([1.0, 2.0])
        table.to("cpu")  # a host table copied each time
        y[y > 1]
    assert spy.calls == ["item", "tensor", "to", "__getitem__"]


# --- 5. TF32 in the fp32 paths -----------------------------------------------------------------------


def test_ssim_loss_frozen_encoder_and_sampling_decoder_run_in_ieee_fp32(
    tf32_on,  # noqa: F811 (the fixture)
    monkeypatch,
    tmp_path,
    tiny_h5,
    tiny_vae,
    tiny_ldm,
):
    """cuDNN's default TF32 moved per-image SSIM by up to 0.007. The caller's setting stays for the
    models' own layers (the U-Net) and is back afterwards."""
    from oasis_ldm.loading import load_pipeline
    from oasis_ldm.train.context import StepContext
    from oasis_ldm.train.loop import build_stage
    from oasis_ldm.train.losses import ssim_loss

    seen: dict[str, list[bool]] = {"ssim": [], "encoder": [], "decoder": [], "unet": []}
    real_conv = torch.nn.functional.conv2d

    def conv_spy(*args, **kwargs):
        seen["ssim"].append(_tf32_in_use())
        return real_conv(*args, **kwargs)

    x = torch.rand(2, 1, 32, 32, requires_grad=True)
    with monkeypatch.context() as patch:
        patch.setattr(torch.nn.functional, "conv2d", conv_spy)
        ssim_loss(x * 2 - 1, torch.rand(2, 1, 32, 32) * 2 - 1).backward()  # forward and backward
    cfg = load_config(TINY, [f"data.path={tiny_h5}", f"ldm.vae_ckpt={tiny_vae}", "data.augment=flip"], stage="ldm")
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    stage = build_stage("ldm", cfg, env, tmp_path)
    hook = lambda name: lambda module, inputs: seen[name].append(_tf32_in_use())  # noqa: E731
    stage.vae.encoder.register_forward_pre_hook(hook("encoder"))
    stage.encode_rows([0, 1])  # the scale factor and the latent cache
    stage.scale_factor = 1.0
    stage.latents(torch.stack([stage.images[i] for i in range(4)]), StepContext(1, 0, 1, env, 0, False))
    pipe, _ = load_pipeline(tiny_ldm)
    pipe.vae.decoder.register_forward_pre_hook(hook("decoder"))
    pipe.unet.register_forward_pre_hook(hook("unet"))
    pipe.generate([1, 2], steps=2)
    assert len(seen["ssim"]) >= 10 and len(seen["encoder"]) == 2 and seen["decoder"] and seen["unet"]
    assert not any(seen["ssim"] + seen["encoder"] + seen["decoder"]), seen
    assert all(seen["unet"]) and _tf32_in_use()


# --- 6. sampling noise ---------------------------------------------------------------------------------


class Copies(TorchFunctionMode):
    """Every `Tensor.to` that names a device: (its non_blocking flag)."""

    def __init__(self) -> None:
        super().__init__()
        self.non_blocking: list[bool] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        named = "device" in kwargs or any(isinstance(a, (torch.device, str)) for a in args[1:2])
        if func is torch.Tensor.to and named:
            self.non_blocking.append(bool(kwargs.get("non_blocking", False)))
        return func(*args, **kwargs)


def test_step_noise_moves_to_the_device_in_non_blocking_copies_of_the_same_draws(tiny_ldm):
    """A blocking copy from pageable memory made the host wait for the whole stream each step."""
    from oasis_ldm.loading import load_pipeline
    from oasis_ldm.rng import ImageGenerators

    pipe, _ = load_pipeline(tiny_ldm)
    copies = Copies()
    x_T = torch.zeros(2, *pipe.latent_shape)
    with copies:  # DDIM with eta 1: fresh noise after every step but the last, as DDPM draws it
        pipe.diffusion.sample(pipe.unet, x_T, "ddim", steps=4, eta=1.0, noise=ImageGenerators([5, 6]))
    assert len(copies.non_blocking) == 3 and all(copies.non_blocking)
    drawn = ImageGenerators([5, 6]).randn((3, 4, 4), "cpu")
    alone = [torch.randn((3, 4, 4), generator=torch.Generator().manual_seed(s)) for s in (5, 6)]
    assert torch.equal(drawn, torch.stack(alone))  # image b's numbers still come from its seed alone


# --- 7. a failed peer ------------------------------------------------------------------------------------


def test_a_rank_whose_peers_never_join_stops_within_the_startup_timeout():
    """Rank 0 alone waits for its peers, rank 1 alone for rank 0: both stop, in one line, after
    the start-up timeout (2 s here) instead of the 30-minute collective timeout."""
    code = (
        "import sys, oasis_ldm.distributed as d\n"
        "d.STARTUP_TIMEOUT_S = 2.0\n"
        "try:\n    d.init_distributed('cpu')\n"
        "except d.PeerError as e:\n    sys.exit(str(e))\n"
    )
    procs = []
    for rank in (0, 1):
        env = quiet_env(
            RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
        )
        procs.append(
            subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO, stderr=subprocess.PIPE, text=True)
        )
    t0 = time.monotonic()
    errors = [proc.communicate(timeout=60)[1].strip().splitlines()[-1] for proc in procs]
    assert time.monotonic() - t0 < 45
    assert "rank 0 of 2: not every rank joined at 127.0.0.1:" in errors[0] and "within 2 s" in errors[0]
    assert "rank 1 of 2: could not reach rank 0 at 127.0.0.1:" in errors[1]


@pytest.mark.slurm
@pytest.mark.slow
def test_a_rank_that_fails_to_start_ends_the_submitit_job_within_a_minute(tmp_path, tiny_h5):
    """Rank 1 of a two-node submitit job finds no GPU (its SLURM_JOB_GPUS says it has one) and
    raises before joining; rank 0 would wait in the rendezvous. srun's --kill-on-bad-exit ends the
    job at once, and rank 1's log names the error in one line."""
    import slurm_cluster as sc
    from jobs import job_ids, launch

    env = quiet_env(**sc.require_cluster())
    site = tmp_path / "site"
    site.mkdir()  # imported by every Python of the job: rank 1 is told it has a GPU
    (site / "sitecustomize.py").write_text(
        'import os\nif os.environ.get("SLURM_PROCID") == "1":\n    os.environ["SLURM_JOB_GPUS"] = "0"\n'
    )
    env["PYTHONPATH"] = f"{site}{os.pathsep}{env['PYTHONPATH']}"
    run_dir = tmp_path / "run"
    sets = [f"--set=data.path={tiny_h5}", "--set=train.device=auto"]
    args = ["--stage", "vae", "--config", TINY, "--run-dir", str(run_dir), *sets]
    cluster = ["--cluster", "slurm", "--nodes", "2", "--tasks-per-node", "1", "--time", "10"]
    (job_id,) = job_ids(launch("train.py", *args, *cluster, env=env), "vae training")
    try:
        sc.wait_for_state(int(job_id), ["RUNNING", *sc.FINISHED_STATES], timeout=30)
        t0 = time.monotonic()
        state = sc.wait_for_state(int(job_id), sc.FINISHED_STATES, timeout=60)
        took = time.monotonic() - t0
    finally:
        sc.cancel(int(job_id))
    assert state == "FAILED" and took < 60
    err = (run_dir / "submitit" / job_id / f"{job_id}_1_log.err").read_text()
    lines = [line for line in err.splitlines() if "DeviceError:" in line]
    assert len(lines) == 1 and "SLURM gave this job GPUs (SLURM_JOB_GPUS=0) but torch sees no CUDA device" in lines[0]


# --- 8. start-up reads -----------------------------------------------------------------------------------


READ_SPY = """
import atexit, builtins, io, os, pathlib, sys
watched = os.path.realpath(sys.argv.pop(1))
reads = [0]
real_open, real_read_bytes = builtins.open, pathlib.Path.read_bytes
def spy_open(file, mode="r", *args, **kwargs):
    if isinstance(file, (str, os.PathLike)) and os.path.realpath(file) == watched and "r" in mode:
        reads[0] += 1
    return real_open(file, mode, *args, **kwargs)
def spy_read_bytes(self):
    if os.path.realpath(self) == watched:
        reads[0] += 1
    return real_read_bytes(self)
builtins.open, pathlib.Path.read_bytes = spy_open, spy_read_bytes
atexit.register(lambda: print(f"vae reads: {reads[0]}"))
from oasis_ldm.train.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def test_an_ldm_start_reads_its_autoencoder_on_rank0_only(tmp_path, tiny_h5, tiny_vae):
    """Every rank read the vae checkpoint five times (preflight, the stage, two sha256 passes):
    16 ranks and 300 MB made 20 GB off shared storage. Now rank 0 reads it for the job."""
    vae = tiny_vae / "checkpoints" / "last.pt"
    args = train_cmd("ldm", tmp_path / "ldm", tiny_h5, f"ldm.vae_ckpt={tiny_vae}", "train.max_steps=1")[3:]
    results = run_ranks([[sys.executable, "-c", READ_SPY, str(vae), *args]] * 2, timeout=240)
    assert all(r.returncode == 0 for r in results), [r.stderr[-2000:] for r in results]
    reads = [int(re.findall(r"vae reads: (\d+)", r.stdout)[-1]) for r in results]
    assert reads == [2, 0]  # rank 0: the start check and the stage's read (hashed from its bytes)


# --- 11. the GPU check ------------------------------------------------------------------------------------


def test_the_gpu_check_works_in_a_fresh_folder_and_keeps_its_json_line_through_sigterm(tmp_path):
    cmd = [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device", "cpu", "--quick", "--out", str(tmp_path)]
    env = quiet_env(PYTHONUNBUFFERED="1")
    for _ in range(2):
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            if line.startswith("== vae:"):  # a training child is running
                break
        time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
        result = __import__("json").loads(out.strip().splitlines()[-1])
        assert proc.returncode == 1 and result["interrupted"] == "SIGTERM"
        assert Path(result["out"]).parent == tmp_path and (Path(result["out"]) / "result.json").exists()
    assert len(list(tmp_path.iterdir())) == 2  # two runs, two folders: the second never saw the first's


def test_the_gpu_check_compares_every_logged_step():
    diff = load_bench("gpu_check").largest_difference
    a = {"loss/l1": {1: 1.0, 2: 0.5, 3: 0.25}}
    assert diff(a, {"loss/l1": {1: 1.0, 2: 0.5, 3: 0.25}}, range(1, 4)) == 0.0
    assert diff(a, {"loss/l1": {1: 1.0, 2: 0.55, 3: 0.25}}, range(1, 4)) == pytest.approx(0.05 / 0.55)
    assert diff(a, {"loss/l1": {1: 1.0, 3: 0.25}}, range(1, 4)) == float("inf")  # a step missing
    late = {"loss/g_adv": {3: 0.7}}  # a term that starts later, in both runs
    assert diff({**a, **late}, {**a, **late}, range(1, 4)) == 0.0
