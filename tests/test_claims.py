"""``python -m benchmarks.claims``: verdict rules, and its quick mode (every twin trains, files written)."""

import json

import pytest

from benchmarks import claims


def _stats(mean, std):
    return {"mean": mean, "std": std, "seeds": 3}


@pytest.mark.parametrize(
    ("a", "b", "want"),
    [
        (_stats(0.80, 0.01), _stats(0.70, 0.02), "reproduced"),  # 10 points apart, spread 3
        (_stats(0.70, 0.02), _stats(0.80, 0.01), "not reproduced"),
        (_stats(0.80, 0.05), _stats(0.75, 0.05), "inconclusive"),  # 5 apart, spread 10
        (_stats(0.52, 0.03), _stats(0.50, 0.00), "inconclusive"),  # nothing learned
    ],
)
def test_a_beats_b_is_judged_against_the_spread_across_seeds(a, b, want):
    assert claims.verdict("beats", a, [b]) == want


def test_a_claim_against_several_models_needs_every_difference():
    a, worse, close = _stats(0.80, 0.01), _stats(0.70, 0.01), _stats(0.79, 0.01)
    assert claims.verdict("beats", a, [worse, worse]) == "reproduced"
    assert claims.verdict("beats", a, [worse, close]) == "inconclusive"


def test_matters_little_holds_when_no_difference_exceeds_its_spread():
    assert (
        claims.verdict("little", _stats(0.80, 0.02), [_stats(0.79, 0.02), _stats(0.81, 0.01)]) == "reproduced"
    )
    assert (
        claims.verdict("little", _stats(0.80, 0.01), [_stats(0.79, 0.02), _stats(0.70, 0.01)])
        == "not reproduced"
    )
    assert claims.verdict("little", _stats(0.50, 0.01), [_stats(0.50, 0.01)]) == "inconclusive"


def test_quick_mode_trains_every_twin_and_writes_its_files(tmp_path, capsys):
    claims.main(["--quick", "--workdir", str(tmp_path / "runs"), "--out", str(tmp_path)])
    results = json.loads((tmp_path / "claims-cpu.json").read_text())
    names = [twin.name for twin in claims.TWINS]
    assert [run["twin"] for run in results["runs"]] == names
    for twin in results["twins"]:  # equal parameter budgets
        assert abs(twin["params"] / results["plain_params"] - 1) <= claims.TOLERANCE
    assert all(
        0 <= run["test_top1"] <= 1 and run["params"] == t["params"]
        for run, t in zip(results["runs"], results["twins"], strict=True)
    )
    assert {v["statement"] for v in results["verdicts"]} == {c[1] for c in claims.CLAIMS}
    assert (tmp_path / "claims-cpu.png").stat().st_size > 0
    assert "| claim |" in capsys.readouterr().out
