import pytest
import torch

from mnist_mlflow.config import ModelConfig
from mnist_mlflow.models import (BudgetError, TinyNet, build_model, count_params, format_summary,
                                 layer_summary, param_count_of)


def test_param_count_matches_a_hand_count():
    # w1=8, w2=16: convs 72+1152+128+1152+2304+2304, BN 2*(8+16+8+16+16+16), head 160+10
    assert count_params(TinyNet(8, 16)) == 7272 + 160 + 170 - 160 == 7442


def test_default_tiny_net_is_within_budget_and_contract():
    model = build_model(ModelConfig())
    assert count_params(model) <= 8000
    out = model.eval()(torch.full((3, 1, 28, 28), 255.0))
    assert out.shape == (3, 10)


def test_over_budget_fails_at_construction_naming_count_and_budget():
    with pytest.raises(BudgetError, match="8,076 parameters, over the budget of 8,000"):
        build_model(ModelConfig(width1=10, width2=16))
    assert param_count_of(ModelConfig(width1=10, width2=16)) == 8076


def test_receptive_field_against_a_hand_computed_case():
    rows = layer_summary(TinyNet(8, 16))
    rf = {r.name: r.receptive_field for r in rows}
    # 3x3 -> 3, 3x3 -> 5, pool(2) -> 6, 1x1 -> 6, then jump 2: 3x3 -> 10, 14, 18
    assert [rf["features.1.0"], rf["features.2.0"], rf["features.3"], rf["features.4.0"],
            rf["features.5.0"], rf["features.6.0"], rf["features.7.0"]] == [3, 5, 6, 6, 10, 14, 18]
    assert rows[-1].output_shape == (10,)
    assert "total parameters: 7,442" in format_summary(rows)


def test_normalization_lives_inside_the_model():
    model = TinyNet()
    assert {"features.0.mean", "features.0.std"} <= set(model.state_dict())
