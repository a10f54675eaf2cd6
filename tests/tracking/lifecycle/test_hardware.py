"""What a run ran on: parsed from cpuinfo and torch, logged as hw.* params of every run."""

import mlflow
import torch

from mnist_mlflow import config as C
from tracking import confirm
from tracking.lifecycle import hardware, runs

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile
"""


def test_reads_model_and_bf16_flags_from_cpuinfo(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO)
    hw = hardware.hardware(path)
    assert hw["cpu_model"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert hw["amx_bf16"] and hw["amx_tile"] and hw["avx512_bf16"]
    assert hw["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert hw["threads"] == torch.get_num_threads()
    assert hw["onednn"] == torch.backends.mkldnn.is_available()
    assert hw["onednn_bf16_isa"] == ("amx" if hw["onednn"] else "none")
    assert hw["cuda_device"] == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")


def test_without_cpuinfo_the_platform_answers(tmp_path):
    hw = hardware.hardware(tmp_path / "missing")
    assert hw["cpu_model"]  # platform.processor() or the machine type
    assert not hw["amx_bf16"] and hw["onednn_bf16_isa"] in ("emulated", "none")


def test_every_run_logs_its_hardware_and_thread_count(mnist, tiny_config, tracking_uri):
    mlflow.set_experiment("hw")
    with confirm.torch_threads(1):
        outcome = runs.run_training(C.replace(tiny_config, {"optim.epochs": 1}), mnist=mnist, progress=False,
                                    log_model_artifact=False)
    params = mlflow.get_run(outcome.run_id).data.params
    expected = {f"hw.{k}": str(v) for k, v in hardware.hardware().items() if k != "threads"}
    assert expected.items() <= params.items()
    assert params["hw.threads"] == "1"  # the count the run trained with, not the process default


def test_bf16_on_a_cpu_that_emulates_it_is_warned_about(tmp_path):
    native, avx2, empty = tmp_path / "native", tmp_path / "avx2", tmp_path / "empty"
    native.write_text(CPUINFO)
    avx2.write_text(CPUINFO.replace(" avx512f avx512_bf16 amx_bf16 amx_tile", ""))
    empty.write_text("")
    warning = hardware.bf16_warning("bf16", "cpu", avx2)
    assert warning and "precision=bf16" in warning and "precision=fp32" in warning
    assert hardware.bf16_warning("fp32", "cpu", avx2) is None
    assert hardware.bf16_warning("bf16", "cpu", native) is None
    assert hardware.bf16_warning("bf16", "cuda", avx2) is None
    assert hardware.bf16_warning("bf16", "cpu", empty) is None  # unknown CPU: no claim
