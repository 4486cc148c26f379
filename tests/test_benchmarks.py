"""The benchmark suite's quick mode: every attention implementation agrees with the dense path."""

import numpy as np
import pytest

from benchmarks import attention, models


def test_attention_quick_checks_agreement(capsys):
    attention.main(["--quick"])
    assert "implementations match dense" in capsys.readouterr().out


def test_agreement_check_catches_a_wrong_implementation(monkeypatch):
    wrong = lambda q, k, v, rel_h, rel_w: attention.IMPLEMENTATIONS["dense"](q, k, v, rel_h, rel_w[::-1])
    monkeypatch.setitem(attention.IMPLEMENTATIONS, "wrong", wrong)
    monkeypatch.setattr(attention, "RELATIVE", (*attention.RELATIVE, "wrong"))
    with pytest.raises(AssertionError, match="wrong"):
        attention.check_agreement(attention.QUICK_SHAPES[1], ["wrong"])


def test_models_quick_reports_both_twins(capsys):
    models.main(["--quick"])
    out = capsys.readouterr().out
    ratio = float(out.split("time ")[1].split("x")[0])
    assert "resnet_cifar" in out and "aa_resnet_cifar" in out
    assert np.isfinite(ratio) and ratio > 0
