"""synq on several processes: 2 gloo processes on the CPU, started by torchrun, against 1.

One torchrun job (this file run as a script, `_worker`) runs the `synq synthesize` command,
then synthesizes, fine-tunes, evaluates and leaves an interrupted checkpoint through the API;
the tests compare each of its outputs with the same call in this (single) process. A second
job runs `-m synq` with a model that fails on one rank. Starting a job costs about 12 s of CPU
(three processes import torch), hence only two.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from synq import cli
from synq import distributed as D
from synq import filters
from synq.data.digits import digits_datasets
from synq.evaluate import evaluate
from synq.finetune import FinetuneConfig, finetune
from synq.synth import synthesize

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (1, 8, 8)
# 18 images in batches of 4: 5 batches (an odd number, for 2 ranks) and a short last one.
SYNTH = dict(num_images=18, batch_size=4, steps=8, augment=True, aug_prob=0.5, seed=2)
# Every SynQ component on, difficulty promotion too (its second forward bypasses DDP); lr
# such that the 6 steps move the weights by about 1e-2 (the KD term is scaled by 8000).
FT = dict(wbits=4, abits=4, epochs=3, calib_epochs=1, iters_per_epoch=3, batch_size=16,
          lr=1e-4, schedule="constant", tau=0.5, d0=3.0, use_lowpass=filters.has_lowpass(),
          difficulty_promotion=True, seed=5)
# fp32 tolerance of 2-process against 1-process fine-tuning: DDP averages the gradients of
# two half-batches instead of taking one batch mean, a different rounding, measured at up to
# 3e-8 in the weights after these steps (the activation ranges came out equal); a wrong
# normalization or a rank-dependent draw differs by 1e-4 or more.
ATOL, RTOL = 1e-6, 1e-5
EVAL_N, EVAL_BATCH = 101, 8  # shares of 50 and 51 images, each ending in a short batch


def teacher_net():
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def load_teacher(folder=None) -> nn.Module:
    net = teacher_net()
    folder = Path(folder or os.environ["SYNQ_TEST_DIR"])
    net.load_state_dict(torch.load(folder / "teacher.pt", weights_only=True))
    return net.eval()


def failing_teacher() -> nn.Module:
    if os.environ.get("RANK") == "1":
        raise ValueError("rank one cannot load its model")
    return load_teacher()


CLI_SYNTH = ["synthesize", "--model", "test_distributed:load_teacher", "--image-shape", "1,8,8",
             "--device", "cpu", "--seed", str(SYNTH["seed"]), "--synth-num-images", "18",
             "--synth-batch-size", "4", "--synth-steps", "8", "--synth-augment",
             "--no-progress"]
# `synq quantize`: the synthesis above, then a tiny fine-tuning and the test set (359 digits)
CLI_QUANTIZE = ["quantize"] + CLI_SYNTH[1:] + [
    "--test-set", "digits", "--epochs", "2", "--calib-epochs", "1", "--iters-per-epoch", "2",
    "--batch-size", "8"]


def ft_data():
    """200 digits with a quarter of the labels replaced, so that batches mix easy and hard
    samples (the easy-sample CE is the one loss term that needs a global count)."""
    x, y = digits_datasets()[0].tensors
    x, y = x[:200], y[:200].clone()
    y[::4] = (y[::4] + 3) % 10
    return x, y


def eval_loader():
    x, y = digits_datasets()[1].tensors
    return DataLoader(TensorDataset(x[:EVAL_N], y[:EVAL_N]), batch_size=EVAL_BATCH)


class _Stop(Exception):
    pass


def _stop_after_second_epoch(epoch, entry):
    if epoch == 1:
        raise _Stop


def _worker(out: Path) -> None:
    """Run by every rank under torchrun."""
    torch.set_num_threads(1)
    os.environ["SYNQ_TEST_DIR"] = str(out)
    with D.process_group("cpu"):
        assert D.world_size() == 2, D.world_size()
        # (test_failure_on_one_rank_stops_all runs `-m synq`, which joins the group itself)
        assert cli.main(CLI_QUANTIZE + ["--out", str(out / "quantize")]) == 0
        teacher = load_teacher(out)
        synthesize(teacher, out / "syn2.pt", SHAPE, progress=False, **SYNTH)
        res = finetune(teacher, ft_data(), FinetuneConfig(**FT), checkpoint=out / "ft2.pt",
                       progress=False)
        r = evaluate(res.student, eval_loader())
        (out / f"eval_rank{D.rank()}.json").write_text(json.dumps(r))
        torch.save({"student": res.student.state_dict(), "history": res.history},
                   out / f"ft2_rank{D.rank()}.pt")
        try:
            finetune(teacher, ft_data(), FinetuneConfig(**FT), checkpoint=out / "cut2.pt",
                     progress=False, on_epoch_end=_stop_after_second_epoch)
        except _Stop:
            pass


def torchrun(args, timeout=240, **env):
    env = dict(os.environ, OMP_NUM_THREADS="1", **env)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"),
                                         env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node=2", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(autouse=True)
def _one_thread():  # the workers run on one thread each: the references too, for equality
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The folder of a finished 2-process job (teacher.pt and the worker's outputs)."""
    out = tmp_path_factory.mktemp("dist")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = teacher_net()
    x, y = digits_datasets()[0].tensors
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        for idx in torch.randperm(len(y), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    torch.save(net.state_dict(), out / "teacher.pt")
    torch.set_num_threads(old)
    r = torchrun([__file__, str(out)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (out / "stderr.txt").write_text(r.stderr)
    (out / "stdout.txt").write_text(r.stdout)
    return out


@pytest.fixture(scope="module")
def one_process_ft(run):
    torch.set_num_threads(1)
    return finetune(load_teacher(run), ft_data(), FinetuneConfig(**FT), progress=False)


def assert_close_states(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        diff = float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0
        torch.testing.assert_close(a[k], b[k], atol=ATOL, rtol=RTOL,
                                   msg=f"{k}: largest difference {diff:.3g}")


def test_synthetic_set_equals_one_process(run, tmp_path):
    two = torch.load(run / "syn2.pt", weights_only=False)
    one = synthesize(load_teacher(run), tmp_path / "syn1.pt", SHAPE, progress=False, **SYNTH)
    assert two["meta"]["complete"] and two["meta"]["batches_done"] == 5
    assert torch.equal(two["images"], one["images"])
    assert torch.equal(two["labels"], one["labels"])
    assert two["meta"]["batch_losses"] == one["meta"]["batch_losses"]


def test_finetune_matches_one_process(run, one_process_ft):
    rank0 = torch.load(run / "ft2_rank0.pt", weights_only=False)
    rank1 = torch.load(run / "ft2_rank1.pt", weights_only=False)
    ref = one_process_ft.student.state_dict()
    start = load_teacher(run).state_dict()
    moved = max(float((ref[k] - start[k]).abs().max()) for k in start)
    assert moved > 1000 * ATOL, moved  # the comparison below means something
    for k, v in rank0["student"].items():  # ranks agree exactly: DDP, reduced ranges
        assert torch.equal(v, rank1["student"][k]), k
    assert_close_states(rank0["student"], ref)  # weights and activation ranges
    easy = [h["easy"] for h in one_process_ft.history[1:]]
    assert all(0.05 < e < 0.95 for e in easy), easy  # batches mix easy and hard samples
    for h2, h1 in zip(rank0["history"], one_process_ft.history):
        assert h2["train_acc"] == h1["train_acc"] and h2["phase"] == h1["phase"]
        for k in ("loss", "kd", "ce", "cam", "easy", "promoted"):
            if k in h1:
                assert h2[k] == pytest.approx(h1[k], rel=1e-4, abs=1e-6), k
    # the checkpoint (rank 0's) holds the final state, not a per-rank one
    ckpt = torch.load(run / "ft2.pt", weights_only=False)
    assert ckpt["epoch"] == FT["epochs"]
    assert_close_states(ckpt["student"], rank0["student"])


def test_evaluation_counts_every_image_once(run, one_process_ft):
    ref = evaluate(one_process_ft.student, eval_loader())
    assert ref["n"] == EVAL_N
    for rank in (0, 1):
        got = json.loads((run / f"eval_rank{rank}.json").read_text())
        assert got["n"] == EVAL_N
        assert got["top1"] == pytest.approx(ref["top1"]) and got["top5"] == pytest.approx(
            ref["top5"])


def test_resume_two_process_checkpoint_in_one_process(run, one_process_ft, tmp_path):
    ckpt = tmp_path / "cut.pt"
    shutil.copy(run / "cut2.pt", ckpt)
    assert torch.load(ckpt, weights_only=False)["epoch"] == 2
    resumed = finetune(load_teacher(run), ft_data(), FinetuneConfig(**FT), checkpoint=ckpt,
                       resume=True, progress=False)
    assert len(resumed.history) == FT["epochs"]
    assert_close_states(resumed.student.state_dict(), one_process_ft.student.state_dict())


def test_shares_and_batch_slices():
    shares = [D.shard_range(101, 2, i) for i in range(2)]
    assert [len(s) for s in shares] == [50, 51] and shares[0].stop == shares[1].start
    assert sum(len(D.shard_range(5, 8, i)) for i in range(8)) == 5
    assert D.local_slice(16) == slice(0, 16)  # one process: the whole batch


def test_device_and_batch_checks_under_torchrun_env(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert D.resolve_device("cuda") == torch.device("cuda", 1)  # each rank its own GPU
    assert D.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="LOCAL_RANK"):
        D.resolve_device("cuda:0")  # would put every rank on one GPU
    with pytest.raises(SystemExit) as e:
        cli.main(["finetune", "--data", str(tmp_path / "s.pt"), "--batch-size", "33"])
    assert e.value.code == 2
    assert "divisible by the number of processes (2)" in capsys.readouterr().err


def test_cli_quantize_under_torchrun(run):
    out = run / "quantize"
    got = torch.load(out / "synthetic.pt", weights_only=False)
    ref = torch.load(run / "syn2.pt", weights_only=False)
    assert torch.equal(got["images"], ref["images"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["float"]["n"] == 359 and summary["quantized"]["n"] == 359
    assert summary["environment"]["processes"] == 2
    assert summary["float"]["top1"] == pytest.approx(
        evaluate(load_teacher(run), digits_datasets()[1])["top1"])
    for name in ("model.safetensors", "model.json", "checkpoint.pt", "log.txt"):
        assert (out / name).is_file(), name
    # rank 0 alone logs and prints
    stderr, stdout = (run / "stderr.txt").read_text(), (run / "stdout.txt").read_text()
    assert stderr.count("synq: synthetic set:") == 1, stderr
    assert "2 processes (torchrun), gloo backend" in stderr
    assert stdout.count("| float |") == 1, stdout


def test_failure_on_one_rank_stops_all(run, tmp_path):
    """Rank 1 fails to load its model while rank 0 goes on to synthesize and waits for it."""
    argv = ["-m", "synq"] + CLI_SYNTH + ["--out", str(tmp_path / "syn.pt")]
    argv[argv.index("test_distributed:load_teacher")] = "test_distributed:failing_teacher"
    r = torchrun(argv, timeout=120, SYNQ_TEST_DIR=str(run))
    assert r.returncode != 0
    assert "synq: error (rank 1 of 2): rank one cannot load its model" in r.stderr, r.stderr


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
