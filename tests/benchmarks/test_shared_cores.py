import mlflow
import psutil
import pytest

from benchmarks import shared_cores
from mnist_mlflow import threads as T


@pytest.mark.slow
def test_every_setting_trains_quiet_and_beside_busy_processes_and_is_logged(tracking_uri, mnist, capsys):
    # tiny and gentle: the busy loops run at nice 19 and live for a few seconds only
    before = {p.pid for p in psutil.Process().children(recursive=True)}  # e.g. a session's shared server
    cells = shared_cores.main(["--threads", "1,auto", "--busy", "1", "--epochs", "1",
                               "--train-limit", "256", "--test-limit", "128", "--busy-nice", "19",
                               "--settle", "0.3"])
    settings = ["1", "auto"] + ([] if T.TORCH_DEFAULT == 1 else [str(T.TORCH_DEFAULT)])
    assert sorted((c.setting, c.busy) for c in cells) == sorted((s, b) for s in settings for b in (0, 1))
    assert all(c.s_per_epoch > 0 and 1 <= c.threads <= T.usable_cores() for c in cells)
    assert all(c.threads == 1 for c in cells if c.setting == "1")  # an int is honoured exactly
    assert [c for c in cells if c.setting == "auto" and c.resolve_s >= T.SAMPLE_S]
    assert not {p.pid for p in psutil.Process().children(recursive=True)} - before  # the busy ones are gone

    out = capsys.readouterr().out
    assert "ratio to today's default" in out and "0 busy" in out and "1 busy" in out
    assert "auto's decision took" in out
    (run,) = [r for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
              if r.data.tags.get("benchmark") == "shared_cores"]
    assert run.info.status == "FINISHED" and run.data.tags["liveness.pid"]
    ref = f"threads_{T.TORCH_DEFAULT}.busy_0"
    assert run.data.metrics[f"ratio.{ref}"] == pytest.approx(1.0)
    assert {"s_per_epoch.threads_auto.busy_1", "resolved_threads.threads_auto.busy_1"} <= set(run.data.metrics)


def test_bad_settings_are_refused_before_any_work(capsys):
    with pytest.raises(SystemExit):
        shared_cores.main(["--threads", "1,many"])
    assert "--threads '1,many'" in capsys.readouterr().err
