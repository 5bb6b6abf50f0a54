"""Never destroy a user's files, never strand a run: output guards, portable runs, full and
read-only disks, and the one-line answers to a tired user's mistakes.

Most commands run in this process through their own `main` (the same code as the command
line, without a new interpreter per case); full and read-only disks run in a private mount
namespace (tests/disk_driver.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import REPO, TINY, blob_images, quiet_env

from oasis_ldm import checkpoint
from oasis_ldm.data.pack import PackError, PackOptions, pack

pytestmark = pytest.mark.slow


def load_script(path: Path, name: str):
    """A command-line script (tools/, launch/) as a module, its folder importable as it expects."""
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def here(monkeypatch, capsys):
    """Run a command's main in this process: (exit status, stdout, the lines of stderr)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_JOB_ID", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)

    def call(main, *argv) -> tuple[int, str, list[str]]:
        capsys.readouterr()
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:
            rc = e.code
        out, err = capsys.readouterr()
        lines = [line for line in err.splitlines() if line.strip() and "it/s]" not in line and "%|" not in line]
        return rc, out, lines

    return call


def one_error(result: tuple[int, str, list[str]], *fragments: str) -> str:
    rc, out, lines = result
    assert rc not in (0, None), out
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def flag_error(result: tuple[int, str, list[str]], fragment: str) -> None:
    """argparse's answer to a bad flag: exit status 2, its usage, then one line naming the flag."""
    rc, _, lines = result
    assert rc == 2 and fragment in lines[-1] and not any("Traceback" in line for line in lines), lines


def train_main():
    from oasis_ldm.train.__main__ import main

    return main


def train_args(run_dir: Path, data: Path | str, *sets: str, stage: str = "vae") -> list[str]:
    return ["--stage", stage, "--config", TINY, "--run-dir", run_dir, "--set", f"data.path={data}"] + [
        arg for s in sets for arg in ("--set", s)
    ]


def run_json(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


# --- 1. evaluate --out ----------------------------------------------------------------------------


def write_samples(path: Path, images: np.ndarray) -> Path:
    with h5py.File(path, "w") as f:
        f["images"] = images
        f.attrs["image_size"] = images.shape[-1]
    return path


def test_evaluate_never_writes_over_its_inputs_or_files_it_did_not_make(tmp_path, here, tiny_h5, tiny_vae):
    evaluate = load_script(REPO / "tools" / "evaluate.py", "evaluate_tool").main
    victim = tmp_path / "victim.h5"
    shutil.copyfile(tiny_h5, victim)
    before = victim.read_bytes()
    recon = ["--split", "test", "--vae-ckpt", tiny_vae]
    one_error(here(evaluate, "--data", victim, *recon, "--out", victim), "is the --data input")
    samples = write_samples(tmp_path / "samples.h5", blob_images(4, 32, seed=3))
    one_error(here(evaluate, "--data", tiny_h5, "--samples", samples, "--out", samples), "is the --samples input")
    one_error(here(evaluate, "--data", tiny_h5, *recon, "--out", tmp_path / "r.png"), "give the report a .json name")
    notes = tmp_path / "notes.json"
    notes.write_text('{"my": "notes"}')
    one_error(here(evaluate, "--data", tiny_h5, *recon, "--out", notes), "is not a report or picture of evaluate")
    (tmp_path / "mine.png").write_bytes(b"my own picture")
    one_error(here(evaluate, "--data", tiny_h5, *recon, "--out", tmp_path / "mine.json"), "--out's picture")
    assert victim.read_bytes() == before and notes.read_text() == '{"my": "notes"}'
    assert (tmp_path / "mine.png").read_bytes() == b"my own picture" and not (tmp_path / "mine.json").exists()
    for _ in range(2):  # what evaluate wrote it may write again
        rc, out, _ = here(evaluate, "--data", tiny_h5, *recon, "--out", tmp_path / "good.json")
        assert rc == 0 and "wrote" in out
    assert json.loads((tmp_path / "good.json").read_text())["made_by"].startswith("oasis-ldm evaluate")


# --- 2, 3. a run directory ------------------------------------------------------------------------------


def test_a_folder_that_never_held_a_run_is_refused_and_left_alone(tmp_path, here, tiny_h5):
    user = tmp_path / "userdir"
    (user / "images").mkdir(parents=True)
    (user / "images" / "holiday.png").write_bytes(b"mine")
    (user / "notes.txt").write_text("mine")
    one_error(here(train_main(), *train_args(user, tiny_h5)), "holds 'images'", "but no run.json")
    assert sorted(p.name for p in user.rglob("*")) == ["holiday.png", "images", "notes.txt"]


def test_a_fresh_start_removes_only_what_run_json_lists(tmp_path, here, tiny_h5):
    run = tmp_path / "run"
    rc, _, _ = here(train_main(), *train_args(run, tiny_h5, "train.max_steps=2", "train.image_every=1"))
    assert rc == 0
    listed = run_json(run)["outputs"]
    assert {"images/images_input_vs_reconstruction_00000001.png"} <= set(listed)
    assert any(name.startswith("tb/events.out.tfevents.") for name in listed)
    (run / "images" / "mine.png").write_bytes(b"mine")
    foreign = run / "tb" / "events.out.tfevents.1.otherhost.1.0"
    foreign.write_bytes(b"someone else's")
    shutil.rmtree(run / "checkpoints")
    rc, out, _ = here(train_main(), *train_args(run, tiny_h5, "train.max_steps=1", "train.image_every=100"))
    assert rc == 0 and f"removing the {len(listed)} outputs" in out
    assert (run / "images" / "mine.png").read_bytes() == b"mine" and foreign.read_bytes() == b"someone else's"
    assert not (run / "images" / "images_input_vs_reconstruction_00000002.png").exists()  # the old run's


def test_fixed_paths_of_another_kind_are_refused_before_anything_is_removed(tmp_path, here, tiny_h5):
    run = tmp_path / "run"
    assert here(train_main(), *train_args(run, tiny_h5, "train.max_steps=1"))[0] == 0
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").write_text("not a folder")
    before = sorted(str(p) for p in run.rglob("*"))
    one_error(here(train_main(), *train_args(run, tiny_h5)), "checkpoints is a file where the run keeps")
    assert sorted(str(p) for p in run.rglob("*")) == before  # events and images still there
    (run / "checkpoints").unlink()
    (run / "lock").mkdir()
    one_error(here(train_main(), *train_args(run, tiny_h5)), "lock: is not this project's lock file")
    assert (run / "lock").is_dir() and not list(run.glob("lock.stale.*"))


# --- 4. pack_h5 --out -----------------------------------------------------------------------------------


def test_pack_refuses_an_out_inside_src_and_replaces_only_its_own_files(make_oasis, tmp_path):
    tree = make_oasis(size=8)
    png = tree.image_dir("train") / "case_001_slice_0.nii.png"
    before = png.read_bytes()
    options = PackOptions(workers=0, progress=False, overwrite=True)
    for out in (png, tree.root / "oasis.h5", tree.image_dir("test") / "x.h5"):
        with pytest.raises(PackError, match="is inside --src"):
            pack(tree.root, out, options)
    assert png.read_bytes() == before and not (tree.root / "oasis.h5").exists()
    notes = tmp_path / "notes.h5"
    notes.write_text("my notes")
    with pytest.raises(PackError, match="is not a file pack_h5 wrote"):
        pack(tree.root, notes, options)
    assert notes.read_text() == "my notes"


# --- 5. portable runs ------------------------------------------------------------------------------------


def test_a_run_resumes_from_another_folder_and_with_its_data_moved(
    tmp_path, here, monkeypatch, tiny_h5, tiny_paired_h5
):
    (tmp_path / "a" / "data").mkdir(parents=True)
    shutil.copyfile(tiny_h5, tmp_path / "a" / "data" / "tiny.h5")
    run = tmp_path / "run"
    monkeypatch.chdir(tmp_path / "a")
    assert here(train_main(), *train_args(run, "data/tiny.h5", "train.max_steps=2"))[0] == 0
    recorded = run_json(run)["inputs"]["data.path"]
    assert recorded["given"] == "data/tiny.h5" and recorded["path"] == str(tmp_path / "a" / "data" / "tiny.h5")
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "b")  # the same command from elsewhere: data/tiny.h5 is not here
    rc, out, _ = here(train_main(), *train_args(run, "data/tiny.h5", "train.max_steps=3"))
    assert rc == 0 and "using the path this run recorded" in out
    scratch = tmp_path / "scratch" / "tiny.h5"
    scratch.parent.mkdir()
    shutil.copyfile(tiny_h5, scratch)  # a copy: another mtime, the same content
    rc, out, _ = here(train_main(), *train_args(run, scratch, "train.max_steps=4"))
    assert rc == 0 and "data.path" in out
    moved = {c["key"]: c for c in run_json(run)["starts"][-1]["config_changes"]}["data.path"]
    assert moved["new"] == str(scratch) and moved["why"].startswith("moved")
    one_error(
        here(train_main(), *train_args(run, tiny_paired_h5, "train.max_steps=5")), "not the data this run trained on"
    )


# --- 6. the autoencoder trained further -------------------------------------------------------------------------


def test_an_ldm_run_resumes_after_its_autoencoder_trained_further(tmp_path, here, tiny_h5):
    vae, ldm = tmp_path / "vae", tmp_path / "ldm"
    assert here(train_main(), *train_args(vae, tiny_h5, "train.max_steps=2"))[0] == 0
    first = checkpoint.file_sha256(vae / "checkpoints" / "step_00000002.pt")
    ldm_args = ("train.max_steps=2", "train.image_every=100", f"ldm.vae_ckpt={vae}")
    assert here(train_main(), *train_args(ldm, tiny_h5, *ldm_args, stage="ldm"))[0] == 0
    assert here(train_main(), *train_args(vae, tiny_h5, "train.max_steps=4"))[0] == 0  # the vae trains further
    rc, out, _ = here(train_main(), *train_args(ldm, tiny_h5, *ldm_args[1:], "train.max_steps=3", stage="ldm"))
    assert rc == 0 and "continuing with the one its checkpoint holds" in out
    assert checkpoint.load(ldm / "checkpoints" / "last.pt")["extra"]["vae_sha256"] == first
    snapshot = f"ldm.vae_ckpt={vae / 'checkpoints' / 'step_00000002.pt'}"  # the same bytes, another path
    rc, out, _ = here(train_main(), *train_args(ldm, tiny_h5, "train.max_steps=4", ldm_args[1], snapshot, stage="ldm"))
    moved = {c["key"]: c for c in run_json(ldm)["starts"][-1]["config_changes"]}["ldm.vae_ckpt"]
    assert rc == 0 and moved["why"].startswith("moved: same sha256")
    later = f"ldm.vae_ckpt={vae / 'checkpoints' / 'last.pt'}"  # another autoencoder
    one_error(
        here(train_main(), *train_args(ldm, tiny_h5, "train.max_steps=5", later, stage="ldm")), "another autoencoder"
    )


# --- 7, 8, 12. sampling ---------------------------------------------------------------------------------------


def sample_main():
    from oasis_ldm.sampling.__main__ import main

    return main


def sample_args(ckpt: Path, out: Path, *extra: str) -> list[str]:
    return ["--ckpt", ckpt, "--out", out, "--device", "cpu", "--num-samples", "2", "--batch-size", "2", *extra]


def test_a_request_is_checked_whole_before_anything_is_written(tmp_path, here, tiny_ldm):
    from oasis_ldm.sampling.shards import SamplingParams, request_for, write_request

    out = tmp_path / "s"
    one_error(here(sample_main(), *sample_args(tiny_ldm, out, "--steps", "2000")), "--steps 2000: DDIM takes 1 to 50")
    assert not (out / "request.json").exists()
    assert here(sample_main(), *sample_args(tiny_ldm, out, "--steps", "2"))[0] == 0
    flag_error(here(sample_main(), *sample_args(tiny_ldm, out, "--steps", "2", "--eta", "nan")), "--eta nan")
    # A folder that holds a request but no shards (a run that failed before its first) takes a new one.
    empty = tmp_path / "e"
    from oasis_ldm.loading import read_checkpoint

    write_request(empty, request_for(read_checkpoint(tiny_ldm, "ldm")[1], SamplingParams(num_samples=2, seed=9)))
    rc, out_text, _ = here(sample_main(), *sample_args(tiny_ldm, empty, "--steps", "2"))
    assert rc == 0 and "replacing a request no shard was made for" in out_text
    assert json.loads((empty / "request.json").read_text())["seed"] == 0


def test_sampling_a_run_whose_last_checkpoint_is_damaged_uses_its_newest_good_snapshot(tmp_path, here, tiny_ldm):
    run = tmp_path / "run"
    shutil.copytree(tiny_ldm, run)
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    newest = checkpoint.snapshots(run / "checkpoints")[-1]
    step = checkpoint.load(newest)["step"]
    rc, out, _ = here(sample_main(), *sample_args(run, tmp_path / "s", "--steps", "2"))
    assert rc == 0, out
    assert f"using {newest.name} (step {step}) instead" in out and f"sampling step {step} of {newest}" in out
    with h5py.File(tmp_path / "s" / "samples.h5") as f:
        assert f.attrs["checkpoint_step"] == step and f.attrs["checkpoint"] == str(newest)


def test_sampling_outputs_and_merge_only_answer_in_one_line(tmp_path, here, tiny_ldm):
    launch_sample = load_script(REPO / "launch" / "sample.py", "launch_sample").main
    taken = tmp_path / "file"
    taken.write_text("mine")
    one_error(here(launch_sample, *sample_args(tiny_ldm, taken), "--cluster", "local"), "exists and is not a folder")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "samples.h5").write_text("mine")
    one_error(here(sample_main(), *sample_args(tiny_ldm, foreign)), "holds samples.h5 but no request.json")
    one_error(
        here(sample_main(), *sample_args(tiny_ldm, tmp_path / "none"), "--merge-only"), "no sampling request here"
    )
    assert taken.read_text() == "mine" and (foreign / "samples.h5").read_text() == "mine"


def test_ctrl_c_while_sampling_exits_130_without_a_traceback(tmp_path, tiny_ldm):
    out = tmp_path / "s"
    args = sample_args(tiny_ldm, out, "--num-samples", "200", "--shard-size", "2", "--steps", "10")
    cmd = [sys.executable, "-m", "oasis_ldm.sampling", *map(str, args)]
    proc = subprocess.Popen(cmd, env=quiet_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list((out / "shards").glob("shard_*.h5")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "interrupted; the finished shards are kept" in err
    assert not list((out / "shards").glob(".*tmp*"))


# --- 9, 10. full and read-only disks ---------------------------------------------------------------------------


def test_full_and_read_only_disks_give_one_line_and_leave_everything_whole(tmp_path, tiny_h5, tiny_vae, tiny_ldm):
    full, ro, src = tmp_path / "full", tmp_path / "ro", tmp_path / "src"
    full.mkdir()
    ro.mkdir()
    shutil.copytree(tiny_h5.parent / "src", src)
    script = 'mount -t tmpfs -o size=5m none "$1" && mount -t tmpfs -o ro none "$2" && shift 2 && exec "$@"'
    driver = [sys.executable, str(REPO / "tests" / "disk_driver.py"), full, ro, tiny_h5, tiny_ldm, tiny_vae, src]
    cmd = ["unshare", "--mount", "sh", "-c", script, "sh", str(full), str(ro), *map(str, driver)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=quiet_env(), timeout=300)
    assert done.returncode == 0, f"rc {done.returncode} (-11 or 139: a segmentation fault)\n{done.stderr[-3000:]}"
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("RESULTS ")]
    r = json.loads(line.removeprefix("RESULTS "))
    t = r["training"]
    assert t["first"]["rc"] == 0 and t["failed"]["rc"] == 1 and len(t["failed"]["stderr"]) == 1
    assert "last.pt: write failed (No space left on device;" in t["failed"]["stderr"][0]
    assert "free on its disk" in t["failed"]["stderr"][0]
    assert t["kept_step"] == 2 and t["left"] == ["last.pt", "step_00000002.pt"]  # whole, and no temp file
    assert t["rerun"]["rc"] == 0 and t["step"] == 4
    s = r["sampling"]
    assert s["failed"]["rc"] == 1 and len(s["failed"]["stderr"]) == 1
    assert "shard_00000.h5: write failed (No space left on device; " in s["failed"]["stderr"][0]
    assert s["left"] == ["request.json"] and s["rerun"]["rc"] == 0 and s["merged"]
    p = r["packing"]
    assert p["failed"]["rc"] == 1 and "o.h5: write failed (No space left on device; " in p["failed"]["stderr"][0]
    assert not [name for name in p["left"] if name.startswith("o.h5")]
    for name, flag in (("train", "--run-dir"), ("sample", "--out"), ("evaluate", "--out")):
        case = r["read_only"][name]
        assert case["rc"] == 1 and len(case["stderr"]) == 1, case
        assert f"{flag} {ro}" in case["stderr"][0] and "cannot write here (Read-only file system)" in case["stderr"][0]
    assert "global batch" not in r["read_only"]["train"]["stdout"]  # refused before any work
    assert "sampling step" not in r["read_only"]["sample"]["stdout"]


# --- 11, 12, 13. the launchers ---------------------------------------------------------------------------------


@pytest.fixture
def launch_train():
    return load_script(REPO / "launch" / "train.py", "launch_train").main


def test_the_launcher_refuses_what_the_trainer_would_refuse(tmp_path, here, tiny_h5, launch_train, monkeypatch):
    run = tmp_path / "run"
    base = ["--stage", "vae", "--config", TINY, "--run-dir", run, "--set", f"data.path={tiny_h5}", "--cluster", "local"]
    one_error(here(launch_train, *base, "--set", "train.lr=-1e-3"), "train.lr=-0.001: must be > 0")
    run.mkdir()
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "heartbeat": time.time()}
    (run / "lock").write_text(json.dumps(holder))
    one_error(here(launch_train, *base), f"is in use by host {socket.gethostname()} pid {os.getpid()}")
    assert sorted(p.name for p in run.iterdir()) == ["lock"]  # nothing submitted
    (run / "lock").unlink()
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    one_error(here(launch_train, *base, "--gpus-per-node", "4"), "this machine has 0 CUDA device(s)")


def test_a_garbage_lock_is_refused_at_once_and_kept(tmp_path):
    from oasis_ldm.train.lock import RunLock
    from oasis_ldm.train.preflight import StartError

    (tmp_path / "lock").write_text("garbage, not a lock")
    started = time.monotonic()
    with pytest.raises(StartError, match="not a lock file of this project"):
        RunLock(tmp_path).acquire()
    assert time.monotonic() - started < 5 and (tmp_path / "lock").read_text() == "garbage, not a lock"


def test_dry_run_off_cluster_prints_the_script(tmp_path, here, launch_train, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun, no sbatch
    rc, out, err = here(launch_train, "--stage", "vae", "--config", "demo", "--run-dir", tmp_path / "r", "--dry-run")
    assert rc == 0 and out.startswith("# --- vae") and "#!/bin/bash" in out, err
    assert not (tmp_path / "r").exists()


def test_a_local_launch_leaves_no_empty_job_folder(tmp_path, here, tiny_h5, launch_train):
    run = tmp_path / "run"
    args = ["--stage", "vae", "--config", TINY, "--run-dir", run, "--cluster", "local"]
    rc, out, err = here(launch_train, *args, "--set", f"data.path={tiny_h5}", "--set", "train.max_steps=1")
    assert rc == 0, err
    assert [p.name for p in (run / "submitit").iterdir()] == [out.split("submitted vae training: job ")[1].split()[0]]


# --- 13. evaluate's surprises ----------------------------------------------------------------------------------


def test_evaluate_says_when_it_resizes_the_data_and_keeps_the_test_split_for_testing(tmp_path, here, tiny_h5):
    evaluate = load_script(REPO / "tools" / "evaluate.py", "evaluate_tool").main
    samples = write_samples(tmp_path / "s.h5", blob_images(4, 64, seed=5))  # a 64 px model, 32 px data
    rc, out, _ = here(
        evaluate, "--data", tiny_h5, "--split", "train", "--samples", samples, "--out", tmp_path / "r.json"
    )
    assert rc == 0 and "32x32 slices were upsampled to 64x64" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert (report["data_image_size"], report["image_size"]) == (32, 64)
    args = ["--data", tiny_h5, "--split", "test", "--samples", samples, "--segmentation", "--out", tmp_path / "x.json"]
    flag_error(here(evaluate, *args), "--segmentation --split test")
