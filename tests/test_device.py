"""Devices, precision and determinism (issue 17). On a machine without a GPU: the CPU fallback
of ``auto``, clear errors naming the key for an accelerator that is not there, bf16 on the CPU,
the GPU assignment of the parallel runtime and Ray's options. The CUDA paths are tested by the
``cuda`` tests, skipped without a GPU."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import torch

import oiafed
from oiafed import device as dev
from oiafed.cli import main
from oiafed.config import load_config
from oiafed.exceptions import ConfigError
from oiafed.runtime.worker import ClientWorker
from support import tiny_config, without_timing

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")


@pytest.fixture
def restore_determinism() -> Iterator[None]:
    algorithms = torch.are_deterministic_algorithms_enabled()
    cudnn = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    yield
    torch.use_deterministic_algorithms(algorithms)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


def finite_history(history: list[dict]) -> bool:
    return all(math.isfinite(row[key]) for row in history
               for key in ("train_loss", "train_accuracy", "loss", "accuracy"))


# -- the config ----------------------------------------------------------------------------

def test_defaults_and_accepted_values():
    cfg = load_config({})
    assert (cfg.device, cfg.precision, cfg.deterministic) == ("auto", "32", False)
    assert (cfg.runtime.device, cfg.runtime.num_gpus_per_client, cfg.runtime.resident) == (
        None, 0.0, False)
    for name in ("auto", "cpu", "cuda", "cuda:1", "mps"):
        assert load_config({"device": name, "runtime": {"device": name}}).device == name
    assert load_config({"precision": 32}).precision == "32"  # YAML's 32 is an int
    assert load_config({"precision": "bf16"}).precision == "bf16"


@pytest.mark.parametrize(("raw", "key"), [
    ({"device": "gpu"}, "device"), ({"device": "cuda:x"}, "device"),
    ({"runtime": {"device": "tpu"}}, "runtime.device"), ({"precision": 16}, "precision"),
    ({"runtime": {"num_gpus_per_client": -1}}, "runtime.num_gpus_per_client"),
])
def test_bad_values_name_the_key(raw, key):
    with pytest.raises(ConfigError, match=rf"^invalid config: {key}: "):
        load_config(raw)


def test_auto_falls_back_to_the_cpu_without_cuda():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert dev.resolve_device("auto").type == expected
    assert dev.resolve_device(None).type == expected
    assert dev.resolve_device("cpu") == torch.device("cpu")


@no_cuda
def test_cuda_without_cuda_is_a_config_error_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^device: cuda requested but "
                                          r"torch.cuda.is_available\(\) is False$"):
        dev.resolve_device("cuda")
    with pytest.raises(ConfigError, match=r"^device: cuda:1 requested"):
        oiafed.run(tiny_config(device="cuda:1"), run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()  # before anything ran
    with pytest.raises(ConfigError, match=r"^runtime.device: cuda requested"):
        oiafed.run(tiny_config(runtime={"device": "cuda"}), run_dir=tmp_path / "run")
    # a worker process (any runtime's learners) checks it too
    with pytest.raises(ConfigError, match=r"^runtime.device: cuda requested"):
        ClientWorker.from_config(load_config(tiny_config(runtime={"device": "cuda"})))


def test_16_mixed_needs_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ConfigError, match=r"^precision: 16-mixed needs a CUDA device"):
        oiafed.run(tiny_config(precision="16-mixed"), run_dir=tmp_path / "run")


# -- training on the CPU -------------------------------------------------------------------

def test_cpu_device_trains_as_the_default(tmp_path):
    default = oiafed.run(tiny_config(), run_dir=tmp_path / "a")
    cpu = oiafed.run(tiny_config(device="cpu", runtime={"resident": True}), run_dir=tmp_path / "b")
    assert without_timing(cpu.history) == without_timing(default.history)
    assert all(v.device.type == "cpu" for v in cpu.weights.values())


def test_bf16_on_the_cpu_trains_with_finite_metrics(tmp_path):
    result = oiafed.run(tiny_config(device="cpu", precision="bf16",
                                    model={"type": "mlp", "args": {"hidden": [16]}}),
                        run_dir=tmp_path / "run")
    assert finite_history(result.history)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert all(v.dtype == torch.float32 for v in result.weights.values())  # weights stay fp32
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["device"]["precision"] == "bf16"


def test_deterministic_runs_and_repeats(tmp_path, restore_determinism):
    cfg = tiny_config(deterministic=True)
    first = oiafed.run(cfg, run_dir=tmp_path / "a")
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    second = oiafed.run(cfg, run_dir=tmp_path / "b")
    assert without_timing(first.history) == without_timing(second.history)


def test_run_folder_records_the_device(tmp_path):
    oiafed.run(tiny_config(device="cpu"), run_dir=tmp_path / "run")
    record = json.loads((tmp_path / "run" / "summary.json").read_text())["device"]
    assert record["device"] == "cpu" and record["learners"] == "cpu"
    assert isinstance(record["name"], str) and record["name"]
    assert (record["precision"], record["deterministic"]) == ("32", False)
    # an MPS run: the learners on MPS, the server's float64 part on the CPU
    mps = dev.record(load_config({"device": "mps"}), torch.device("cpu"))
    assert (mps["device"], mps["learners"]) == ("cpu", "mps")


def test_load_model_on_a_device(tmp_path):
    oiafed.run(tiny_config(device="cpu"), run_dir=tmp_path / "run")
    model = oiafed.load_model(tmp_path / "run", device="cpu")
    assert all(p.device.type == "cpu" for p in model.parameters())
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"^device: cuda requested"):
            oiafed.load_model(tmp_path / "run", device="cuda")


# -- several clients per GPU ---------------------------------------------------------------

def test_round_robin_assignment():
    gpu = torch.device("cuda")
    assert [str(dev.round_robin(gpu, i, 2)) for i in range(5)] == [
        "cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert dev.round_robin(torch.device("cuda", 1), 4, 2) == torch.device("cuda", 1)
    assert dev.round_robin(torch.device("cpu"), 3, 2) == torch.device("cpu")
    assert dev.worker_device("cpu", 3) == "cpu"


def test_worker_device_spreads_over_visible_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert [dev.worker_device("cuda", i) for i in range(4)] == [
        "cuda:0", "cuda:1", "cuda:2", "cuda:0"]
    assert dev.worker_device("cuda:2", 0) == "cuda:2"


@pytest.mark.parametrize(("runtime", "key"), [
    ({}, "runtime.num_gpus_per_client"),  # Ray hides the GPUs of an actor reserving none
    ({"num_gpus_per_client": 0.5, "device": "cuda:1"}, "runtime.device"),
])
def test_ray_learners_on_cuda_need_a_gpu_share_and_plain_cuda(runtime, key):
    config = tiny_config(device="cuda", runtime={"mode": "ray", **runtime})
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: "):
        oiafed.validate(config)
    for valid in [{"device": "cuda", "runtime": {"num_gpus_per_client": 0.5}},
                  {"device": "cuda:0", "runtime": {"num_gpus_per_client": 1}},
                  {"device": "auto", "runtime": {}},  # no share: actors train on the CPU
                  {"device": "cuda", "runtime": {"device": "cpu"}}]:
        oiafed.validate(tiny_config(device=valid["device"],
                                    runtime={"mode": "ray", **valid["runtime"]}))
    for mode in ("serial", "parallel", "grpc"):  # no GPU shares outside Ray
        oiafed.validate(tiny_config(device="cuda:1", runtime={"mode": mode}))


def test_ray_actor_options_reserve_gpus():
    from oiafed.runtime.ray import actor_options

    options = actor_options(load_config({"runtime": {"num_gpus_per_client": 0.25}}).runtime)
    assert options["num_gpus"] == 0.25 and options["num_cpus"] == 1.0
    assert actor_options(load_config({}).runtime)["num_gpus"] == 0.0


def test_client_device_flag(monkeypatch, tmp_path):
    import oiafed.runtime.grpc.client as client

    seen = {}

    def fake_run_client(cfg, **kwargs):
        seen["cfg"] = cfg
        seen["worker"] = ClientWorker.from_config(cfg)
        return SimpleNamespace(ok=True, reason="completed")

    monkeypatch.setattr(client, "run_client", fake_run_client)
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps(tiny_config()))
    assert main(["client", str(config), "--server", "localhost:1", "--client-id", "client_0",
                 "--no-token", "--device", "cpu"]) == 0
    assert seen["cfg"].runtime.device == "cpu"
    assert seen["worker"].learner.device == torch.device("cpu")
    assert main(["client", str(config), "--server", "localhost:1", "--client-id", "client_0",
                 "--no-token", "--device", "gpu"]) == 2


# -- CUDA (skipped without a GPU) ----------------------------------------------------------

@cuda
def test_tiny_run_on_cuda(tmp_path):
    cpu = oiafed.run(tiny_config(device="cpu"), run_dir=tmp_path / "cpu")
    gpu = oiafed.run(tiny_config(device="cuda"), run_dir=tmp_path / "gpu")
    assert finite_history(gpu.history)
    assert {k: v.shape for k, v in gpu.weights.items()} == {
        k: v.shape for k, v in cpu.weights.items()}
    assert all(v.device.type == "cpu" for v in gpu.weights.values())
    record = json.loads((tmp_path / "gpu" / "summary.json").read_text())["device"]
    assert record["device"].startswith("cuda") and record["name"] != "cpu"
    model = oiafed.load_model(tmp_path / "gpu", device="cuda")
    assert next(model.parameters()).device.type == "cuda"


@cuda
def test_resident_data_on_cuda(tmp_path):
    result = oiafed.run(tiny_config(device="cuda", runtime={"resident": True}),
                        run_dir=tmp_path / "run")
    assert finite_history(result.history)


@cuda
def test_16_mixed_on_cuda(tmp_path):
    result = oiafed.run(tiny_config(device="cuda", precision="16-mixed",
                                    model={"type": "mlp", "args": {"hidden": [16]}}),
                        run_dir=tmp_path / "run")
    assert finite_history(result.history)


@cuda
def test_parallel_two_workers_on_cuda(tmp_path):
    result = oiafed.run(tiny_config(device="cuda", runtime={"mode": "parallel", "workers": 2}),
                        run_dir=tmp_path / "run")
    assert finite_history(result.history)
    assert result.history[-1]["num_clients"] == 4


CUDA_ALGORITHMS = {"fedprox": {"mu": 0.1}, "scaffold": {}, "fednova": {}, "feddyn": {"alpha": 0.1},
                   "fedadam": {"server_lr": 0.05}, "krum": {"f": 1}, "ditto": {}, "fedper": {},
                   "fedrep": {"head_epochs": 1}, "fedbn": {}, "moon": {}}


@cuda
@pytest.mark.parametrize("devices", [("cuda", None), ("cuda", "cpu"), ("cpu", "cuda")])
@pytest.mark.parametrize("name", list(CUDA_ALGORITHMS))
def test_every_algorithm_with_the_server_and_learners_on_either_device(tmp_path, name, devices):
    server, learners = devices
    result = oiafed.run(tiny_config(
        device=server, runtime={"device": learners},
        data={"type": "digits", "num_clients": 4, "local_test_fraction": 0.2},
        model={"type": "mlp", "args": {"hidden": [16]}},
        aggregator={"type": name, "args": CUDA_ALGORITHMS[name]}), run_dir=tmp_path / "run")
    assert finite_history(result.history)


@cuda
def test_central_dp_with_secure_aggregation_on_a_cuda_server(tmp_path):
    result = oiafed.run(tiny_config(
        device="cuda", data={"type": "digits", "num_clients": 3},
        trainer={"args": {"rounds": 2, "clients_per_round": 3}},
        privacy={"type": "central", "args": {"noise_multiplier": 0.1, "clip_norm": 1.0,
                                              "secure_rng": False}},
        runtime={"mode": "grpc", "secure_aggregation": {}}), run_dir=tmp_path / "run")
    assert finite_history(result.history)


@cuda
def test_early_stopping_restores_best_weights_on_the_cpu(tmp_path):
    from oiafed.callbacks import EarlyStoppingCallback

    result = oiafed.run(tiny_config(device="cuda"), run_dir=tmp_path / "run", callbacks=[
        EarlyStoppingCallback(metric="accuracy", patience=1, restore_best_weights=True)])
    assert all(v.device.type == "cpu" for v in result.weights.values())
