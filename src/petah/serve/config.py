"""The station's settings, declared once: the ``petah serve`` options derive from these fields."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from petah.errors import PetahError
from petah.http import read_token
from petah.options import option
from petah.serve.capture import CaptureConfig
from petah.serve.drift import DriftConfig
from petah.serve.engine import ENGINES
from petah.serve.line import LineConfig


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class ServeConfig:
    host: str = option("127.0.0.1", cli="--host", help="Address to bind; anything but loopback needs --token-file.")
    port: int = option(8000, cli="--port", help="TCP port (0: any free port, printed at start).")
    max_batch: int = option(16, cli="--max-batch",
                            help="Most images one inference batch gathers from concurrent requests (1: no batching).")
    max_wait_ms: float = option(5.0, cli="--max-wait-ms",
                                help="Longest a request waits for others to join its batch.")
    queue_size: int = option(64, cli="--queue-size",
                             help="Requests waiting for inference before new ones get 503 with Retry-After.")
    max_upload_mb: float = option(16.0, cli="--max-upload-mb",
                                  help="Largest request body (images or a package); larger ones get 413.")
    max_images: int = option(32, cli="--max-images", help="Most images one /v1/predict request may carry.")
    max_request_mp: float = option(16.0, cli="--max-request-mp",
                                   help="Most megapixels the images of one request may hold together (checked "
                                        "from their headers before decoding: dense tasks work at full size).")
    engine: str = option("auto", cli="--engine",
                         help="device (a device backbone folder: numpy merge + ONNX Runtime, no torch), torch (one "
                              "backbone, adapters unmerged: least memory), onnx (ONNX Runtime, one merged graph per "
                              "task) or auto (device for a device folder; else onnx while the per-task graphs fit "
                              "--memory-budget-mb, else torch); see docs/deploy.md for the measurements.")
    memory_budget_mb: float = option(512.0, cli="--memory-budget-mb",
                                     help="Weights the tasks may hold. Device engine: the busiest tasks are held "
                                          "merged (fastest, a backbone's weights each) while they fit, the rest on "
                                          "one shared base graph (about their package each, ~2x slower), re-decided "
                                          "by traffic; 0: every task merged. --engine auto on a torch backbone: onnx "
                                          "while its per-task graphs fit. ONNX Runtime's resident memory is about "
                                          "1.2-2.5x these weights (docs/deploy.md).")
    threads: int = option(0, cli="--threads",
                          help="Torch / ONNX Runtime threads for inference (0: one per CPU core). Leave cores "
                               "free for other busy processes: spinning threads slow both sides many-fold.")
    header_timeout_s: float = option(10.0, cli="--header-timeout-s",
                                     help="Seconds a client has to send a request's headers (from its first byte, "
                                          "or from connecting); idle and trickling sockets are closed after it.")
    max_connections: int = option(4096, cli="--max-connections",
                                  help="Open client sockets kept (capped by the file limit); past it a new "
                                       "connection closes the longest-idle one, so idle sockets cannot lock "
                                       "clients out.")
    top_k: int = option(3, cli="--top-k", help="Classes reported per image for classification tasks.")
    admin_token_file: str | None = option(None, cli="--admin-token-file",
                                          help="File holding the bearer token for PUT / rollback / DELETE of tasks "
                                               "(without it those endpoints are disabled).")
    token_file: str | None = option(None, cli="--token-file",
                                    help="File holding a bearer token every API endpoint requires (needed when "
                                         "--host is not loopback).")
    trust: str | None = option(None, cli="--trust",
                               help="Folder of trusted public keys (*.pub): signed packages must verify against "
                                    "them; unsigned ones load with a warning.")
    require_signed: bool = option(False, cli="--require-signed",
                                  help="Refuse every package not signed by a key in --trust.")
    hub: str | None = option(None, cli="--hub",
                             help="A petah hub URL: the station follows its releases (needs --trust-root, "
                                  "--device-id, --device-token-file).")
    trust_root: str | None = option(None, cli="--trust-root",
                                    help="The hub's trusted TUF root metadata (root.json) this station is provisioned "
                                         "with.")
    device_id: str | None = option(None, cli="--device-id", help="This station's id at the hub.")
    device_token_file: str | None = option(None, cli="--device-token-file",
                                           help="File with this station's hub token (from petah hub add-device).")
    golden: str | None = option(None, cli="--golden",
                                help="Folder of golden sets (GOLDEN/TASK/ in the task's data format): a release must "
                                     "score within --gate-tolerance of the current version on it.")
    gate_tolerance: float = option(1.0, cli="--gate-tolerance",
                                   help="Points a release may score below the current version on the golden set.")
    poll_s: float = option(30.0, cli="--poll-s", help="Seconds between hub polls (with ±50 % jitter).")
    health_window_s: float = option(30.0, cli="--health-window-s",
                                    help="Seconds a promoted release is watched before it counts as healthy.")
    allow_manual: bool = option(False, cli="--allow-manual",
                                help="With --hub: still accept admin uploads, rollbacks and deletes by hand.")
    ssl_keyfile: str | None = option(None, cli="--ssl-keyfile", help="TLS private key (PEM), for HTTPS.")
    ssl_certfile: str | None = option(None, cli="--ssl-certfile", help="TLS certificate (PEM), for HTTPS.")

    drift: DriftConfig = option(default_factory=DriftConfig,
                                help="The drift check's settings (its own options: --drift-window …).")
    capture: CaptureConfig = option(default_factory=CaptureConfig,
                                    help="What the station keeps for re-adaptation (its own options: --capture-dir …).")
    line: LineConfig = option(default_factory=LineConfig,
                              help="Camera streams, watched folders and result sinks (--source, --sink …).")

    def __post_init__(self):
        for label, value in (("--max-batch", self.max_batch), ("--queue-size", self.queue_size),
                             ("--max-images", self.max_images), ("--top-k", self.top_k)):
            if value < 1:
                raise PetahError(f"{label} must be at least 1, got {value}")
        if not 0 <= self.port <= 65535:
            raise PetahError(f"--port must be 0..65535, got {self.port}")
        if not 0 <= self.max_wait_ms <= 1000:
            raise PetahError(f"--max-wait-ms must be 0..1000, got {self.max_wait_ms}")
        if not 0 < self.max_request_mp <= 1000:
            raise PetahError(f"--max-request-mp must be in (0, 1000], got {self.max_request_mp}")
        if not 0 < self.max_upload_mb <= 1024:
            raise PetahError(f"--max-upload-mb must be in (0, 1024], got {self.max_upload_mb}")
        if self.engine not in ENGINES:
            raise PetahError(f"--engine must be one of {' | '.join(ENGINES)}, got {self.engine!r}")
        if not 0.1 <= self.header_timeout_s <= 600:
            raise PetahError(f"--header-timeout-s must be in [0.1, 600], got {self.header_timeout_s}")
        if self.max_connections < 16:
            raise PetahError(f"--max-connections must be at least 16, got {self.max_connections}")
        if not 0 <= self.memory_budget_mb <= 2**20:
            raise PetahError(f"--memory-budget-mb must be 0 (every task merged) or more, got {self.memory_budget_mb}")
        if self.threads < 0:
            raise PetahError(f"--threads must be 0 (one per core) or more, got {self.threads}")
        if not is_loopback(self.host) and not self.token_file:
            raise PetahError(f"--host {self.host} exposes the station beyond this machine: give --token-file "
                             "(a bearer token for every endpoint), and --ssl-keyfile / --ssl-certfile for HTTPS")
        if self.require_signed and not self.trust:
            raise PetahError("--require-signed needs --trust DIR (the keys a package must be signed with)")
        if bool(self.ssl_keyfile) != bool(self.ssl_certfile):
            raise PetahError("HTTPS needs both --ssl-keyfile and --ssl-certfile")
        if self.hub:
            missing = [flag for flag, value in (("--trust-root", self.trust_root), ("--device-id", self.device_id),
                                                ("--device-token-file", self.device_token_file)) if not value]
            if missing:
                raise PetahError(f"--hub needs {', '.join(missing)}")
            from petah.fleet.client import check_hub_url
            from petah.fleet.ids import check_device_id

            check_hub_url(self.hub)
            check_device_id(self.device_id)
        elif self.trust_root or self.device_id or self.device_token_file or self.golden or self.allow_manual:
            raise PetahError("--trust-root, --device-id, --device-token-file, --golden and --allow-manual go "
                             "with --hub")
        if not 0.05 <= self.poll_s <= 86400 or not 0 <= self.health_window_s <= 86400:
            raise PetahError("--poll-s must be in [0.05, 86400] and --health-window-s in [0, 86400]")
        if not 0 <= self.gate_tolerance <= 100:
            raise PetahError(f"--gate-tolerance must be 0..100 points, got {self.gate_tolerance}")
        for label, path in (("--admin-token-file", self.admin_token_file), ("--token-file", self.token_file),
                            ("--ssl-keyfile", self.ssl_keyfile), ("--ssl-certfile", self.ssl_certfile),
                            ("--trust-root", self.trust_root), ("--device-token-file", self.device_token_file)):
            if path and not os.path.isfile(path):
                raise PetahError(f"{label} {path}: no such file")
        if self.golden and not os.path.isdir(self.golden):
            raise PetahError(f"--golden {self.golden}: not a folder")
        # read now: a bad token file fails before anything loads
        _ = (self.api_token, self.admin_token, self.device_token)

    @property
    def api_token(self) -> str | None:
        return read_token(self.token_file, "--token-file")

    @property
    def admin_token(self) -> str | None:
        return read_token(self.admin_token_file, "--admin-token-file")

    @property
    def device_token(self) -> str | None:
        return read_token(self.device_token_file, "--device-token-file")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def inference_threads(self) -> int:
        return self.threads or os.cpu_count() or 1


__all__ = ["ENGINES", "ServeConfig", "is_loopback", "read_token"]
