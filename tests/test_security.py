"""Untrusted files and configs: nothing in them runs, listens or leaks.

- a checkpoint carrying a pickled callable is refused by every loader of ours (library, CLI,
  pipeline, resume points, submit, report) in one line, and the callable provably never ran;
- the source itself: every ``torch.load`` passes ``weights_only=True`` and every unpickling goes
  through a restricted unpickler (read with ``ast``, so comments and strings cannot fool it);
  the CIFAR unpickler's allowlist is pinned;
- every cluster config that starts a server binds it to loopback unless the config says otherwise;
- a config holding a secret-looking key is refused: credentials come from the environment.
"""
from __future__ import annotations

import ast
import builtins
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
import yaml

from elastictrain import checkpoint
from elastictrain.checkpoint import UnsafeCheckpoint
from elastictrain.data import cifar
from elastictrain.models import build_model
from elastictrain.train.loop import TorchStepper
from jobs.cluster import RayConfig, load_cluster
from pipeline import resume
from pipeline.cli import main

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_data = pytest.mark.skipif(not FMNIST.is_file(),
                                reason="Fashion-MNIST missing: apt-get install dataset-fashion-mnist")


# --- (a) pickled callables --------------------------------------------------------------------------

class SystemCall:
    """Unpickles as ``os.system("touch MARKER")``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class Exec:
    """Unpickles as ``exec("open(MARKER, 'w').close()")``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.fixture(params=[SystemCall, Exec], ids=["os.system", "exec"])
def evil(request, tmp_path):
    """(a factory writing a tampered checkpoint at a path, the marker its payload would create)."""
    marker = tmp_path / "PAYLOAD-RAN"

    def write(path: Path, finished: bool = True) -> Path:
        sd = build_model("smallcnn", num_classes=10, in_channels=1).state_dict()
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"format": checkpoint.FORMAT, "model_state_dict": sd, "model": "smallcnn", "num_classes": 10,
                    "in_channels": 1, "local_dict": {"epoch": 1, "finished": finished, "note": request.param(marker)}},
                   path)
        return path

    probe = write(tmp_path / "probe.pt")  # the payload is live: an unsafe load runs it …
    torch.load(probe, weights_only=False)
    assert marker.exists()
    marker.unlink()
    return write, marker


def _pipeline(tmp: Path) -> Path:
    path = tmp / "pipeline.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny", "model": {"name": "smallcnn"},
        "data": {"name": "fashion-mnist", "batch_size": 80, "limit_train": 200, "limit_test": 100},
        "stages": [{"name": "dense_pretrain", "epochs": 1},
                   {"name": "progressive_prune", "epochs": 1, "spec": {"rules": [{"match": "classifier.0.weight",
                                                                                 "prune": {"ratio": 4}}]}}]}))
    return path


def _cluster(tmp: Path, **kw) -> str:
    path = tmp / "cluster.yaml"
    path.write_text(yaml.safe_dump({"name": "cpu", "kind": "single", "device": "cpu", "threads": 1, **kw}))
    return str(path)


def _cli(argv: list[str]) -> None:
    assert main([str(a) for a in argv]) == 2


def _library(fn):
    def call(tmp: Path) -> None:
        with pytest.raises(UnsafeCheckpoint):
            fn(tmp)
    return call


SPEC = ROOT / "configs/specs/smallcnn-prune.yaml"
LOADERS = {  # name -> (where the tampered file goes, relative to tmp; what reads it)
    "checkpoint.load": ("evil.pt", _library(lambda t: checkpoint.load(t / "evil.pt"))),
    "eval": ("evil.pt", lambda t: _cli(["eval", t / "evil.pt", "--model", "smallcnn"])),
    "compress": ("evil.pt", lambda t: _cli(["compress", t / "evil.pt", "--spec", SPEC, "--out", t / "out.pt"])),
    "verify": ("evil.pt", lambda t: _cli(["verify", t / "evil.pt", "--spec", SPEC])),
    "export": ("evil.pt", lambda t: _cli(["export", t / "evil.pt", "--out", t / "out.etz"])),
    "report": ("run/dense_pretrain/checkpoint.pt", lambda t: _cli(["report", t / "run", "--out", t / "rep"])),
    "submit": ("run/dense_pretrain/checkpoint.pt",
               lambda t: _cli(["submit", _pipeline(t), "--cluster", ROOT / "configs/clusters/slurm-2x8gpu.yaml",
                               "--out", t / "run", "--dry-run"])),
    "resume point": ("point/state.pt", _library(lambda t: resume.load_state(t / "point"))),
    "resume engine": ("point/engine.pt", _library(lambda t: TorchStepper(
        torch.nn.Linear(2, 2), torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), 0.1), None).load(t / "point"))),
    "pipeline": ("run/dense_pretrain/checkpoint.pt",
                 lambda t: _cli(["run", _pipeline(t), "--cluster", _cluster(t), "--out", t / "run"])),
}


@pytest.mark.parametrize("loader", [pytest.param(k, marks=needs_data if k == "pipeline" else ()) for k in LOADERS])
def test_a_pickled_callable_is_refused_by_every_loader_and_never_runs(loader, evil, tmp_path, capsys):
    write, marker = evil
    where, read = LOADERS[loader]
    path = write(tmp_path / where)
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    capsys.readouterr()
    read(tmp_path)
    err = capsys.readouterr().err.strip()
    if err:  # the CLI: one line naming the file
        assert "\n" not in err and err.startswith(f"elastictrain: error: {path}: not a readable checkpoint: unpickling "
                                                  "it would call"), err
    assert not marker.exists()  # the payload never ran
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before  # refused, not overwritten by a rerun
    assert not (tmp_path / "out.pt").exists() and not (tmp_path / "out.etz").exists()


def test_the_cifar_unpickler_refuses_callables(tmp_path):
    marker = tmp_path / "PAYLOAD-RAN"
    for payload in (SystemCall(marker), Exec(marker)):
        path = tmp_path / "data_batch_1"
        path.write_bytes(pickle.dumps({b"data": payload, b"labels": [0]}, protocol=2))
        with pytest.raises(ValueError, match=r"data_batch_1: refusing to load (posix\.system|__builtin__\.exec)"):
            cifar.safe_load(path)
        assert not marker.exists()


def test_the_cifar_unpickler_allows_only_what_the_files_need():
    """Pinned: numpy's array reconstruction and the byte-string helpers, nothing that runs code
    or reaches another module. Widening this list is a security decision, made here."""
    assert set(cifar._ALLOWED) == {("numpy.core.multiarray", "_reconstruct"),
                                   ("numpy._core.multiarray", "_reconstruct"),
                                   ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
                                   ("__builtin__", "bytes"), ("builtins", "bytes")}
    assert cifar.SafeUnpickler.find_class is not pickle.Unpickler.find_class


# --- (b) the source: how files are unpickled -----------------------------------------------------------

UNSAFE_CALLS = {"pickle.load", "pickle.loads", "_pickle.load", "_pickle.loads", "pickle.Unpickler",
                "_pickle.Unpickler", "dill.load", "dill.loads", "cloudpickle.load", "cloudpickle.loads",
                "marshal.load", "marshal.loads", "shelve.open", "joblib.load", "yaml.unsafe_load", "yaml.full_load",
                "yaml.load_all", "yaml.unsafe_load_all", "yaml.full_load_all"}
TORCH_LOADS = {"torch.load", "torch.serialization.load"}


def _dotted(node) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def unsafe_loads(source: str, filename: str = "<source>") -> list[str]:
    """Every place ``source`` could unpickle untrusted bytes: ``torch.load`` without a literal
    ``weights_only=True``, pickle-family loads outside a restricted unpickler (a subclass of
    ``pickle.Unpickler`` that overrides ``find_class``), ``numpy.load(allow_pickle=True)``,
    ``yaml.load`` without a safe loader — and any of those taken as a value (an alias)."""
    tree = ast.parse(source, filename)
    names: dict[str, str] = {}  # local name -> the dotted name it was imported as
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.partition(".")[0]] = a.name if a.asname else a.name.partition(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"

    def full(node) -> str | None:
        d = _dotted(node)
        if d is None:
            return None
        head, dot, rest = d.partition(".")
        return names.get(head, head) + dot + rest

    restricted = {c.name for c in ast.walk(tree) if isinstance(c, ast.ClassDef)
                  and any(full(b) in ("pickle.Unpickler", "_pickle.Unpickler") for b in c.bases)
                  and any(isinstance(f, ast.FunctionDef) and f.name == "find_class" for f in c.body)}
    called = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    problems = []
    for node in ast.walk(tree):
        at = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.ClassDef) and node.name not in restricted and any(
                full(b) in ("pickle.Unpickler", "_pickle.Unpickler") for b in node.bases):
            problems.append(f"{at}: {node.name} subclasses pickle.Unpickler without overriding find_class")
        if isinstance(node, (ast.Name, ast.Attribute)) and id(node) not in called and isinstance(node.ctx, ast.Load):
            if full(node) in TORCH_LOADS | (UNSAFE_CALLS - {"pickle.Unpickler", "_pickle.Unpickler"}):
                problems.append(f"{at}: {full(node)} taken as a value (an alias escapes this check)")
        if not isinstance(node, ast.Call):
            continue
        name, kw = full(node.func), {k.arg: k.value for k in node.keywords}
        literal = lambda key, value: isinstance(kw.get(key), ast.Constant) and kw[key].value is value  # noqa: E731
        if name in TORCH_LOADS and not literal("weights_only", True):
            problems.append(f"{at}: {name} without weights_only=True")
        elif name in UNSAFE_CALLS:
            problems.append(f"{at}: {name}")
        elif name in ("numpy.load", "np.load") and not (literal("allow_pickle", False) or "allow_pickle" not in kw):
            problems.append(f"{at}: numpy.load with allow_pickle")
        elif name == "yaml.load" and full(kw.get("Loader")) not in ("yaml.SafeLoader", "yaml.CSafeLoader"):
            problems.append(f"{at}: yaml.load without a safe Loader")
        elif (isinstance(node.func, ast.Attribute) and node.func.attr == "load"
              and isinstance(node.func.value, ast.Call)
              and isinstance(node.func.value.func, ast.Name) and node.func.value.func.id not in restricted
              and full(node.func.value.func).endswith("Unpickler")):
            problems.append(f"{at}: {full(node.func.value.func)}(…).load() is not a restricted unpickler")
    return problems


SOURCES = sorted(p for d in ("elastictrain", "pipeline", "jobs", "bench") for p in (ROOT / d).rglob("*.py"))


def test_every_load_in_our_source_is_weights_only_or_restricted():
    assert len(SOURCES) > 40
    problems = [p for path in SOURCES for p in unsafe_loads(path.read_text(), str(path.relative_to(ROOT)))]
    assert problems == []
    # the checker sees the loads that are there (so an empty list above means something)
    found = [p for path in SOURCES
             for p in unsafe_loads(path.read_text().replace("weights_only=True", "weights_only=False"))]
    assert len(found) >= 1


@pytest.mark.parametrize("snippet", [
    "import torch\ntorch.load(p)  # weights_only=True\n",
    "import torch\ntorch.load(p, weights_only=False)\n",
    "import torch\ntorch.load(p, weights_only=flag)\n",
    "from torch import load as tl\ntl(p, map_location='cpu')\n",
    "import torch as T\nT.serialization.load(p)\n",
    "import torch\nread = torch.load\n",
    "import pickle\npickle.loads(b)\n",
    "from pickle import load\nload(f)\n",
    "import pickle\npickle.Unpickler(f).load()\n",
    "import pickle\nclass U(pickle.Unpickler):\n    pass\nU(f).load()\n",
    "import numpy as np\nnp.load(p, allow_pickle=True)\n",
    "import yaml\nyaml.load(s, Loader=yaml.Loader)\n",
    "import yaml\nyaml.unsafe_load(s)\n",
    's = "torch.load(p, weights_only=True)"\nimport torch\ntorch.load(p)\n',
])
def test_the_checker_catches_unsafe_loads(snippet):
    assert unsafe_loads(snippet)


def test_the_checker_passes_safe_loads():
    safe = ("import torch, pickle, yaml, numpy as np\n"
            "torch.load(p, map_location='cpu', weights_only=True)\n"
            "class R(pickle.Unpickler):\n    def find_class(self, m, n):\n        raise ValueError(m)\n"
            "R(f).load()\nyaml.safe_load(s)\nyaml.load(s, Loader=yaml.SafeLoader)\nnp.load(p)\n")
    assert unsafe_loads(safe) == []


# --- (c) servers bind loopback ------------------------------------------------------------------------

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
CLUSTERS = sorted((ROOT / "configs/clusters").glob("*.yaml"))


def server_binding_problems(path: Path) -> list[str]:
    """Servers a cluster config starts that bind beyond loopback without saying so — a comment on
    the line that sets the address. ``kind: ray`` with ``address: local`` starts Ray and its
    dashboard in-process (``ray.dashboard_host``); a multi-node Slurm job starts a Ray head whose
    dashboard binds ``$DASHBOARD_HOST`` (default 127.0.0.1, see slurm/ray-cluster.sh), which
    ``slurm.setup`` may export."""
    cluster = load_cluster(path)
    lines = path.read_text().splitlines()

    def says_so(key: str) -> bool:
        return any(key in line and "#" in line.split(key, 1)[1] for line in lines)

    problems = []
    if cluster.kind == "ray" and cluster.ray.address == "local":
        host = cluster.ray.dashboard_host
        if host not in LOOPBACK and not says_so("dashboard_host"):
            problems.append(f"{path.name}: ray.dashboard_host: {host}")
    if cluster.kind == "slurm" and cluster.slurm.nodes > 1:
        for line in cluster.slurm.setup:
            m = re.search(r"DASHBOARD_HOST=([^\s;]+)", line)
            if m and m.group(1).strip("'\"") not in LOOPBACK and not says_so("DASHBOARD_HOST"):
                problems.append(f"{path.name}: slurm.setup: {line}")
    return problems


def _starts_servers(path: Path) -> bool:
    c = load_cluster(path)
    return (c.kind == "ray" and c.ray.address == "local") or (c.kind == "slurm" and c.slurm.nodes > 1)


def test_cluster_configs_that_start_servers_bind_loopback():
    assert RayConfig().dashboard_host in LOOPBACK  # the default every config inherits
    assert '--dashboard-host="${DASHBOARD_HOST:-127.0.0.1}"' in (ROOT / "slurm/ray-cluster.sh").read_text()
    assert sum(map(_starts_servers, CLUSTERS)) >= 2  # the check below is about something
    assert [p for path in CLUSTERS for p in server_binding_problems(path)] == []


@pytest.mark.parametrize("text,flagged", [
    ("kind: ray\nray: {address: local, dashboard_host: 0.0.0.0}\n", True),
    ("kind: ray\nray:\n  address: local\n  dashboard_host: 0.0.0.0   # reachable from the lab VPN on purpose\n", False),
    ("kind: ray\nray: {address: 127.0.0.1:6379, dashboard_host: 0.0.0.0}\n", False),  # starts nothing
    ("kind: slurm\nslurm:\n  nodes: 2\n  setup: ['export DASHBOARD_HOST=0.0.0.0']\n", True),
    ("kind: slurm\nslurm:\n  nodes: 2\n  setup:\n"
     "    - export DASHBOARD_HOST=0.0.0.0  # behind the site firewall\n", False),
])
def test_the_binding_check_flags_what_it_should(tmp_path, text, flagged):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert bool(server_binding_problems(path)) == flagged


# --- (d) secrets stay in the environment -----------------------------------------------------------------

@pytest.mark.parametrize("where,edit,field", [
    ("pipeline", lambda c: c["tracking"]["wandb"].update(api_key="abc123"), "tracking.wandb.api_key"),
    ("pipeline", lambda c: c.update(WANDB_API_KEY="abc123"), "WANDB_API_KEY"),
    ("pipeline", lambda c: c["data"].update(password="hunter2"), "data.password"),
    ("pipeline", lambda c: c["stages"][0].update(hf_token="abc"), "stages[0].hf_token"),
    ("pipeline", lambda c: c["stages"][1]["spec"]["rules"][0].update(secret="x"), "stages[1].spec.rules[0].secret"),
    ("cluster", lambda c: c.update(ray={"address": "local", "token": "abc"}), "ray.token"),
    ("cluster", lambda c: c.update(client_secret="abc"), "client_secret"),
    ("set", None, "tracking.wandb.api_key"),
])
def test_a_secret_in_a_config_is_refused(tmp_path, capsys, where, edit, field):
    pipe = _pipeline(tmp_path)
    cfg = yaml.safe_load(pipe.read_text())
    cfg["tracking"] = {"wandb": {"mode": "disabled"}}
    clu = {"name": "cpu", "kind": "ray" if where == "cluster" else "single", "device": "cpu"}
    if edit is not None:
        edit(cfg if where == "pipeline" else clu)
    pipe.write_text(yaml.safe_dump(cfg))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(clu))
    extra = ["--set", "tracking.wandb.api_key=abc123"] if where == "set" else []
    assert main(["run", str(pipe), "--cluster", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f": {field}: looks like a secret; keys and tokens come from the environment" in err, err
    assert "abc123" not in err and "hunter2" not in err  # the value is never echoed
    assert not (tmp_path / "run").exists()
