import contextlib
import json
import os
import resource
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from petah.http import free_port  # noqa: F401  (the tests import it from here)

try:
    import torch
except ImportError:  # the device install (tests/test_device.py runs there): no build-side helper is used
    torch = None

os.environ.setdefault("PETAH_NO_PROGRESS", "1")
if torch is not None:
    torch.set_num_threads(min(2, os.cpu_count() or 1))

# one small model per family with a plan, at the smallest size its tests need
FAMILY_MODELS = [
    ("efficientformer_l1", 224),  # V1 runs only at 224
    ("efficientformerv2_s0", 64),
    ("mobilevit_xxs", 64),
    ("mobilevitv2_050", 64),
    ("fastvit_sa12", 64),
    ("fastvit_t8", 64),
    ("efficientvit_b0", 64),
    ("efficientvit_m0", 64),
    ("mobilenetv3_small_050", 64),
    ("mobilenetv2_050", 64),
    ("resnet10t", 64),
    ("vit_tiny_patch16_224", 32),
]


CLI_ENV = {**os.environ, "PETAH_NO_PROGRESS": "1"}


class CliServer:
    """``tests/cli_server.py``, started on first use: each command a forked child of one process
    that imported torch, timm, PEFT and petah once (see its doc)."""

    def __init__(self):
        import tempfile
        import threading

        self.proc = None
        self.lock = threading.Lock()
        self.folder = Path(tempfile.mkdtemp(prefix="petah-cli-"))

    def start(self) -> bool:
        if self.proc is None:
            self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("cli_server.py"))],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=CLI_ENV)
            if not self.proc.stdout.readline():  # it could not import what it preloads
                self.proc.wait()
        return self.proc.poll() is None

    def run(self, args: list[str], timeout: float) -> subprocess.CompletedProcess:
        import signal
        import threading

        with self.lock:
            out, err = self.folder / "stdout", self.folder / "stderr"
            request = {"args": args, "env": CLI_ENV, "cwd": os.getcwd(), "stdout": str(out), "stderr": str(err)}
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            pid = json.loads(self.proc.stdout.readline())["pid"]
            fired = []
            watchdog = threading.Timer(timeout, lambda: (fired.append(True), os.kill(pid, signal.SIGKILL)))
            watchdog.start()
            try:
                code = json.loads(self.proc.stdout.readline())["code"]  # the server answers once the child ended
            finally:
                watchdog.cancel()
            if fired:
                raise subprocess.TimeoutExpired(["petah", *args], timeout)
            return subprocess.CompletedProcess(["petah", *args], code, out.read_text(), err.read_text())


CLI_SERVER = CliServer()


def petah_process(*args, ok=True):
    """The CLI as a user runs it: a real process (exit codes, stderr and stdout as they are) — a
    fork of the tests' CLI server where torch is installed, else ``python -m petah``."""
    args = [str(a) for a in args]
    if torch is not None and CLI_SERVER.start():
        proc = CLI_SERVER.run(args, timeout=600)
    else:
        proc = subprocess.run([sys.executable, "-m", "petah", *args], capture_output=True, text=True, env=CLI_ENV,
                              timeout=600)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def one_json(proc) -> dict:
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout
    return json.loads(lines[0])


def make_pattern(label: int, size: int = 24, seed: int = 0) -> np.ndarray:
    """Class 0: horizontal stripes, class 1: vertical stripes, class 2: a bright square; plus noise."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, (size, size), dtype=np.int64)
    if label == 0:
        img[::4, :] += 180
    elif label == 1:
        img[:, ::4] += 180
    else:
        img[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] += 180
    return np.clip(img, 0, 255).astype(np.uint8)


def write_pattern_folder(root, per_class: int, seed: int = 100):
    """root/<class>/<n>.png with three visually distinct classes."""
    for label, name in enumerate(["hstripes", "vstripes", "square"]):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(make_pattern(label, seed=seed * label + i)).save(root / name / f"{i}.png")
    return root


def perturb_adapters(package, scale: float = 0.05) -> None:
    """Make every adapter tensor clearly non-zero (fresh LoRA B matrices are exactly zero)."""
    rng = np.random.default_rng(0)
    for key, value in package.tensors.items():
        if key.startswith("adapter/"):
            noise = rng.standard_normal(value.shape).astype(np.float32) * scale
            package.tensors[key] = (np.asarray(value, np.float32) + noise).astype(value.dtype)


@pytest.fixture
def image_folder(tmp_path):
    """Three visually distinct classes, 12 images each."""
    return write_pattern_folder(tmp_path / "shapes", 12)


def wake_zero_init_scales(model) -> None:
    """Random-init timm models zero (or 1e-5) some branch scales — EfficientViT-MSRA's attention
    BN, FastViT's layer scales — so an adapter there could not change the output; make them O(1)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.endswith("bias") and param.is_floating_point() and param.abs().max() < 1e-4:
                param.copy_(torch.rand(param.shape, generator=gen) * 0.5 + 0.5)


def untrained_and_trained(backbone, train, val, config, name="task"):
    """Metrics of a fresh head on the frozen backbone, and after adapting with the petah plan."""
    from petah import api
    from petah.plans import PlanConfig
    from petah.tasks import kind_for_data

    kind = kind_for_data(train)
    fresh = kind.build_model(backbone.model, kind.head_for(backbone, len(train.classes)))
    untrained = kind.evaluate(fresh, api.eval_loader(val, api.preprocess_for(backbone), kind), val.classes)
    return untrained, api.adapt(backbone, train, val, plan=PlanConfig(), config=config, task_name=name).metrics


# --- clients that hold sockets open (the front-door tests of the station and the hub) -----------------
@contextlib.contextmanager
def sockets_allowed(count: int):
    """Let this process open ``count`` sockets (the soft file limit raised), or skip."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < count + 256:
        pytest.skip(f"this process may open only {hard} files")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, count + 256), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def idle_and_slow_clients(url: str, idle: int, slow: int,
                          path: str = "/v1/predict") -> tuple[list[socket.socket], list[socket.socket]]:
    """``idle`` sockets that send nothing and ``slow`` ones that start a request and never end its headers."""
    host, port = url.split("//")[1].split(":")
    opened = [socket.create_connection((host, int(port)), timeout=5) for _ in range(idle + slow)]
    for sock in opened[idle:]:  # slowloris: a request whose headers never end
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: server\r\n".encode())
    return opened[:idle], opened[idle:]


def closed_by_server(sock: socket.socket, wait_s: float) -> bool:
    sock.settimeout(wait_s)
    try:
        return sock.recv(64) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def chromium_path() -> str | None:
    """Debian's Chromium (or PETAH_CHROMIUM): the page is tested in it through Playwright."""
    path = os.environ.get("PETAH_CHROMIUM") or "/usr/bin/chromium"
    return path if os.path.isfile(path) else None


@contextlib.contextmanager
def chromium_page():
    """A Playwright page in Chromium (30 s timeouts), closed on the way out."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.set_default_timeout(30_000)
            yield page
        finally:
            browser.close()


class FolderFetcher:
    """Serves a hub folder's files as its HTTP server would, to python-tuf's updater (the metadata
    checks need no network). A ``tuf.ngclient.FetcherInterface``, made when first used."""

    def __new__(cls, root):
        from urllib.parse import urlsplit

        from tuf.api import exceptions as tuf_errors
        from tuf.ngclient import FetcherInterface

        class Fetcher(FetcherInterface):
            def _fetch(self, url: str):
                path = root / urlsplit(url).path.lstrip("/")
                if not path.is_file():
                    raise tuf_errors.DownloadHTTPError("not found", 404)
                yield path.read_bytes()

        return Fetcher()




def fleet_station(backbone, tmp: Path, hub_url: str, hub_root: Path, trusted: Path, device: str, golden: Path,
                  engine: str = "torch", packages: tuple = ()):
    """A device registered with the hub at ``hub_root`` and its station started (torch engine, fast
    polls and health window, state in ``tmp/state-DEVICE``); returns its update agent."""
    import dataclasses

    from petah.fleet.agent import Agent
    from petah.fleet.hub import add_device
    from petah.serve import ServeConfig, Station

    token = tmp / f"{device}.token"
    add_device(hub_root, device, token)
    config = ServeConfig(hub=hub_url, trust_root=str(trusted), device_id=device, device_token_file=str(token),
                         golden=str(golden), health_window_s=0.1, poll_s=0.1, engine=engine, threads=1)
    stn = Station(backbone, tmp / f"state-{device}", config, packages=list(packages))
    stn.start()
    agent = Agent(stn)
    # these tests follow the rollout, not the gate's speed rule: two versions of one task timed on a
    # 30-image golden set differed by up to 1.14x on a loaded machine, near the 1.2x limit
    agent.rule = dataclasses.replace(agent.rule, max_slowdown=3.0)
    return agent
