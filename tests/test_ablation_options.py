"""The ablation script's per-bit-width options: parsing, and which variants they reach."""
import pytest

from benchmarks import ablation


def test_per_bits_plain_and_pairs():
    assert ablation.per_bits(["0.5"], 4, "--tau") == 0.5
    assert ablation.per_bits(0.7, 3, "--tau") == 0.7
    assert ablation.per_bits(["0.5", "4=0.7"], 4, "--tau") == 0.7
    assert ablation.per_bits(["0.5", "4=0.7"], 3, "--tau") == 0.5
    with pytest.raises(SystemExit, match="no value for 2 bits"):
        ablation.per_bits(["4=0.7"], 2, "--tau")
    with pytest.raises(SystemExit, match="expected VALUE or BITS=VALUE"):
        ablation.per_bits(["four=0.7"], 4, "--tau")


def test_tau_and_lambda_cam_reach_only_the_variants_that_use_them():
    args = ablation.parse_args(["--tau", "4=0.7", "3=0.3", "--lambda-cam", "4=50", "3=300"])
    for variant, (over, _, _) in ablation.VARIANTS.items():
        cfg = ablation.ft_config(args, 4, variant, 0)
        uses_mask = over.get("use_hard_soft_labels", True)
        uses_cam = over.get("use_cam", True)
        assert cfg.tau == (0.7 if uses_mask else 0.5), variant
        assert cfg.lambda_cam == (50.0 if uses_cam else 200.0), variant
    assert ablation.ft_config(args, 3, "synq", 0).tau == 0.3
    assert ablation.ft_config(args, 3, "synq", 0).lambda_cam == 300.0


def test_paired_ci_matches_a_hand_computation():
    # diffs 1, 2, 3: mean 2, sd 1, n 3 -> half-width 4.303 / sqrt(3)
    lo, hi = ablation.paired_ci([1.0, 2.0, 3.0])
    half = 4.303 / 3 ** 0.5
    assert abs(lo - (2 - half)) < 1e-9 and abs(hi - (2 + half)) < 1e-9


def test_job_claims_are_exclusive_between_live_processes(tmp_path):
    import os
    import subprocess
    import sys
    assert ablation.claim(tmp_path, "k1")
    assert ablation.claim(tmp_path, "k1")  # this process already holds it
    assert (tmp_path / "k1.claim").read_text() == str(os.getpid())
    # held by another live process: refused
    (tmp_path / "k2.claim").write_text(str(os.getppid()))
    assert not ablation.claim(tmp_path, "k2")
    # held by a process that has exited: taken over
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / "k3.claim").write_text(dead)
    assert ablation.claim(tmp_path, "k3")
    assert (tmp_path / "k3.claim").read_text() == str(os.getpid())


def test_reverse_is_the_plan_backwards_and_keys_do_not_depend_on_it():
    fwd = ablation.parse_args(["--seeds", "0", "1", "--every-seed", "+cam"])
    rev = ablation.parse_args(["--seeds", "0", "1", "--every-seed", "+cam", "--reverse"])
    assert ablation.plan(rev) == ablation.plan(fwd)  # main() walks it backwards
    for job in ablation.plan(fwd):
        assert ablation.row_key(fwd, *job, "layer3") == ablation.row_key(rev, *job, "layer3")
    assert ablation.synth_key(fwd, 1) == ablation.synth_key(rev, 1)
