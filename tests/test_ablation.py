"""``convplus ablate --quick``: runs end to end, matched parameters, report files."""

from __future__ import annotations

import json

from convplus.cli import main


def test_quick_ablation_runs_and_matches_parameters(tmp_path):
    assert main(["ablate", "--task", "texture", "--seeds", "1", "--quick", "--output", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())["texture"]
    params = {name: runs[0]["params"] for name, runs in results.items()}
    assert len(params) == 6
    reference = params["conv"]
    assert all(abs(p - reference) / reference <= 0.05 for p in params.values()), params
    assert results["conv-to-convplus"][0]["layers"] and results["conv"][0]["layers"] == []
    layer = results["convplus-local"][0]["layers"][0]
    assert 0 <= layer["attention_share"] <= 1 and layer["mean_attention_distance"] > 0
    for name in ("results.md", "top1.png", "texture_layers.png", "texture_attention.png"):
        assert (tmp_path / name).is_file(), name
    assert "| convplus-local |" in (tmp_path / "results.md").read_text()
