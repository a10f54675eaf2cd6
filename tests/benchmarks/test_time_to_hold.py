import mlflow
import pytest

from benchmarks import time_to_hold


def test_benchmark_runs_variants_side_by_side_and_logs_a_child_per_variant(tracking_uri, mnist, capsys):
    results = time_to_hold.main(["--variants", "notebook,sparse", "--epochs", "1",
                                 "--train-limit", "512", "--test-limit", "200"])
    assert [o.name for _, o in results] == ["notebook", "sparse"]
    for cfg, o in results:
        assert len(o.accuracies) == 1 and o.epoch_seconds[0] > 0
        assert o.elapsed[0] >= o.epoch_seconds[0]  # data load counts
        assert o.train_gflop_per_image > 0
    notebook, sparse = (o for _, o in results)
    assert sparse.train_gflop_per_image == notebook.train_gflop_per_image  # the same model's work
    out = capsys.readouterr().out
    assert "speed per epoch vs notebook: sparse" in out and "not in 1" in out

    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    parent = [r for r in runs if r.data.tags.get("benchmark") == "time_to_hold"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert sorted(r.data.params["variant"] for r in children) == ["notebook", "sparse"]
    assert all("s_per_epoch" in r.data.metrics and "test_accuracy" in r.data.metrics for r in children)


def test_unknown_variant_is_named_before_any_work(capsys):
    with pytest.raises(SystemExit):
        time_to_hold.main(["--variants", "stage3,fastest"])
    assert "unknown ['fastest']" in capsys.readouterr().err


def test_the_stage3_variant_is_the_stage3_run_of_its_seed(tracking_uri, mnist):
    """The benchmark times what `mlflow run . -e stage3` trains: same model, statistics, seed."""
    from mnist_mlflow import config as C
    from tracking.lifecycle.runs import run_training

    args = {"seed": 1, "device": "cpu", "data.train_limit": 512, "data.test_limit": 200, "optim.epochs": 2}
    [(cfg, bench)] = time_to_hold.main(["--variants", "stage3", "--epochs", "2", "--train-limit", "512",
                                        "--test-limit", "200", "--no-track"])
    args["threads"] = cfg.threads  # auto, resolved once by the benchmark
    stage = run_training(C.replace(C.load(time_to_hold.STAGE3), args), mnist=mnist,
                         log_model_artifact=False, progress=False)
    assert bench.accuracies == [m.test_accuracy for m in stage.result.history]


def test_the_variants_before_the_speed_work_keep_their_model_whatever_stage_3_becomes():
    from mnist_mlflow import config as C
    from mnist_mlflow.models import param_count_of

    stage3 = C.load(time_to_hold.STAGE3)
    for name in ("notebook", "tensors", "sparse", "channels-last", "pool-first"):
        cfg = C.replace(stage3, time_to_hold.VARIANTS[name][1])
        assert param_count_of(cfg.model) == 7759 and cfg.model.width6 is None, name
        assert cfg.augment.translate_px == 0.0 and cfg.augment.rotation_degrees == 6.9, name
