"""Mistakes that no retry mends end at once with exit 2 and a line saying which, never a
traceback: TLS set up differently at a client and its server (within seconds, not after
``--reconnect-timeout``), a config that cannot work or is hostile (a negative seed, deep
nesting, aliases of aliases, a model larger than memory), a run folder that cannot be written.
The real ``oiafed`` command runs in subprocesses, against real servers and real TLS handshakes
(a TLS client at a plaintext server: a client thread against an in-process server).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

import oiafed
from oiafed.config import MAX_CONFIG_DEPTH, MAX_CONFIG_SIZE
from oiafed.exceptions import RefusedError
from oiafed.runtime.grpc import ClientSecurity
from support import tiny_config
from test_grpc_deploy import Processes, free_port, wait_for
from test_grpc_transport import ClientThread, echo, make_certificates, make_trainer, serving

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

FAST = 60.0
"""Seconds within which a client must give up (its --reconnect-timeout is the default 300)."""


def cli_env(workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OIAFED_TOKEN", "OIAFED_SECRET")}
    env.update(NO_COLOR="1", COLUMNS="250", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(workdir), *sys.path]))
    return env


def assert_input_error(outcome: subprocess.CompletedProcess[str], *phrases: str) -> None:
    """Exit 2, every phrase on stderr, no traceback."""
    assert outcome.returncode == 2, (outcome.returncode, outcome.stderr)
    assert "Traceback" not in outcome.stderr, outcome.stderr
    for phrase in phrases:
        assert phrase in outcome.stderr, (phrase, outcome.stderr)


# -- TLS: a client set up differently from its server ---------------------------------------------


@dataclass
class Servers:
    """``oiafed server`` processes waiting for clients: their addresses (``tls``, ``mutual``),
    the certificates, the folder holding the config."""

    address: dict[str, str]
    certs: dict[str, Path]
    folder: Path


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """A server with TLS and one with mutual TLS."""
    folder = tmp_path_factory.mktemp("tls")
    certs = make_certificates(folder)
    (folder / "config.yaml").write_text(yaml.safe_dump(tiny_config()))
    group = Processes(folder, cli_env(folder))
    address = {"tls": f"127.0.0.1:{free_port()}", "mutual": f"127.0.0.1:{free_port()}"}
    tls = ["--tls-cert", str(certs["server.pem"]), "--tls-key", str(certs["server.key"])]
    try:
        group.start("tls", "server", "config.yaml", "--address", address["tls"], "--no-token",
                    "--run-dir", "tls-run", *tls)
        group.start("mutual", "server", "config.yaml", "--address", address["mutual"],
                    "--no-token", "--run-dir", "mutual-run", *tls,
                    "--tls-client-ca", str(certs["ca.pem"]))
        for name in address:
            port = int(address[name].rsplit(":", 1)[1])
            wait_for(lambda p=port, n=name: _listening(p) or group.started[n].poll() is not None,
                     f"the {name} server")
            assert group.started[name].poll() is None, group.log(name)
        yield Servers(address, certs, folder)
    finally:
        group.kill_all()


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def client(servers: Servers, server: str, *flags: str
           ) -> tuple[subprocess.CompletedProcess[str], float]:
    """``oiafed client`` as client_0 of ``server`` with the default reconnect timeout; its
    outcome and how long it took."""
    started = time.monotonic()
    outcome = subprocess.run(
        [sys.executable, "-m", "oiafed.cli", "client", "config.yaml", "--server",
         servers.address[server], "--client-id", "client_0", "--no-token", "--threads", "1",
         *flags],
        cwd=servers.folder, env=cli_env(servers.folder), capture_output=True, text=True,
        timeout=2 * FAST)
    return outcome, time.monotonic() - started


def test_a_plaintext_client_at_a_tls_server_exits_2_at_once(servers):
    for server in ("tls", "mutual"):
        outcome, took = client(servers, server)
        assert_input_error(outcome, f"the server {servers.address[server]} uses TLS, but this "
                                    "client connects in plaintext: give --tls-ca")
        assert took < FAST, took


def test_a_client_certificate_the_mutual_tls_server_refuses_exits_2_at_once(servers):
    ca = str(servers.certs["ca.pem"])
    outcome, took = client(servers, "mutual", "--tls-ca", ca)
    assert_input_error(outcome, "requires a client certificate (mutual TLS)",
                       "give --tls-cert and --tls-key")
    assert took < FAST, took
    # a certificate signed by a CA the server does not trust
    stranger = str(servers.certs["other_ca.pem"])
    outcome, took = client(servers, "mutual", "--tls-ca", ca, "--tls-cert", stranger,
                           "--tls-key", str(servers.certs["other_ca.key"]))
    assert_input_error(outcome, f"refused this client's certificate ({stranger})",
                       "--tls-client-ca")
    assert took < FAST, took


def test_a_server_certificate_for_another_name_exits_2_at_once(servers):
    outcome, took = client(servers, "tls", "--tls-ca", str(servers.certs["ca.pem"]),
                           "--tls-server-name", "fl.example.org")
    assert_input_error(outcome, f"the certificate of the server {servers.address['tls']} does "
                                "not name fl.example.org (--tls-server-name)")
    assert took < FAST, took


def test_a_tls_client_at_a_plaintext_server_is_refused_saying_so(tmp_path):
    certs = make_certificates(tmp_path)

    async def scenario() -> BaseException | None:
        async with serving(make_trainer(1)) as runtime:
            client = ClientThread(runtime.port, "client_0", echo("client_0"), reconnect_timeout=60,
                                  security=ClientSecurity(None, tls_ca=certs["ca.pem"]))
            await client.ended()
            return client.error

    error = asyncio.run(scenario())
    assert isinstance(error, RefusedError), error
    assert "does not speak TLS, but this client does (--tls-ca, --tls-cert)" in str(error)


# -- configs that cannot work or are hostile ------------------------------------------------------


KWARGS_MODULE = """
    from oiafed import Callback, register


    @register("callback.anything")
    class Anything(Callback):
        def __init__(self, **kwargs):
            self.kwargs = kwargs
"""

HUGE_MODEL_MODULE = """
    from torch import nn

    from oiafed import register


    @register("model.huge")
    def huge(input_shape, num_classes):
        return nn.Linear(2**29, 2**29)  # 2**60 bytes: no machine allocates it
"""


def alias_bomb() -> str:
    """A config of under 1 kB whose aliases of aliases expand to about 30 MB."""
    levels = "\n".join(f"      l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 7))
    return textwrap.dedent("""\
        name: bomb
        imports: [kwargs_component]
        data: {type: digits, num_clients: 4}
        model: {type: logreg}
        callbacks:
          - type: anything
            args:
              l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]
        """) + levels + "\n"


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


CASES: dict[str, tuple[list[str], dict[str, str]]] = {
    "negative_seed": (["run", "config.yaml", "seed=-1"], {}),
    "deep_yaml": (["run", "deep.yaml"], {"deep.yaml": f"name: deep\nx: {nested(1000)}\n"}),
    "deep_override": (["run", "config.yaml", f"x={nested(1000)}"], {}),
    "deeper_than_the_bound": (["run", "deep.yaml"], {"deep.yaml": textwrap.dedent(f"""\
        name: deep
        imports: [kwargs_component]
        callbacks: [{{type: anything, args: {{x: {nested(100)}}}}}]
        """)}),
    "int_too_long": (["run", "long.yaml"], {"long.yaml": f"name: long\nseed: {'7' * 5000}\n"}),
    "alias_bomb": (["run", "bomb.yaml", "--run-dir", "bomb-run"], {"bomb.yaml": alias_bomb()}),
    "mlp_too_large": (["run", "config.yaml", "model.type=mlp", "model.args.hidden=[10000000000]"],
                      {}),
    "model_not_allocated": (["run", "config.yaml", "imports=[huge_model]", "model.type=huge"], {}),
    "nul_in_output_dir": (["run", "config.yaml", 'output_dir="runs\\0x"'], {}),
}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[Path, dict[str, subprocess.CompletedProcess[str]]]:
    """Every case of ``CASES`` run at once, each in its own folder."""
    root = tmp_path_factory.mktemp("configs")
    started = {}
    for name, (args, files) in CASES.items():
        folder = root / name
        folder.mkdir()
        (folder / "config.yaml").write_text(yaml.safe_dump(tiny_config()))
        (folder / "kwargs_component.py").write_text(textwrap.dedent(KWARGS_MODULE))
        (folder / "huge_model.py").write_text(textwrap.dedent(HUGE_MODEL_MODULE))
        for file, text in files.items():
            (folder / file).write_text(text)
        started[name] = subprocess.Popen(
            [sys.executable, "-m", "oiafed.cli", *args], cwd=folder, env=cli_env(folder),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = {}
    for name, process in started.items():
        stdout, stderr = process.communicate(timeout=240)
        results[name] = subprocess.CompletedProcess(process.args, process.returncode, stdout,
                                                    stderr)
    return root, results


def test_a_negative_seed_is_a_config_error_naming_seed(outcomes):
    root, results = outcomes
    assert_input_error(results["negative_seed"], "seed: Input should be greater than or equal to 0")
    assert not (root / "negative_seed" / "runs").exists()


def test_deeply_nested_yaml_is_a_config_error(outcomes):
    _, results = outcomes
    assert_input_error(results["deep_yaml"],
                       f"deep.yaml nests too deeply (at most {MAX_CONFIG_DEPTH} levels)")
    assert_input_error(results["deep_override"],
                       f"override 'x' nests too deeply (at most {MAX_CONFIG_DEPTH} levels)")
    assert_input_error(results["deeper_than_the_bound"],
                       f"callbacks[0].args.x...: nested deeper than {MAX_CONFIG_DEPTH} levels")


def test_a_yaml_value_python_cannot_read_is_a_config_error(outcomes):
    _, results = outcomes
    assert_input_error(results["int_too_long"], "long.yaml is not valid YAML", "4300 digits")


def test_a_yaml_alias_bomb_is_refused_before_it_expands(outcomes):
    root, results = outcomes
    assert len(alias_bomb()) < 1000
    assert_input_error(results["alias_bomb"], "callbacks[0].args.l6...: the config is larger than "
                                              f"{MAX_CONFIG_SIZE:,} characters written out")
    assert not (root / "alias_bomb" / "bomb-run").exists()  # no config.yaml of 30 MB


def test_a_model_larger_than_memory_is_a_config_error_naming_model_args(outcomes):
    _, results = outcomes
    assert_input_error(results["mlp_too_large"], "model.args: the model would have "
                                                 "750,000,000,010 parameters", "machine's memory")
    assert_input_error(results["model_not_allocated"],
                       "model.args: cannot allocate model 'huge'")


def test_an_output_dir_that_cannot_be_a_folder_is_an_input_error(outcomes):
    _, results = outcomes
    assert_input_error(results["nul_in_output_dir"], "cannot write the run folder",
                       "(output_dir): embedded null byte")


# -- a run folder that cannot be written ----------------------------------------------------------


def _without_file_permission_override() -> list[str]:
    """A command prefix under which permissions apply (root ignores them); skips the test
    where that cannot be had."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: permissions cannot be tested")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"]


def test_resuming_a_run_folder_that_cannot_be_written_changes_nothing_and_exits_2(tmp_path):
    prefix = _without_file_permission_override()
    run_dir = tmp_path / "run"
    oiafed.run(tiny_config(trainer={"args": {"rounds": 1}}), run_dir=run_dir)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    modes = {p: p.stat().st_mode for p in [run_dir, *run_dir.iterdir()]}
    for path in modes:
        path.chmod(stat.S_IMODE(modes[path]) & ~0o222)
    try:
        outcome = subprocess.run(
            [*prefix, sys.executable, "-m", "oiafed.cli", "run", "--resume", str(run_dir),
             "trainer.args.rounds=2", "-q"],
            cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True, timeout=120)
    finally:
        for path, mode in modes.items():
            path.chmod(stat.S_IMODE(mode))
    assert_input_error(outcome, f"cannot resume: cannot write the run folder {run_dir}")
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before
