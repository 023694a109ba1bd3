"""The benchmark harness runs end to end in --quick mode and writes every field of its JSON report
(the figures themselves are not checked: they depend on the machine)."""

from __future__ import annotations

import argparse
import errno
import json
from pathlib import Path

import pytest

from cnn_backend import benchmark
from cnn_backend.backend import DeviceUnavailableError

RESULT_FIELDS = {
    "device", "model", "algorithm", "mode", "batch_size", "samples_per_second", "repeats_samples_per_second",
    "steps_per_repeat", "torch_nchw", "torch_channels_last", "ratio_to_torch_nchw", "ratio_to_torch_channels_last",
    "flops_per_sample", "flops_per_second", "fraction_of_gemm_peak",
}  # fmt: skip


def test_quick_run_writes_the_report(tmp_path, capsys):
    path = tmp_path / "bench.json"
    status = benchmark.main(["--quick", "--devices", "cpu", "--algorithms", "gemm,signal", "--json", str(path)])
    assert status == 0
    report = json.loads(path.read_text())

    assert {"settings", "machine", "libraries", "blas", "environment", "torch", "results", "peak_memory"} <= set(report)
    assert report["gemm_peak_flops"]["cpu"] > 0
    assert report["settings"]["quick"] is True
    assert report["gemm_peak_size"] == 1024  # --quick times a smaller product, and says which
    assert "matrix-product peak" in benchmark.format_table(report) and "(1024^3 product" in benchmark.format_table(report)
    assert {"cpu_model", "logical_cores", "usable_cores", "compute_threads"} <= set(report["machine"])
    assert {"python", "numpy", "scipy", "cupy", "torch"} <= set(report["libraries"])
    assert set(report["environment"]) == {"OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"}

    # every device x model x algorithm x (training and inference batch sizes)
    combos = {(r["device"], r["model"], r["algorithm"], r["mode"], r["batch_size"]) for r in report["results"]}
    assert len(combos) == len(report["results"]) == 3 * 2 * 2
    assert {m for _, m, _, _, _ in combos} == {"seed", "default", "plain"}
    for row in report["results"]:
        assert RESULT_FIELDS <= set(row)
        assert row["samples_per_second"] > 0
        assert row["fraction_of_gemm_peak"] == row["flops_per_sample"] * row["samples_per_second"] / report["gemm_peak_flops"]["cpu"]
        assert 0 < row["fraction_of_gemm_peak"] < 1  # a step reaches part of the peak, never more
        if report["torch"]["available"]:
            assert row["torch_nchw"] > 0 and row["ratio_to_torch_nchw"] > 0

    memory = report["peak_memory"]
    assert memory["model"] == "default" and memory["batch_size"] == 128
    assert "error" not in memory, memory.get("error")
    assert memory["peak_rss_mib"] >= memory["baseline_peak_rss_mib"] > 0

    table = capsys.readouterr().out
    assert "samples/s" in table and "peak resident memory" in table


def test_no_torch_says_so_and_drops_the_column(tmp_path, capsys):
    path = tmp_path / "bench.json"
    argv = ["--quick", "--no-torch", "--no-memory", "--models", "seed", "--algorithms", "gemm", "--json", str(path)]
    assert benchmark.main(argv) == 0
    report = json.loads(path.read_text())
    assert report["torch"]["available"] is False and report["peak_memory"] is None
    assert all(row["torch_nchw"] is None and row["ratio_to_torch_nchw"] is None for row in report["results"])
    out = capsys.readouterr().out
    assert "PyTorch comparison: skipped" in out and "torch NCHW" not in out


def test_mounts_on_a_subcommand_parser():
    parser = argparse.ArgumentParser()
    benchmark.add_arguments(parser.add_subparsers().add_parser("benchmark"))
    args = parser.parse_args(["benchmark", "--train-batch-sizes", "32,64", "--out", "x.json"])
    assert args.train_batch_sizes == [32, 64] and args.json == Path("x.json")
    benchmark.settle_run_length(args)
    assert args.train_batch_sizes == [32, 64] and args.repeats == 5 and args.min_time == 0.5


@pytest.mark.parametrize("threads, warned", [(None, False), (2, False), (3, True)])
def test_more_threads_than_usable_cores_is_warned_about(threads, warned):
    environment = {"environment": {}, "blas": [{"user_api": "blas"}], "machine": {"usable_cores": 2}}
    lines = benchmark.environment_warnings(environment, threads)
    assert lines == (["--threads 3 is more than the 2 usable cores: the threads take turns on them, so the figures "
                      "(ours and PyTorch's) do not show this machine's speed; use --threads 2 or fewer"] if warned else [])


def test_quick_shortens_only_the_options_not_given():
    parser = argparse.ArgumentParser()
    benchmark.add_arguments(parser)
    args = parser.parse_args(["--quick", "--repeats", "3", "--infer-batch-sizes", "64"])
    benchmark.settle_run_length(args)
    assert (args.repeats, args.infer_batch_sizes) == (3, [64])  # given beside --quick: kept
    assert (args.train_batch_sizes, args.warmup, args.min_time) == ([8], 1, 0.0)  # not given: --quick's


def test_flops_per_sample_count_every_product_of_the_default_model():
    from cnn_backend.model import default_cnn

    # conv 1->16 3x3 on 28x28, conv 16->48 3x3 on 14x14, dense 2352->384 and 384->10 (BatchNorm uncounted)
    macs = [16 * 9 * 28 * 28, 48 * 16 * 9 * 14 * 14, 2352 * 384, 384 * 10]
    flops = benchmark.model_flops(default_cnn("cpu"))
    assert flops["infer"] == 2 * sum(macs)
    assert flops["train"] == 2 * sum(macs) + 2 * sum(macs) + 2 * sum(macs[1:])


def test_flops_per_sample_count_every_product_of_the_plain_and_seed_models():
    from cnn_backend.model import plain_cnn, seed_cnn

    # conv 1->32 3x3 on 28x28, conv 32->64 3x3 on 14x14, dense 3136->128 and 128->10 (multiply-adds)
    macs = [32 * 9 * 28 * 28, 64 * 32 * 9 * 14 * 14, 3136 * 128, 128 * 10]
    flops = benchmark.model_flops(plain_cnn("cpu"))
    assert flops["infer"] == 2 * sum(macs)
    # training: + weight gradients of all four, + input gradients of all but the first
    assert flops["train"] == 2 * sum(macs) + 2 * sum(macs) + 2 * sum(macs[1:])
    seed_macs = [36 * 23 * 23, 121 * 10]
    assert benchmark.model_flops(seed_cnn("cpu")) == {"infer": 2 * sum(seed_macs), "train": 2 * (3 * sum(seed_macs) - seed_macs[0])}


@pytest.mark.parametrize("model_name", benchmark.MODELS)
def test_the_pytorch_twin_of_each_model_has_its_parameters(model_name):
    # the comparison is only fair between the same networks: every weight, bias and BatchNorm scale
    torch = pytest.importorskip("torch")
    from cnn_backend.model import ARCHITECTURES

    twin = benchmark.torch_model(torch, model_name)
    ours = ARCHITECTURES[model_name]("cpu", seed=0)
    assert sorted(p.numel() for p in twin.parameters()) == sorted(p.data.size for p in ours.parameters())


QUICK_SEED = ["--quick", "--no-torch", "--no-memory", "--models", "seed", "--algorithms", "gemm"]


@pytest.mark.parametrize(
    "options, message",
    [
        (["--min-time", "-1"], "argument --min-time: must be a finite number > 0, got '-1'"),
        (["--min-time", "nan"], "argument --min-time: must be a finite number > 0, got 'nan'"),
        (["--min-time", "0"], "argument --min-time: must be a finite number > 0, got '0'"),
        (["--threads", "0"], "argument --threads: must be a positive integer, got '0'"),
        (["--repeats", "0"], "argument --repeats: must be a positive integer, got '0'"),
        (["--warmup", "-1"], "argument --warmup: must be an integer >= 0, got '-1'"),
        (["--seed", "-1"], "argument --seed: must be an integer >= 0, got '-1'"),
    ],
)
def test_bad_settings_are_refused_in_the_standard_line_before_measuring(capsys, options, message):
    assert benchmark.main(options) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"cnn-backend: error: {message}; see cnn-backend benchmark --help\n"


@pytest.mark.parametrize("launches", [[], ["--launches"]])
def test_batches_of_one_for_a_batchnorm_network_are_refused_before_measuring(tmp_path, capsys, launches):
    path = tmp_path / "bench.json"
    argv = [*QUICK_SEED, "--models", "seed,default", "--train-batch-sizes", "1,8", *launches, "--json", str(path)]
    assert benchmark.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and not path.exists()
    assert err == (
        "cnn-backend: error: --train-batch-sizes includes 1, but the default network has BatchNorm, which cannot take "
        "statistics over a single sample; train with batches of 2 or more\n"
    )


def test_a_report_path_that_cannot_be_written_is_refused_before_measuring(tmp_path, capsys):
    (tmp_path / "reports.json").mkdir()
    (tmp_path / "blocker").write_text("a file, not a folder")
    cases = [
        ("results.txt", "argument --json/--out: 'results.txt' does not end in .json"),
        (str(tmp_path / "reports.json"), f"argument --json/--out: '{tmp_path / 'reports.json'}' is a folder"),
        (str(tmp_path / "blocker" / "x.json"), f"cannot write {tmp_path / 'blocker' / 'x.json'}: {tmp_path / 'blocker'} is a file, not a folder"),
    ]
    for (path, message), status in zip(cases, [2, 2, 1]):  # a path the file system refuses: 1, as in every command
        assert benchmark.main([*QUICK_SEED, "--json", path]) == status
        out, err = capsys.readouterr()
        assert out == "", "nothing is measured"
        assert err.startswith(f"cnn-backend: error: {message}") and err.count("\n") == 1


def test_the_report_goes_into_missing_folders(tmp_path, capsys):
    path = tmp_path / "new" / "folder" / "bench.json"
    assert benchmark.main([*QUICK_SEED, "--json", str(path)]) == 0
    assert json.loads(path.read_text())["settings"]["models"] == ["seed"]
    assert f"results written to {path}" in capsys.readouterr().out


def test_a_late_write_failure_is_one_line_and_the_table_stays_on_stdout(tmp_path, capsys, monkeypatch):
    def disk_full(descriptor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("cnn_backend.serialization.os.fsync", disk_full)
    path = tmp_path / "bench.json"
    assert benchmark.main([*QUICK_SEED, "--json", str(path)]) == 1
    out, err = capsys.readouterr()
    assert "samples/s" in out and "seed" in out and "results written" not in out
    assert err == (
        f"cnn-backend: error: cannot write {path}: No space left on device; the results are in the table above; "
        "to keep them as JSON, rerun with --json naming a writable file\n"
    )
    assert list(tmp_path.iterdir()) == [], "no file, whole or half-written, is left"


def test_an_unusable_device_asked_for_is_reported_in_the_standard_line(capsys, monkeypatch):
    real = benchmark.get_backend

    def no_gpu(device="auto", dtype="float32"):
        if device == "cuda":
            raise DeviceUnavailableError("CuPy found no usable CUDA device")
        return real(device, dtype)

    monkeypatch.setattr(benchmark, "get_backend", no_gpu)
    assert benchmark.main([*QUICK_SEED, "--devices", "cuda"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines()[-1] == "cnn-backend: error: CUDA was requested but CuPy found no usable CUDA device; leave cuda out (--devices cpu)"
    assert benchmark.main([*QUICK_SEED, "--devices", "cpu,cuda"]) == 2
    assert capsys.readouterr().err.endswith("; leave cuda out (--devices cpu)\n")
    assert not any(line.startswith("benchmark:") for line in err.splitlines())
    # Not asked for: the GPU is left out with the reason alone, the CPU measured.
    assert benchmark.usable_devices(None) == (["cpu"], {"cuda": "CuPy found no usable CUDA device"})


def test_a_value_listed_twice_is_measured_once():
    parser = argparse.ArgumentParser()
    benchmark.add_arguments(parser)
    args = parser.parse_args(["--algorithms", "gemm,gemm,signal,gemm", "--models", "seed,seed"])
    assert args.algorithms == ["gemm", "signal"] and args.models == ["seed"]
