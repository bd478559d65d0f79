"""Model versions on disk -> loaded servables: config, version policy, polling and hot swap.

Layout is TF Serving's: ``BASE/<name>/<integer version>/saved_model.pb``. Only directories whose
names are all digits are versions, so an export written under a temporary name (``.tmp-3``,
``3.tmp``) and then renamed is never seen half-written. A digit-named directory that fails to load
(corrupt, or still being written by a non-atomic export) is logged, marked END with its error and
skipped; it is retried only when its contents change, and the versions already loaded keep serving.

Swaps are atomic: a new version is loaded and warmed up off the request path, then the model's
``{version: Servable}`` map is replaced in one assignment. Requests hold a reference to the
servable they resolved, so an unloaded version finishes its in-flight requests before being freed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable

import grpc
from tensorflow_serving.apis import get_model_status_pb2, model_pb2
from tensorflow_serving.config import model_server_config_pb2

from serving.model_server.servable import Servable, ServingError
from serving.model_server.server_config import resolve_base_path

log = logging.getLogger("tfrs_ctx.serving")

State = get_model_status_pb2.ModelVersionStatus.State
MAX_ENDED_VERSIONS = 20  # ended versions kept for GetModelStatus, per model


@dataclasses.dataclass(frozen=True)
class VersionPolicy:
    """``latest {num_versions}``, ``all {}`` or ``specific {versions}`` (TF Serving's policies)."""

    kind: str = "latest"
    num_versions: int = 1
    versions: frozenset[int] = frozenset()

    def __str__(self) -> str:
        if self.kind == "latest":
            return f"latest {self.num_versions}"
        return "all" if self.kind == "all" else f"specific {sorted(self.versions)}"

    def select(self, candidates: Iterable[int]) -> set[int]:
        """The versions to serve out of those on disk that are loadable."""
        candidates = set(candidates)
        if self.kind == "all":
            return candidates
        if self.kind == "specific":
            return candidates & self.versions
        return set(sorted(candidates, reverse=True)[: self.num_versions])


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """One served model: name, absolute base path, version policy and version labels."""

    name: str
    base_path: str
    policy: VersionPolicy = VersionPolicy()
    labels: dict[str, int] = dataclasses.field(default_factory=dict)


def _policy_from_proto(proto) -> VersionPolicy:
    choice = proto.WhichOneof("policy_choice")
    if choice == "all":
        return VersionPolicy("all")
    if choice == "specific":
        if not proto.specific.versions:
            raise ValueError("specific version policy lists no versions")
        return VersionPolicy("specific", versions=frozenset(proto.specific.versions))
    num = proto.latest.num_versions if choice == "latest" and proto.latest.num_versions else 1
    return VersionPolicy("latest", num_versions=num)


def configs_from_proto(config: model_server_config_pb2.ModelServerConfig, models_dir: str | None) -> list[ModelConfig]:
    """Validate a ModelServerConfig and turn it into ModelConfigs with absolute base paths."""
    if config.WhichOneof("config") != "model_config_list":
        raise ValueError("only model_config_list is supported (custom_model_config is not)")
    models, names = [], set()
    for m in config.model_config_list.config:
        if not m.name or not m.base_path:
            raise ValueError(f"every model config needs a name and a base_path: {m}")
        if m.name in names:
            raise ValueError(f"model '{m.name}' is configured twice")
        if m.model_platform not in ("", "tensorflow"):
            raise ValueError(f"model '{m.name}': unsupported model_platform '{m.model_platform}'")
        names.add(m.name)
        base = resolve_base_path(m.base_path, models_dir)
        models.append(ModelConfig(m.name, base, _policy_from_proto(m.model_version_policy), dict(m.version_labels)))
    return models


def single_model_config(name: str, base_path: str, models_dir: str | None = None) -> list[ModelConfig]:
    """The ``--model_name/--model_base_path`` form."""
    return [ModelConfig(name, resolve_base_path(base_path, models_dir))]


def version_dirs(base_path: str) -> dict[int, str]:
    """``{version: path}`` for the all-digit subdirectories of ``base_path`` (temp names ignored)."""
    try:
        entries = list(os.scandir(base_path))
    except (FileNotFoundError, NotADirectoryError):
        return {}
    return {int(e.name): e.path for e in entries if e.name.isdigit() and e.name.isascii() and e.is_dir()}


def _fingerprint(path: str) -> tuple:
    """Changes when a version directory's contents change (so a failed load is retried)."""
    stamps = []
    for name in ("", "saved_model.pb", "variables"):
        try:
            st = os.stat(os.path.join(path, name))
            stamps.append((st.st_ino, st.st_mtime_ns, st.st_size))
        except OSError:
            stamps.append(None)
    return tuple(stamps)


@dataclasses.dataclass
class VersionStatus:
    state: int
    error_code: grpc.StatusCode = grpc.StatusCode.OK
    error_message: str = ""
    since: float = dataclasses.field(default_factory=time.time)


class _Model:
    """Per-model state. ``servables`` is replaced, never mutated, so readers need no lock."""

    def __init__(self, config: ModelConfig):
        self.config = config
        self.servables: dict[int, Servable] = {}
        self.statuses: dict[int, VersionStatus] = {}
        self.failed: dict[int, tuple] = {}
        self.warned_missing = False


class ModelStore:
    """Loads model versions by policy, answers version lookups and keeps polling the base paths."""

    def __init__(
        self,
        configs: list[ModelConfig],
        warmup: bool = True,
        load: Callable[[str, int, str], Servable] = Servable,
    ):
        """``load(name, version, path)`` builds a Servable (e.g. ``functools.partial(Servable, runtime=...)``)."""
        self._warmup, self._load_servable = warmup, load
        self._models: dict[str, _Model] = {c.name: _Model(c) for c in configs}
        self._sync_lock = threading.Lock()  # one poll / reload at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- request path ----------------------------------------------------------------------

    def model_names(self) -> list[str]:
        return sorted(self._models)

    def loaded_versions(self, name: str) -> list[int]:
        model = self._models.get(name)
        return sorted(model.servables) if model else []

    def is_available(self, name: str | None = None) -> bool:
        """Whether ``name`` (or every configured model) has a loaded version."""
        models = [self._models.get(name)] if name else list(self._models.values())
        return all(m is not None and m.servables for m in models)

    def get(self, spec: model_pb2.ModelSpec) -> Servable:
        """The servable a ModelSpec asks for: by version, by label, else the latest loaded one."""
        model = self._models.get(spec.name)
        servables = model.servables if model else {}
        choice = spec.WhichOneof("version_choice")
        if choice == "version_label":
            version = model.config.labels.get(spec.version_label) if model else None
            if version is None:
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"Unrecognized servable version label: {spec.version_label}"
                )
        elif choice == "version":
            version = spec.version.value
        else:
            if not servables:
                raise ServingError(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Latest({spec.name})")
            return servables[max(servables)]
        servable = servables.get(version)
        if servable is None:
            raise ServingError(
                grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Specific({spec.name}, {version})"
            )
        return servable

    def status(self, name: str, version: int | None = None) -> dict[int, VersionStatus]:
        """Version states for GetModelStatus (NOT_FOUND like TF Serving when nothing is known)."""
        model = self._models.get(name)
        statuses = dict(model.statuses) if model else {}
        if version is not None:
            if version not in statuses:
                raise ServingError(grpc.StatusCode.NOT_FOUND, f"Could not find version {version} of model {name}")
            return {version: statuses[version]}
        if not statuses:
            raise ServingError(grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {name}")
        return statuses

    # ---- loading ---------------------------------------------------------------------------

    def poll_once(self) -> None:
        """Bring every model in line with its base path and policy (loads before unloads)."""
        with self._sync_lock:
            for model in list(self._models.values()):
                if self._stop.is_set():
                    return
                try:
                    self._sync(model)
                except Exception:
                    log.exception("model '%s': poll failed", model.config.name)

    def reload(self, configs: list[ModelConfig]) -> None:
        """Apply a new model list (HandleReloadConfigRequest / config file poll), then sync."""
        with self._sync_lock:
            models = {}
            for config in configs:
                model = self._models.get(config.name)
                if model is None or model.config.base_path != config.base_path:
                    log.info("model '%s': added (base path %s)", config.name, config.base_path)
                    model = _Model(config)
                elif model.config != config:
                    log.info("model '%s': config changed", config.name)
                    model.config = config
                    model.failed.clear()
                models[config.name] = model
            for name in self._models.keys() - models.keys():
                log.info("model '%s': removed from the config; unloading", name)
            self._models = models
        self.poll_once()

    def start_polling(self, interval_s: float) -> None:
        """Poll the base paths every ``interval_s`` seconds in a daemon thread (0: never)."""
        if interval_s <= 0:
            return

        def loop() -> None:
            while not self._stop.wait(interval_s):
                self.poll_once()

        self._thread = threading.Thread(target=loop, name="model-store-poll", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _set_status(self, model: _Model, version: int, status: VersionStatus) -> None:
        statuses = {**model.statuses, version: status}
        ended = sorted(v for v, s in statuses.items() if s.state == State.END)
        for v in ended[: max(0, len(ended) - MAX_ENDED_VERSIONS)]:
            del statuses[v]
        model.statuses = statuses

    def _sync(self, model: _Model) -> None:
        config = model.config
        on_disk = version_dirs(config.base_path)
        if not on_disk and not model.warned_missing:
            log.warning("model '%s': no version directories under %s yet", config.name, config.base_path)
        model.warned_missing = not on_disk
        for version in list(model.failed):  # retry failed versions whose directory changed
            if version not in on_disk or model.failed[version] != _fingerprint(on_disk[version]):
                del model.failed[version]
        while True:
            aspired = config.policy.select(v for v in on_disk if v not in model.failed)
            to_load = sorted(aspired - model.servables.keys(), reverse=True)
            if not to_load or self._stop.is_set():
                break
            self._load(model, to_load[0], on_disk[to_load[0]])
        for version in sorted(model.servables.keys() - aspired):
            model.servables = {v: s for v, s in model.servables.items() if v != version}
            self._set_status(model, version, VersionStatus(State.END))
            log.info("model '%s': version %d unloaded", config.name, version)

    def _load(self, model: _Model, version: int, path: str) -> None:
        name = model.config.name
        fingerprint = _fingerprint(path)
        self._set_status(model, version, VersionStatus(State.LOADING))
        start = time.perf_counter()
        try:
            servable = self._load_servable(name, version, path)
            warmed = servable.warm_up() if self._warmup else 0
        except Exception as e:  # a bad version must never take the server (or the old version) down
            code = e.code if isinstance(e, ServingError) else grpc.StatusCode.UNKNOWN
            log.error("model '%s': version %d at %s failed to load, skipped: %s", name, version, path, e)
            model.failed[version] = fingerprint
            self._set_status(model, version, VersionStatus(State.END, code, f"failed to load: {e}"))
            return
        model.servables = {**model.servables, version: servable}
        self._set_status(model, version, VersionStatus(State.AVAILABLE))
        log.info(
            "model '%s': version %d available (%.2fs, %d warm-up requests, signatures %s)",
            name,
            version,
            time.perf_counter() - start,
            warmed,
            sorted(servable.signatures),
        )
