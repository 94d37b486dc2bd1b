"""`polytask tour --quick`: every route runs, prints its table and writes its plots."""

import json

from conftest import run_cli


def test_quick_tour_covers_all_routes(tmp_path):
    proc = run_cli("tour", "--quick", "--out", str(tmp_path), timeout=600)
    results = json.loads((tmp_path / "tour_results.json").read_text())
    assert set(results) == {"joint", "continual", "merge", "compare"}
    assert all(results[k] for k in results)
    assert (tmp_path / "joint_delta_m.png").stat().st_size > 1000
    assert len(list(tmp_path.glob("*.png"))) >= 3
    assert "Δm" in proc.stdout
    routes = {r["route"] for r in results["compare"]}
    assert routes == {"reference", "joint", "continual", "merge"}
    assert (tmp_path / "compare" / "pareto_cost.png").stat().st_size > 1000
