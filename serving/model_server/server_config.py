"""Flags and model config files shared by the model server and the launcher (no TensorFlow import).

Flags named like ``tensorflow_model_server``'s mean the same; ``--host``, ``--models_dir``,
``--max_message_bytes``, ``--port_file``, ``--runtime`` and ``--log_level`` belong to this project only, and
``binary_argv`` translates them when the real binary is started. Relative ``base_path`` entries
are resolved against ``--models_dir`` (default: the working directory); the binary gets a copy of
the config with absolute paths, which it requires.
"""

from __future__ import annotations

import argparse
import os

from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_GRPC_THREADS = 64  # enough for batching to see concurrent callers
DEFAULT_REST_TIMEOUT_MS = 30000  # tensorflow_model_server's --rest_api_timeout_in_ms default


def _bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {value}")


def add_server_flags(p: argparse.ArgumentParser) -> None:
    flag = p.add_argument
    # tensorflow_model_server's flags (same names, same meanings).
    flag("--port", type=int, default=8500, help="gRPC port (0: pick a free one, see --port_file)")
    flag("--model_config_file", help="ModelServerConfig text proto (model_config_list)")
    flag("--model_name", default="default", help="single-model form: the model's name")
    flag("--model_base_path", help="single-model form: the model's base path")
    flag("--enable_batching", type=_bool, nargs="?", const=True, default=False, help="server-side batching")
    flag("--batching_parameters_file", help="BatchingParameters text proto (needs --enable_batching)")
    flag("--file_system_poll_wait_seconds", type=float, default=1.0, help="base path poll interval (0: never)")
    flag("--model_config_file_poll_wait_seconds", type=float, default=0.0, help="config reload interval (0: never)")
    flag("--enable_model_warmup", type=_bool, nargs="?", const=True, default=True, help="replay warm-up requests")
    flag("--grpc_max_threads", type=int, default=0, help=f"gRPC worker threads (0: {DEFAULT_GRPC_THREADS} here)")
    flag("--grpc_channel_arguments", default="", help="comma-separated key=value gRPC server arguments")
    flag("--tensorflow_intra_op_parallelism", type=int, default=0, help="0: TensorFlow's default")
    flag("--tensorflow_inter_op_parallelism", type=int, default=0, help="0: TensorFlow's default")
    flag("--rest_api_port", type=int, default=0, help="HTTP/REST API port (0: no REST API; must differ from --port)")
    flag(
        "--rest_api_timeout_in_ms", type=int, default=DEFAULT_REST_TIMEOUT_MS, help="REST predict timeout (<= 0: none)"
    )
    flag("--rest_api_num_threads", type=int, default=0, help="REST worker threads (0: one per connection here)")
    # This project's flags.
    flag("--host", default="127.0.0.1", help="address to bind (the real binary always binds 0.0.0.0)")
    flag("--models_dir", help="directory relative base_path entries are resolved against (default: cwd)")
    flag("--max_message_bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES, help="gRPC send/receive limit")
    flag("--port_file", help="write the bound port to this file once listening")
    flag(
        "--runtime",
        choices=("session", "function"),
        default="session",
        help="session: the MetaGraph in a v1 Session, as TF Serving runs it; function: tf.saved_model.load",
    )
    flag("--log_level", default="INFO", help="Python logging level")


def check_server_flags(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Flag combinations tensorflow_model_server refuses too."""
    if not args.model_config_file and not args.model_base_path:
        p.error("one of --model_config_file or --model_base_path is required")
    if args.batching_parameters_file and not args.enable_batching:
        p.error("--batching_parameters_file is set without --enable_batching")


def channel_arguments(args: argparse.Namespace) -> dict[str, int | str]:
    """gRPC server options: message size limits plus ``--grpc_channel_arguments``."""
    options: dict[str, int | str] = {
        "grpc.max_receive_message_length": args.max_message_bytes,
        "grpc.max_send_message_length": args.max_message_bytes,
    }
    for item in filter(None, args.grpc_channel_arguments.split(",")):
        key, _, value = item.partition("=")
        value = value.strip()
        options[key.strip()] = int(value) if value.lstrip("-").isdigit() else value
    return options


def binary_argv(binary: str, args: argparse.Namespace, config_file: str | None, base_path: str | None) -> list[str]:
    """argv for ``tensorflow_model_server``: its own flags, ours translated or dropped.

    ``config_file``/``base_path`` are the absolute-path versions the binary needs.
    """
    argv = [binary, f"--port={args.port}"]
    if config_file:
        argv.append(f"--model_config_file={config_file}")
    else:
        argv += [f"--model_name={args.model_name}", f"--model_base_path={base_path}"]
    if args.enable_batching:
        argv.append("--enable_batching=true")
        if args.batching_parameters_file:
            argv.append(f"--batching_parameters_file={os.path.abspath(args.batching_parameters_file)}")
    argv += [
        f"--file_system_poll_wait_seconds={max(1, round(args.file_system_poll_wait_seconds))}",
        f"--enable_model_warmup={str(args.enable_model_warmup).lower()}",
        f"--grpc_channel_arguments={','.join(f'{k}={v}' for k, v in channel_arguments(args).items())}",
    ]
    if args.model_config_file_poll_wait_seconds > 0:
        argv.append(f"--model_config_file_poll_wait_seconds={max(1, round(args.model_config_file_poll_wait_seconds))}")
    for name in ("grpc_max_threads", "tensorflow_intra_op_parallelism", "tensorflow_inter_op_parallelism"):
        if getattr(args, name):
            argv.append(f"--{name}={getattr(args, name)}")
    if args.rest_api_port:
        argv.append(f"--rest_api_port={args.rest_api_port}")
        if args.rest_api_timeout_in_ms != DEFAULT_REST_TIMEOUT_MS:
            argv.append(f"--rest_api_timeout_in_ms={args.rest_api_timeout_in_ms}")
        if args.rest_api_num_threads:
            argv.append(f"--rest_api_num_threads={args.rest_api_num_threads}")
    return argv


def resolve_base_path(base_path: str, models_dir: str | None) -> str:
    """Absolute base path; relative ones are taken against ``models_dir`` (default: working dir).

    ``models/encoder`` with ``--models_dir runs/x`` is ``runs/x/models/encoder``. A models_dir
    that is itself named ``models`` and has no ``models`` subfolder is taken as the models folder
    (``--models_dir runs/x/models`` -> ``runs/x/models/encoder``), the ``--out`` of the export.
    """
    if os.path.isabs(base_path):
        return os.path.normpath(base_path)
    root = os.path.abspath(models_dir or os.getcwd())
    head, _, rest = os.path.normpath(base_path).partition(os.sep)
    if rest and head == os.path.basename(root) and not os.path.isdir(os.path.join(root, head)):
        return os.path.join(root, rest)
    return os.path.join(root, base_path)


def read_model_server_config(path: str) -> model_server_config_pb2.ModelServerConfig:
    """Parse a ModelServerConfig text proto (``--model_config_file``)."""
    with open(path) as f:
        return text_format.Parse(f.read(), model_server_config_pb2.ModelServerConfig())


def write_absolute_config(config_file: str, models_dir: str | None, out_path: str) -> str:
    """Copy of ``config_file`` with absolute base paths (for ``tensorflow_model_server``)."""
    config = read_model_server_config(config_file)
    for model in config.model_config_list.config:
        model.base_path = resolve_base_path(model.base_path, models_dir)
    with open(out_path, "w") as f:
        f.write(text_format.MessageToString(config))
    return out_path
