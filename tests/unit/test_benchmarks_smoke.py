"""The benchmark entry point runs and writes its JSON layout (timings are not checked: smoke mode
runs each case once or twice on the demo model only, in a few seconds)."""

import json

from benchmarks import run


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
    assert {row["goal"] for row in report["goals"]} >= {"ours_gbp_over_floor", "integrated_gradients_peak_memory_mib"}
    assert "ours_gbp_over_floor" in capsys.readouterr().out
