"""Start a model server: ``tensorflow_model_server`` if it is on PATH, else the tfrs-ctx
protocol-compatible model server (``serving.model_server``), with the same flags.

CLI (execs the chosen server, so signals reach it directly)::

    python -m serving.launcher --port 8500 [--model_config_file serving/models.config] --models_dir DIR \\
        [--enable_batching --batching_parameters_file serving/batching_parameters.txt] \\
        [--server auto|binary|python] [--dry_run]

The real binary needs absolute base paths: the launcher writes an absolute copy of the config to
a temporary file and passes that. Python API (a separate server process)::

    with start_server(models_dir) as server:      # port=0: a free port
        server.wait_ready(120)
        channel = grpc.insecure_channel(server.address)

    with start_server(models_dir, rest_api_port=free_port()) as server:   # also the REST API
        requests.post(f"{server.rest_url}/v1/models/encoder:predict", json={"instances": [...]})

``--rest_api_port`` (and ``--rest_api_timeout_in_ms``) reach either server: the compatible one
serves the same REST API as the binary (see ``serving.model_server.rest``).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import grpc

from serving.model_server import health, server_config
from tfrs_ctx.testing import LOOPBACK, free_port

BINARY = "tensorflow_model_server"
SERVING_DIR = Path(__file__).resolve().parent
REPO_ROOT = SERVING_DIR.parent
DEFAULT_CONFIG = SERVING_DIR / "models.config"
DEFAULT_BATCHING_PARAMETERS = SERVING_DIR / "batching_parameters.txt"
COMPATIBLE_SERVER = "tfrs-ctx protocol-compatible model server"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serving.launcher", description=__doc__.split("\n")[0])
    server_config.add_server_flags(p)
    p.add_argument("--server", choices=("auto", "binary", "python"), default="auto", help="which server to start")
    p.add_argument("--dry_run", action="store_true", help="print the command instead of running it")
    return p


def python_argv(args: argparse.Namespace) -> list[str]:
    """argv for the compatible server: every server flag that differs from its default."""
    defaults = argparse.ArgumentParser(add_help=False)
    server_config.add_server_flags(defaults)
    argv = [sys.executable, "-m", "serving.model_server"]
    for dest, default in vars(defaults.parse_args([])).items():
        value = getattr(args, dest)
        if value is not None and value != default:
            argv.append(f"--{dest}={str(value).lower() if isinstance(value, bool) else value}")
    return argv


def build_command(args: argparse.Namespace, kind: str = "auto") -> tuple[list[str], str]:
    """(argv, "binary" | "python") for the server ``kind`` asks for ("auto": binary if on PATH)."""
    binary = shutil.which(BINARY) if kind in ("auto", "binary") else None
    if kind == "binary" and binary is None and not args.dry_run:
        raise SystemExit(f"--server binary: {BINARY} is not on PATH")
    if kind == "python" or (kind == "auto" and binary is None):
        return python_argv(args), "python"
    config_file = base_path = None
    if args.model_config_file:
        fd, config_file = tempfile.mkstemp(prefix="tfrs-ctx-models-", suffix=".config")
        os.close(fd)
        server_config.write_absolute_config(args.model_config_file, args.models_dir, config_file)
    else:
        base_path = server_config.resolve_base_path(args.model_base_path, args.models_dir)
    if args.port == 0:
        args.port = free_port()
    return server_config.binary_argv(binary or BINARY, args, config_file, base_path), "binary"


def _child_env(kind: str) -> dict[str, str]:
    env = dict(os.environ)
    if kind == "python":  # importable from anywhere (the serving package sets TensorFlow's environment)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.model_config_file and not args.model_base_path:
        args.model_config_file = str(DEFAULT_CONFIG)  # the bundled serving/models.config
    server_config.check_server_flags(parser, args)
    command, kind = build_command(args, args.server)
    if kind == "binary":
        print(f"launcher: starting {BINARY} (the real TF Serving binary): {' '.join(command)}", flush=True)
        if args.host != "0.0.0.0":
            print(f"launcher: note: {BINARY} has no --host flag and listens on 0.0.0.0:{args.port}", flush=True)
        if args.port_file:
            Path(args.port_file).write_text(str(args.port))
    else:
        why = "forced by --server python" if args.server == "python" else f"{BINARY} is not on PATH"
        print(f"launcher: starting the {COMPATIBLE_SERVER} ({why}): {' '.join(command)}", flush=True)
    if args.dry_run:
        return 0
    os.execvpe(command[0], command, _child_env(kind))
    return 1  # not reached


class ServerHandle:
    """A model server running as a child process."""

    def __init__(
        self,
        process: subprocess.Popen,
        kind: str,
        port: int,
        port_file: str | None,
        log_path: str,
        model_names: list[str],
        cleanup: list[str],
        own_log: bool = False,
        rest_port: int = 0,
    ):
        self.process, self.kind, self.log_path = process, kind, log_path
        self.rest_port = rest_port  # 0: no REST API
        self.model_names = model_names
        self._port, self._port_file, self._cleanup = port, port_file, cleanup
        self._own_log = own_log

    @property
    def port(self) -> int:
        """The bound port (waits for a server started with port 0 to report it)."""
        deadline = time.monotonic() + 120
        while not self._port:
            if self._port_file and os.path.exists(self._port_file):
                self._port = int(Path(self._port_file).read_text())
                break
            self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError("the server did not report its port within 120 s")
            time.sleep(0.05)
        return self._port

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def rest_url(self) -> str:
        """``http://127.0.0.1:PORT`` of the REST API (``rest_api_port`` must have been set)."""
        if not self.rest_port:
            raise RuntimeError("this server was started without --rest_api_port")
        return f"http://{LOOPBACK}:{self.rest_port}"

    def logs(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def _check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"model server exited with {self.process.returncode}:\n{self.logs()[-4000:]}")

    def is_ready(self) -> bool:
        """Health SERVING; for the real binary (no health service), every model AVAILABLE."""
        with grpc.insecure_channel(self.address) as channel:
            try:
                return health.check(channel, timeout=2) == "SERVING"
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                    return False
            return all(model_available(channel, name) for name in self.model_names)

    def wait_ready(self, timeout: float = 120.0) -> ServerHandle:
        """Block until the server serves; raises (with its log) if it dies or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            if (self._port or (self._port_file and os.path.exists(self._port_file))) and self.is_ready():
                return self
            time.sleep(0.1)
        raise TimeoutError(f"model server not ready after {timeout} s:\n{self.logs()[-4000:]}")

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM (graceful: in-flight requests finish), SIGKILL after ``timeout``; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for path in self._cleanup:
            with contextlib.suppress(OSError):
                os.remove(path)
        self._cleanup = []
        return self.process.returncode

    def close(self) -> int:
        """``stop()``, then delete the log file if this handle created it."""
        code = self.stop()
        if self._own_log:
            with contextlib.suppress(OSError):
                os.remove(self.log_path)
            self._own_log = False
        return code

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def model_available(channel: grpc.Channel, name: str, version: int | None = None) -> bool:
    """Whether the server reports ``name`` (``version``, else any version) AVAILABLE."""
    from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = name
    if version is not None:
        request.model_spec.version.value = version
    try:
        response = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(request, timeout=2)
    except grpc.RpcError:
        return False
    available = get_model_status_pb2.ModelVersionStatus.AVAILABLE
    return any(s.state == available for s in response.model_version_status)


def start_server(
    models_dir: str | os.PathLike | None,
    port: int = 0,
    config: str | os.PathLike | None = DEFAULT_CONFIG,
    batching: bool = False,
    poll_seconds: float = 1.0,
    *,
    batching_parameters: str | os.PathLike | None = DEFAULT_BATCHING_PARAMETERS,
    server: str = "auto",
    extra_args: Sequence[str] = (),
    log_path: str | None = None,
    rest_api_port: int = 0,
) -> ServerHandle:
    """Start a model server subprocess on loopback; ``port=0`` picks a free port.

    Its stdout/stderr go to ``log_path`` (default: a temporary file, deleted by ``close()``, the
    context manager's exit and at interpreter exit; ``stop()`` keeps it for ``logs()``).

    ``server``: "auto" (the real binary if on PATH), "binary" or "python". ``extra_args``: more
    server flags (e.g. ``["--model_name=m", "--model_base_path=/p"]`` with ``config=None``).
    ``rest_api_port``: serve the REST API there too (0: no REST API; pick one with :func:`free_port`);
    the handle's ``rest_url`` is its address.
    """
    argv = [f"--port={port}", f"--file_system_poll_wait_seconds={poll_seconds}", *extra_args]
    if rest_api_port:
        argv.append(f"--rest_api_port={rest_api_port}")
    if models_dir is not None:
        argv.append(f"--models_dir={os.fspath(models_dir)}")
    if config is not None:
        argv.append(f"--model_config_file={os.fspath(config)}")
    if batching:
        argv.append("--enable_batching")
        if batching_parameters is not None:
            argv.append(f"--batching_parameters_file={os.fspath(batching_parameters)}")
    cleanup: list[str] = []
    port_file = None
    if port == 0 and server != "binary" and not (server == "auto" and shutil.which(BINARY)):
        fd, port_file = tempfile.mkstemp(prefix="tfrs-ctx-port-")
        os.close(fd)
        os.remove(port_file)
        argv.append(f"--port_file={port_file}")
        cleanup.append(port_file)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.model_config_file and not args.model_base_path:
        args.model_config_file = str(DEFAULT_CONFIG)  # the bundled serving/models.config
    server_config.check_server_flags(parser, args)
    command, kind = build_command(args, server)
    cleanup += [a.split("=", 1)[1] for a in command if a.startswith("--model_config_file=") and kind == "binary"]
    own_log = log_path is None
    if own_log:
        fd, log_path = tempfile.mkstemp(prefix="tfrs-ctx-server-", suffix=".log")
        os.close(fd)
    if args.model_config_file:
        names = [
            m.name for m in server_config.read_model_server_config(args.model_config_file).model_config_list.config
        ]
    else:
        names = [args.model_name]
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=_child_env(kind))
    port = args.port if kind == "binary" else port
    handle = ServerHandle(
        process, kind, port, port_file, log_path, names, cleanup, own_log=own_log, rest_port=args.rest_api_port
    )
    atexit.register(handle.close)
    return handle


if __name__ == "__main__":
    sys.exit(main())
