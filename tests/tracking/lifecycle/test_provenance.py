import json
import warnings

import mlflow

from mnist_mlflow.data import make_splits
from tracking.lifecycle.provenance import log_datasets


def test_datasets_are_logged_with_their_source_and_no_warning(tracking_uri, mnist):
    splits = make_splits(mnist, val_size=100)
    with warnings.catch_warnings(record=True) as caught, mlflow.start_run() as run:
        warnings.simplefilter("always")
        log_datasets(mnist, splits)
    assert not [w for w in caught if "dataset source" in str(w.message)], [str(w.message) for w in caught]
    inputs = mlflow.get_run(run.info.run_id).inputs.dataset_inputs
    assert {i.dataset.name for i in inputs} == {"mnist-train", "mnist-val", "mnist-test"}
    assert {json.loads(i.dataset.source)["tags"]["mnist.source"] for i in inputs} == {mnist.source}
