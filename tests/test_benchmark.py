"""`lora-ensemble benchmark`: every case is measured and reported, and the memory claim is checked to the byte.

No timing assertions: a tiny random BERT, one timed step per case.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from lora_ensemble import LoraEnsembleConfig
from lora_ensemble.app.benchmark import (
    CASES,
    add_arguments,
    bert_tiny,
    format_report,
    parameter_accounting,
    run_benchmark,
)

TINY = dict(model="bert-tiny", batch_size=2, seq_len=8, num_members=3, r=2, warmup=1, memory_steps=1, repeats=1,
            quiet=True)


def test_benchmark_measures_every_case_and_writes_comparable_json(tmp_path):
    out = tmp_path / "bench.json"
    report = run_benchmark(**TINY, output=str(out))

    saved = json.loads(out.read_text())
    assert set(saved["cases"]) == set(CASES)
    for case, result in saved["cases"].items():
        assert result["status"] == "ok", (case, result)
        assert len(result["times_s"]) == 1 and result["median_s"] > 0
        assert result["peak_bytes"] >= result["state_bytes"] > 0
    for key in ("date", "machine", "versions", "options", "ratios", "targets", "accounting"):
        assert key in saved
    assert saved["options"]["num_members"] == 3 and saved["versions"]["torch"]
    assert {t["target"] for t in saved["targets"]} >= {"inference <= 1.05 x limit"}
    assert saved["ratios"]["lora_ensemble/inference"]["vs_peer"].keys() >= {"peft_mixed", "vmap", "explicit"}
    assert "lora_ensemble/train" in format_report(report)


def test_lora_ensemble_holds_one_backbone_plus_members_adapters_and_heads_to_the_byte():
    report = run_benchmark(**TINY, cases="limit/inference,lora_ensemble/inference,explicit/inference")
    acc = report["accounting"]
    assert acc["exact"] and acc["difference_bytes"] == 0
    # bert-tiny: 2 blocks x 4 projections (32 -> 32), r=2, fp32; head 32 -> 4 with bias
    assert acc["adapter_bytes_per_member"] == 2 * 4 * 2 * (32 + 32) * 4
    assert acc["head_bytes_per_member"] == (32 * 4 + 4) * 4
    assert acc["actual_bytes"] == acc["backbone_bytes"] + 3 * (acc["adapter_bytes_per_member"] + acc["head_bytes_per_member"])
    assert report["cases"]["lora_ensemble/inference"]["state_bytes"] == acc["actual_bytes"]
    # the explicit ensemble holds M whole models
    assert report["cases"]["explicit/inference"]["state_bytes"] == 3 * report["cases"]["limit/inference"]["state_bytes"]


def test_accounting_follows_the_chosen_projections():
    acc = parameter_accounting(bert_tiny(4), LoraEnsembleConfig(num_members=2, r=4, target_modules="qv"))
    assert acc["exact"] and acc["adapter_bytes_per_member"] == 2 * 2 * 4 * (32 + 32) * 4


def test_cases_timed_one_after_the_other_with_rss_cross_check():
    report = run_benchmark(**TINY, cases="limit/train,lora_ensemble/train", interleave=False, rss=True)
    for result in report["cases"].values():
        assert result["status"] == "ok", result
        assert result["peak_bytes"] > result["state_bytes"] and result["peak_rss_bytes"] is not None
    assert report["options"]["interleave"] is False


def test_command_line_options_and_bad_values_are_named():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", "bert-tiny", "--num-members", "2", "--cases", "limit/inference"])
    assert args.num_members == 2 and args.cases == "limit/inference"
    with pytest.raises(ValueError, match="unknown case"):
        run_benchmark(**TINY, cases="lora_ensemble/fly")
    with pytest.raises(ValueError, match="num_members"):
        run_benchmark(**dict(TINY, num_members=0))
