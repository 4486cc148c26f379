"""``python -m benchmarks.claims``: verdict rules, every twin's parameter budget, and its quick mode
(twins train, files written)."""

import json

import jax
import numpy as np
import pytest

import train
from benchmarks import claims
from train.data import same_different


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


# One twin per kind of network the claims compare: the plain convolution, attention augmentation
# and full attention (its stage widths matched). The other twins differ from these only in sizes,
# in an excitation module or in the position encoding of the layer (tests/test_layers.py,
# tests/test_models.py trains SE and GE models), none of which the training script sees; their
# budgets are checked below.
TRAINED = ["plain", "aa", "fa"]


def test_every_twin_is_within_the_parameter_budget_of_plain():
    target = claims.parameter_count("resnet_cifar", {})
    for twin in claims.TWINS:
        count = claims.parameter_count(twin.model, claims.matched_overrides(twin, target))
        assert abs(count / target - 1) <= claims.TOLERANCE, (twin.name, count, target)


def test_quick_mode_trains_the_twins_and_writes_its_files(tmp_path, capsys):
    claims.main(["--quick", "--twins", *TRAINED, "--workdir", str(tmp_path / "runs"), "--out", str(tmp_path)])
    results = json.loads((tmp_path / "claims-cpu.json").read_text())
    assert [run["twin"] for run in results["runs"]] == [twin["name"] for twin in results["twins"]] == TRAINED
    for twin in results["twins"]:  # equal parameter budgets
        assert abs(twin["params"] / results["plain_params"] - 1) <= claims.TOLERANCE
    for run, twin in zip(results["runs"], results["twins"], strict=True):
        assert run["params"] == twin["params"]
    # The reported top-1 is the trained checkpoint's, recounted here on the test split.
    run = results["runs"][0]
    model, variables, _ = train.load(str(tmp_path / "runs" / f"{run['twin']}-seed0"))
    test = same_different.same_different().test
    images = np.stack([same_different.TEST_TRANSFORM(test[i])["image"] for i in range(len(test))])
    logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)  # not op by op
    assert run["test_top1"] == pytest.approx(float(np.mean(np.argmax(logits, -1) == test.labels)), abs=1e-6)
    judged = {c[1] for c in claims.CLAIMS if {c[3], *c[4]} <= set(TRAINED)}
    assert {v["statement"] for v in results["verdicts"]} == judged
    assert (tmp_path / "claims-cpu.png").stat().st_size > 0
    assert "| claim |" in capsys.readouterr().out
