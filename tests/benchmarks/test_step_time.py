import pytest

from benchmarks import step_time


def test_variants_are_timed_in_turn_and_compared_with_the_first(mnist, capsys):
    ms = step_time.main(["sparse:", "bernoulli fp32:model.dropout_mask=bernoulli,precision=fp32",
                         "--batches", "2", "--repeats", "2"])
    assert list(ms) == ["sparse", "bernoulli fp32"] and all(len(t) == 2 and min(t) > 0 for t in ms.values())
    out = capsys.readouterr().out
    assert "speed per step vs sparse" in out and "1.00x" in out and "bernoulli fp32" in out


@pytest.mark.parametrize("spec, message", [("sparse", "expected NAME:KEY=VALUE"),
                                           ("x:model.dropout_mask=dice", "model.dropout_mask='dice'")])
def test_bad_variants_are_named_before_any_work(spec, message, capsys):
    with pytest.raises(SystemExit):
        step_time.main([spec])
    assert message in capsys.readouterr().err
