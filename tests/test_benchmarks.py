"""benchmarks/: the throughput benchmark end to end (CPU, quick), the shared timing and environment
helpers, FLOP counts against independent counts and the cost model's arithmetic. No timing assertions."""

from __future__ import annotations

import json
import math
import os
import re
import types

import pytest
import torch
from torch import nn

from benchmarks import common, cost, flops, throughput
from benchmarks import throughput_report as report

# --- the throughput benchmark, end to end ---------------------------------------------------------

ROW_FIELDS = {
    "name", "method", "branch_prob", "heads", "params", "img_per_s", "step_time_ms", "flops_per_image",
    "forward_flops_per_image", "flop_ratio", "time_ratio", "realised_flop_ratio", "achieved_gflop_per_s",
    "loss_ms", "loss_share", "peak_memory_bytes", "saved_activation_bytes_per_image", "flops_by_pattern",
    "telemetry", "nonfinite", "time_over_flop_ratio", "time_ratio_min",
}
QUANTILE_FIELDS = {"median", "q25", "q75", "iqr", "min", "max", "n"}
TOP_FIELDS = {"schema", "config", "environment", "loss_backend", "methods", "targets", "telemetry", "memory",
              "profile_traces", "notes"}


def quick_args(out, *extra: str) -> list[str]:
    return ["--arch", "resnet20", "--image-size", "16", "--batch-size", "4", "--num-classes", "10",
            "--threads", "1", "--quick", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("throughput")
    assert throughput.main(quick_args(out)) == 0
    return out, json.loads((out / "throughput.json").read_text())


def test_quick_run_writes_json_with_every_field(quick_result):
    out, data = quick_result
    assert set(data) == TOP_FIELDS
    assert data["schema"] == report.SCHEMA
    assert [r["name"] for r in data["methods"]] == ["baseline", "dsl", "dks", "dhm", "dhm-p0.5"]
    cfg = data["config"]
    assert (cfg["arch"], cfg["image_size"], cfg["batch_size"], cfg["steps"], cfg["repeats"]) == \
        ("resnet20", 16, 4, 2, 2)
    for row in data["methods"]:
        assert set(row) == ROW_FIELDS, row["name"]
        for key in ("img_per_s", "step_time_ms", "time_ratio", "loss_ms", "loss_share",
                    "realised_flop_ratio"):
            q = row[key]
            assert set(q) == QUANTILE_FIELDS
            assert all(math.isfinite(q[k]) for k in QUANTILE_FIELDS)
            assert q["min"] <= q["q25"] <= q["median"] <= q["q75"] <= q["max"]
        assert row["step_time_ms"]["n"] == 4  # 2 repeats x 2 steps
        assert row["img_per_s"]["median"] > 0 and row["loss_ms"]["median"] > 0
        assert 0 < row["loss_share"]["median"]
        assert row["peak_memory_bytes"] is None  # CPU: no allocator counter
        assert row["saved_activation_bytes_per_image"] > 0
        assert row["telemetry"]["available"] is False
        assert row["nonfinite"] is None
        assert row["time_over_flop_ratio"] == pytest.approx(row["time_ratio"]["median"] / row["flop_ratio"])
        assert (row["time_ratio_min"] is None) == (row["name"] == "dhm-p0.5")
    rows = {r["name"]: r for r in data["methods"]}
    base = rows["baseline"]
    for row in rows.values():  # ratios are taken against the baseline's own figures
        assert row["flop_ratio"] == pytest.approx(row["flops_per_image"] / base["flops_per_image"])
    # A step is forward + backward: backward costs about two forwards (less the images' input gradient).
    assert 2 * base["forward_flops_per_image"] < base["flops_per_image"] <= 3 * base["forward_flops_per_image"]
    # Same network and heads: the three all-branch methods cost the same arithmetic.
    assert rows["dsl"]["flops_per_image"] == rows["dks"]["flops_per_image"] == rows["dhm"]["flops_per_image"]
    assert rows["dhm"]["flop_ratio"] > 1.5
    assert 1.0 < rows["dhm-p0.5"]["flop_ratio"] < rows["dhm"]["flop_ratio"]
    assert len(rows["dhm-p0.5"]["flops_by_pattern"]) == 4
    # The sampled variant's FLOPs are the average of its four equally likely patterns.
    per = [v["step"] for v in rows["dhm-p0.5"]["flops_by_pattern"].values()]
    assert rows["dhm-p0.5"]["flops_per_image"] == pytest.approx(sum(per) / 4)
    assert rows["dhm"]["flops_by_pattern"]["main+aux1+aux2"]["step"] == rows["dhm"]["flops_per_image"]
    saved = {n: r["saved_activation_bytes_per_image"] for n, r in rows.items()}
    assert saved["dhm"] > saved["dhm-p0.5"] > saved["baseline"]
    assert set(data["targets"]) == {"dhm_time_over_flop_ratio", "dhm_loss_share",
                                    "dhm-p0.5_sampling_efficiency"}
    targets = data["targets"]
    assert targets["dhm_time_over_flop_ratio"]["value"] == rows["dhm"]["time_over_flop_ratio"]
    assert targets["dhm_loss_share"]["value"] == rows["dhm"]["loss_share"]["median"]
    for name, t in targets.items():  # pass is the comparison each target names, whatever the figures
        value, target = t["value"], t["target"]
        expected = value <= target if "ratio" in name else value < target if "share" in name else value >= target
        assert t["pass"] is expected, name
    assert data["memory"]["peak_source"] == "n/a (CPU)"
    env = data["environment"]
    assert env["torch"] == torch.__version__ and env["torch_threads"] == 1  # --threads 1 was applied
    assert env["command"] == "python -m benchmarks.throughput " + " ".join(quick_args(out))
    assert env["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", env["git_commit"])
    assert data["telemetry"]["available"] is False and "not available" in data["telemetry"]["reason"]
    assert (out / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_shows_every_variant_and_target(quick_result):
    _, data = quick_result
    table = report.format_table(data)
    for name in ("baseline", "dsl", "dks", "dhm", "dhm-p0.5", "dhm_loss_share",
                 "GPU telemetry: not available"):
        assert name in table


@pytest.mark.slow
def test_profile_writes_a_chrome_trace(tmp_path):
    assert throughput.main(quick_args(tmp_path, "--methods", "baseline,dhm-p0.5", "--profile")) == 0
    data = json.loads((tmp_path / "throughput.json").read_text())
    assert len(data["profile_traces"]) == 2
    trace = json.loads((tmp_path / "trace_dhm-p0.5.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"forward", "loss", "backward", "optimizer"} <= names
    assert (tmp_path / "profile_baseline.txt").read_text().strip()


FASHION_MNIST = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(FASHION_MNIST), reason="needs Debian's dataset-fashion-mnist")
def test_quick_run_end_to_end_with_a_real_loader(tmp_path):
    argv = ["--arch", "resnet20", "--loader", "memory", "--dataset", "fashion-mnist", "--batch-size", "4",
            "--methods", "dhm", "--threads", "1", "--quick", "--out", str(tmp_path)]
    assert throughput.main(argv) == 0
    data = json.loads((tmp_path / "throughput.json").read_text())
    assert data["config"]["loader"] == "memory" and data["config"]["image_size"] == 28
    assert [r["name"] for r in data["methods"]] == ["baseline", "dhm"]
    assert data["config"]["num_classes"] == 10


@pytest.mark.parametrize("argv, message", [
    (["--precision", "fp16", "--device", "cpu"], "fp16 needs a CUDA device"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--methods", "dsl-p0.5"], "only dhm takes a branch probability"),
    (["--methods", "dhm,dhm"], "twice"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    assert throughput.main(quick_args(tmp_path, *argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error:") and message in err


def test_a_torchvision_backbone_gets_its_flop_ratio(tmp_path):
    argv = ["--arch", "tv:resnet18", "--image-size", "16", "--batch-size", "2", "--threads", "1", "--quick",
            "--methods", "dhm", "--out", str(tmp_path)]
    assert throughput.main(argv) == 0
    data = json.loads((tmp_path / "throughput.json").read_text())
    assert data["config"]["num_classes"] == 1000  # an ImageNet classifier's default
    base, dhm = data["methods"]
    assert dhm["flops_per_image"] > base["flops_per_image"] > 0  # the branches add work
    assert dhm["flop_ratio"] == pytest.approx(dhm["flops_per_image"] / base["flops_per_image"])


def test_parse_variants():
    got = throughput.parse_variants("dhm, dhm-p0.25 ,dsl")
    assert [(v.name, v.method, v.branch_prob) for v in got] == [
        ("baseline", "baseline", 1.0), ("dhm", "dhm", 1.0), ("dhm-p0.25", "dhm", 0.25), ("dsl", "dsl", 1.0)]
    for bad in ("dhm-p1.5", "foo", "dhm-px"):
        with pytest.raises(ValueError):
            throughput.parse_variants(bad)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_quick_run_on_cuda_bf16_channels_last(tmp_path):
    argv = quick_args(tmp_path, "--device", "cuda", "--precision", "bf16", "--channels-last")
    assert throughput.main(argv) == 0
    data = json.loads((tmp_path / "throughput.json").read_text())
    for row in data["methods"]:
        assert row["peak_memory_bytes"] > 0
    assert data["telemetry"]["available"] is _nvml_usable(), data["telemetry"]
    assert data["memory"]["peak_source"] == "torch.cuda.max_memory_allocated"


def _nvml_usable() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        return True
    except Exception:
        return False


# --- shared timing and environment helpers -----------------------------------------------------------


def test_quantiles_against_hand_values():
    q = common.quantiles([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (q["median"], q["q25"], q["q75"], q["iqr"], q["min"], q["max"], q["n"]) == (3, 2, 4, 2, 1, 5, 5)
    assert common.quantiles([7.0])["iqr"] == 0
    with pytest.raises(ValueError):
        common.quantiles([])


def test_round_robin_interleaves_and_times_each_call():
    calls: list[str] = []
    ticks = iter(range(100))
    times = common.time_round_robin({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, "cpu",
                                    repeats=3, warmup=1, clock=lambda: float(next(ticks)))
    assert calls == ["a", "b"] + ["a", "b"] * 3  # warm-up first, then interleaved rounds
    assert times == {"a": [1.0] * 3, "b": [1.0] * 3}  # one tick between a call's two clock reads


def test_environment_records_the_vector_code_and_its_caps(monkeypatch):
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    env = common.environment("cpu")
    assert env["isa_limits"] == {"ONEDNN_MAX_CPU_ISA": "AVX2"}  # a capped run says so in its figures
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert common.environment("cpu")["isa_limits"] == {}


def test_recorded_command_is_portable():
    inside = str(common.ROOT / "runs" / "x")
    assert common.command_line("benchmarks.x", ["--out", inside, "--n", "a b"]) == \
        "python -m benchmarks.x --out runs/x --n 'a b'"
    assert common.command_line("benchmarks.x", ["--out", "/elsewhere"]) == "python -m benchmarks.x --out /elsewhere"


# --- FLOP counts against independent counts -------------------------------------------------------


class Tiny(nn.Module):
    """conv 3->4 (3x3, pad 1) -> ReLU -> global average pool -> linear 4->5: counted by hand below."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.fc = nn.Linear(4, 5)

    def forward(self, x, active=None):
        return (self.fc(torch.relu(self.conv(x)).mean((2, 3))),)


# A loss with no matrix products, so a count is the network's alone whatever loss backend runs.
SUM_LOSS = types.SimpleNamespace(compute=lambda outputs, labels, active=None: (outputs[0].sum(), None))


def test_step_costs_of_a_small_net_match_a_hand_count():
    b, h, w = 3, 8, 6
    conv = 2 * 4 * h * w * 3 * 3 * 3  # per image: 2 x out channels x positions x (in channels x 3 x 3)
    fc = 2 * 4 * 5
    forward = conv + fc
    # Backward: conv weight gradient (= conv); no input gradient (the images need none);
    # linear: weight gradient and input gradient (= fc each).
    step = forward + conv + 2 * fc
    # Saved for backward (float32): the conv's input (the images), ReLU's output and the linear layer's
    # input; the weights are parameters, and the mean and the sum keep only shapes.
    saved = 4 * (3 * h * w + 4 * h * w + 4)
    images, labels = torch.randn(b, 3, h, w), torch.randint(0, 5, (b,))
    assert flops.step_costs(Tiny(), images, labels, (True,), SUM_LOSS) == (forward, step, saved)


def test_torchvision_resnet18_forward_flops_match_the_published_count():
    """torchvision resnet18 at 224: 1.82 GMACs = 3.64 GFLOPs (the widely quoted figure)."""
    import torchvision

    with torch.device("meta"):
        model = torchvision.models.resnet18()
        x = torch.empty(1, 3, 224, 224)
    n = flops.count_flops(lambda: model(x))
    assert n == pytest.approx(3.64e9, rel=0.005)


def test_dhm_fast_resnet18_flops_match_torchvision_and_reference():
    import torchvision

    # Count the network alone (the reference loss adds a tiny H x H x K matrix product per image).

    with torch.device("meta"):
        tv = torchvision.models.resnet18()
        x = torch.empty(2, 3, 224, 224)
    tv_fwd = flops.count_flops(lambda: tv(x)) // 2
    from dhm_fast.models import create_model

    with torch.device("meta"):
        trunk = create_model("resnet18", 1000, method="baseline")
        dhm = create_model("resnet18", 1000, method="dhm")
        labels = torch.zeros(2, dtype=torch.long)
    fwd, step, saved = flops.step_costs(trunk, x, labels, (True,), SUM_LOSS)
    assert fwd == tv_fwd
    # Backward costs two forwards, except conv1's input gradient (the images need none).
    conv1 = 2 * 64 * 112 * 112 * 3 * 7 * 7
    assert step == 3 * fwd - conv1
    assert saved == 0  # a "meta" tensor has no storage to count
    dhm_fwd, _, _ = flops.step_costs(dhm, x, labels, (True, True, True), SUM_LOSS)
    # 7,844,397,056: FlopCounterMode on the authors' released DHM ResNet-18 (all three heads, 224 px)
    assert dhm_fwd == pytest.approx(7.84e9, rel=0.002)


def test_expected_flops_under_branch_sampling():
    pats = flops.patterns(3)
    assert sorted(pats) == sorted([(True, a, b) for a in (True, False) for b in (True, False)])
    values = {p: float(1 + 10 * p[1] + 100 * p[2]) for p in pats}
    assert flops.expected(values, [0.5, 0.5]) == pytest.approx(1 + 5 + 50)
    assert flops.expected(values, [1.0, 1.0]) == pytest.approx(111)
    assert flops.expected(values, [0.2, 0.7]) == pytest.approx(1 + 2 + 70)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        probs = torch.rand(3, generator=g).tolist()
        assert sum(flops.pattern_probability(p, probs) for p in flops.patterns(4)) == pytest.approx(1.0)


# --- the cost model ----------------------------------------------------------------------------------


def test_cost_arithmetic_on_fixed_inputs():
    e = cost.estimate(1200, 8, 90, 1_281_167, efficiency=0.9, price_per_device_hour=2.5)
    assert e.aggregate_img_per_s == pytest.approx(8640)
    assert e.images == 115_305_030
    assert e.wall_seconds == pytest.approx(13_345.489583, rel=1e-9)
    assert e.wall_hours == pytest.approx(3.707080440, rel=1e-9)
    assert e.device_hours == pytest.approx(29.65664352, rel=1e-9)
    assert e.cost == pytest.approx(74.1416088, rel=1e-9)
    one = cost.estimate(100, 1, 2, 1000)
    assert (one.efficiency, one.wall_seconds, one.device_hours, one.cost) == (1.0, 20.0, 20.0 / 3600, None)
    assert cost.estimate(100, 4, 1, 1000).efficiency == 0.9


@pytest.mark.parametrize("kwargs", [dict(img_per_s=0), dict(devices=0), dict(efficiency=1.5), dict(epochs=0)])
def test_cost_rejects_bad_input(kwargs):
    args = dict(img_per_s=100.0, devices=1, epochs=1, dataset_size=10) | kwargs
    with pytest.raises(ValueError):
        cost.estimate(**args)


def test_recipe_run_reads_epochs_and_dataset():
    run = cost.recipe_run("imagenet-resnet152")
    assert (run["arch"], run["epochs"], run["dataset_size"], run["image_size"], run["num_classes"]) == \
        ("resnet152", 90, 1_281_167, 224, 1000)
    run = cost.recipe_run("cifar100-resnet32")
    assert (run["epochs"], run["dataset_size"], run["image_size"], run["num_classes"]) == \
        (164, 50_000, 32, 100)


def test_gpu_table_scales_published_figures_by_flops():
    run = cost.recipe_run("imagenet-resnet50")
    rows = cost.gpu_table(run, "baseline")
    assert all(r["flop_scale"] == pytest.approx(1.0) for r in rows)  # the figures' own network
    a100 = next(r for r in rows if r["gpu"] == "A100 80GB" and r["precision"] == "AMP")
    assert a100["published"] and a100["est_img_per_s"] == 2470
    assert a100["efficiency_8"] == pytest.approx(16621 / (8 * 2470))
    assert a100["one_gpu"]["wall_seconds"] == pytest.approx(90 * 1_281_167 / 2470)
    assert any(not r["published"] and "ASSUMPTION" in r["source"] for r in rows)
    dhm = cost.gpu_table(run, "dhm")
    assert dhm[0]["flop_scale"] > 1.5  # DHM ResNet-50: about 2x the trunk's arithmetic (16.6 vs 8.2 GFLOP)


def test_cost_cli(tmp_path, capsys):
    out = tmp_path / "cost.json"
    argv = ["--img-per-s", "1200", "--devices", "8", "--efficiency", "0.9", "--recipe", "imagenet-resnet152",
            "--method", "dhm", "--price", "2.5", "--json", str(out)]
    assert cost.main(argv) == 0
    text = capsys.readouterr().out
    assert "8,640.0 img/s" in text and "3.71 h" in text and "74.14" in text
    assert json.loads(out.read_text())["estimate"]["device_hours"] == pytest.approx(29.65664352)
    assert cost.main(["--img-per-s", "-1"]) == 2
    assert cost.main(["--from-json", str(tmp_path / "missing.json")]) == 2


def test_cost_from_throughput_json(quick_result, tmp_path):
    out, data = quick_result
    ips, cfg = cost.from_throughput_json(str(out / "throughput.json"), "dhm-p0.5")
    assert ips == next(r for r in data["methods"] if r["name"] == "dhm-p0.5")["img_per_s"]["median"]
    assert cfg["arch"] == "resnet20"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "other"}))
    with pytest.raises(ValueError, match="not a benchmarks.throughput result"):
        cost.from_throughput_json(str(bad), "dhm")
    with pytest.raises(ValueError, match="no variant"):
        cost.from_throughput_json(str(out / "throughput.json"), "nope")


def test_an_output_that_is_a_file_is_one_line_and_exit_2_before_any_measurement(tmp_path, capsys):
    from benchmarks import bench_loaders, bench_loss, bench_reid_eval, gpu_check

    afile = tmp_path / "afile"
    afile.write_text("mine")
    for main, argv, message in (
        (throughput.main, quick_args(afile), f"--out {afile} is a file, not a folder"),
        (bench_loss.main, ["--quick", "--out", str(afile)], f"--out {afile} is a file, not a folder"),
        (bench_loaders.main, ["--quick", "--out-dir", str(afile)], f"--out-dir {afile} is a file, not a folder"),
        (gpu_check.main, ["--out", str(afile)], f"--out {afile} is a file, not a folder"),
        (bench_reid_eval.main, ["--queries", "4", "--gallery", "8", "--out", str(tmp_path)],
         f"--out {tmp_path} is a folder; name the JSON file to write"),
    ):
        assert main(argv) == 2, argv
        out = capsys.readouterr()
        assert out.err.strip().splitlines() == [f"error: {message}"], out.err
        assert "done H=" not in out.err + out.out  # nothing measured
    assert afile.read_text() == "mine"
