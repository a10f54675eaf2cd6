from mnist_mlflow.models import TinyNet
from mnist_mlflow.summary import format_summary, layer_summary


def test_receptive_field_against_a_hand_computed_case():
    rows = layer_summary(TinyNet(8, 16))
    rf = {r.name: r.receptive_field for r in rows}
    # 3x3 -> 3, 3x3 -> 5, pool(2) -> 6, 1x1 -> 6, then jump 2: 3x3 -> 10, 14, 18
    assert [rf["features.1.0"], rf["features.2.0"], rf["features.3"], rf["features.4.0"],
            rf["features.5.0"], rf["features.6.0"], rf["features.7.0"]] == [3, 5, 6, 6, 10, 14, 18]
    assert rows[-1].output_shape == (10,)
    assert "total parameters: 7,442" in format_summary(rows)
