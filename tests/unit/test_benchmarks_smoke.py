"""The benchmark entry point runs and writes its JSON layout (timings are not checked: smoke mode
runs each case once or twice on the demo model and a small torchvision ResNet-18, in seconds)."""

import json

import torch
from torch import nn

from benchmarks import architectures, run


def test_smoke_run_writes_the_report_layout(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert run.main(["--smoke", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["schema_version"] == run.SCHEMA_VERSION and report["mode"] == "smoke"
    machine = report["machine"]
    for key in ("cpu_model", "logical_cpus", "torch", "threads", "device", "omp_wait_policy", "load_average_at_end"):
        assert key in machine
    demo = report["models"]["demo"]
    assert set(demo["batches"]) == {"1", "4"}
    for entry in demo["batches"].values():
        assert set(entry["ratios"]) == {"ours_gbp_over_floor", "stock_gbp_over_ours_gbp",
                                        "stock_over_ours_saliency_gbp_deconvnet_grad_cam",
                                        "stock_over_ours_guided_grad_cam", "handler_predict_over_plain_forward"}
        for value in entry["ratios"].values():
            assert value["status"] in ("ok", "short") and value["ratio"] > 0
            assert {"median", "p25", "p75", "min", "max", "n"} <= set(value["numerator_ms"])
        ig = entry["integrated_gradients"]
        assert ig["speedup"]["status"] in ("ok", "short")
        assert ig["peak_memory_mib"]["ours"] > 0 and ig["peak_memory_mib"]["captum"] > 0
    assert report["end_to_end"] == {"skipped": "smoke mode"}
    assert report["oip_front"] == {"skipped": "smoke mode"}
    cams = report["cam_family"]
    assert cams["model"] == "demo" and set(cams["batches"]) == {"1", "4"}
    for entry in cams["batches"].values():
        value = entry["ratios"]["all_gradient_cams_over_grad_cam"]
        assert value["status"] in ("ok", "short") and value["ratio"] > 0, value

    resnet18 = report["architectures"]["models"]["resnet18"]
    assert report["architectures"]["input_size"] == [64, 64]
    ratios = resnet18["batches"]["1"]["ratios"]
    assert set(ratios) == set(architectures.GOALS)
    for value in ratios.values():
        assert value["status"] in ("ok", "short") or value["status"].startswith("failed: ")
        if not value["status"].startswith("failed"):
            assert value["ratio"] > 0 and value["denominator_ms"]["median"] > 0
    assert "warmup_ms" in resnet18["load_warmup_ms"] or resnet18["load_warmup_ms"]["status"].startswith("failed: ")

    goals = {(row["model"], row["goal"]) for row in report["goals"]}
    assert {("demo", "ours_gbp_over_floor"), ("demo", "integrated_gradients_peak_memory_mib"),
            ("resnet18", "guided_backprop_over_floor"), ("resnet18", "saliency_gbp_grad_cam_over_floor"),
            ("resnet18", "model_load_warmup_ms"), ("demo", "all_gradient_cams_over_grad_cam")} <= goals
    printed = capsys.readouterr().out
    assert "ours_gbp_over_floor" in printed and "guided_backprop_over_floor" in printed


class NoActivation(nn.Module):
    """Nothing for guided backprop's rule to act on: it must be reported as failed, not timed."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.conv(x).mean((2, 3)))


def tiny_relu_net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def test_a_failing_model_is_reported_per_model_and_the_others_still_run():
    def build(name, size):
        if name == "missing":
            raise ValueError("no such architecture")
        return NoActivation().eval() if name == "plain" else tiny_relu_net().eval()

    plan = architectures.ArchitecturePlan(("missing", "plain", "relu"), (1,), 16, rounds=2, budget_s=1)
    result = architectures.run(plan, torch.device("cpu"), log=lambda message: None, build=build)
    models = result["models"]
    assert models["missing"] == {"failed": "ValueError: no such architecture"}
    plain = models["plain"]["batches"]["1"]
    for goal in architectures.GOALS:
        assert plain["ratios"][goal]["status"].startswith("failed: ")
    assert models["plain"]["load_warmup_ms"]["status"].startswith("failed: ")
    assert set(plain["times_ms"]) == {"floor"}  # only what can run is timed
    rows = architectures.goal_rows(result)
    assert [row["status"] for row in rows if row["model"] == "missing"] == ["failed: ValueError: no such architecture"]
    assert len([row for row in rows if row["model"] == "relu"]) == 3


def test_a_method_failing_at_every_batch_size_is_reported_at_each():
    # guided backprop runs, Grad-CAM finds no spatial layer: only the combination fails.
    def build(name, size):
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * size * size, 4), nn.ReLU(), nn.Linear(4, 3)).eval()

    plan = architectures.ArchitecturePlan(("flat",), (1, 2), 8, rounds=2, budget_s=1)
    result = architectures.run(plan, torch.device("cpu"), log=lambda message: None, build=build)
    for batch in ("1", "2"):
        ratios = result["models"]["flat"]["batches"][batch]["ratios"]
        assert ratios["saliency_gbp_grad_cam_over_floor"]["status"].startswith("failed: ")
        assert ratios["guided_backprop_over_floor"]["status"] in ("ok", "short")
