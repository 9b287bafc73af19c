"""The engine core and its ports: one logic, transports that only move calls and bytes.

The behaviour of both engines is tested in test_engine.py (in process) and
test_engine_ray.py (on Ray); this file checks the structure those rely on:
imports inside ekko.engine point one way (lazy ones included), and the
in-process transport implements the declared ports (the Ray one is checked
in test_engine_ray.py, in the shared Ray session).
"""

from __future__ import annotations

import ast
import threading
from pathlib import Path

import numpy as np
import pytest

import ekko
import ekko.engine
from ekko.engine.ports import LinkPrimary, LinkReplica, PrimaryPort, ReplicaPort, Transport
from ekko.kernels.errors import EkkoError

ENGINE = Path(ekko.engine.__file__).parent

MODEL = """
model tiny {
  defaults { dim 8; dtype f32; optimizer sgd(lr=0.1); }
  table a { rows 100; serving f32; }
  feature fa -> a pooling sum;
}
"""


def _module(path: Path) -> str:
    parts = path.relative_to(ENGINE).with_suffix("").parts
    return ".".join(("ekko", "engine") + tuple(p for p in parts if p != "__init__"))


def _imports(path: Path) -> set[str]:
    """The ekko.engine modules `path` imports anywhere (functions included), except under
    `if TYPE_CHECKING:` (annotations only: never run)."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
            and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
            for n in ast.walk(node)}
    package = _module(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip or not isinstance(node, ast.ImportFrom):
            continue
        base = package[:len(package) - node.level + 1] if node.level else []
        name = ".".join(base + ([node.module] if node.module else []))
        if not name.startswith("ekko.engine"):
            continue
        for alias in node.names:  # `from . import x` may name a module
            sub = f"{name}.{alias.name}"
            out.add(sub if (ENGINE / Path(*sub.split(".")[2:])).with_suffix(".py").exists()
                    or (ENGINE / Path(*sub.split(".")[2:])).is_dir() else name)
    return out


def test_engine_imports_point_one_way() -> None:
    """No import cycle inside ekko.engine, lazy imports included (issue #18 item 5: the
    engine built its Ray subclass in __new__ and that subclass imported the engine)."""
    graph = {_module(p): _imports(p) - {_module(p)} for p in ENGINE.rglob("*.py")}
    graph = {m: {d for d in deps if d in graph and not m.startswith(d + ".")}
             for m, deps in graph.items()}  # a package's own __init__ is not a dependency
    done: set[str] = set()

    def visit(m: str, path: list[str]) -> None:
        if m in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if m in done:
            return
        for d in sorted(graph[m]):
            visit(d, path + [m])
        done.add(m)

    for m in sorted(graph):
        visit(m, [])
    assert "ekko.engine.cluster" in graph["ekko.engine.engine"]  # the scan sees lazy imports
    for transport in ("ekko.engine.local", "ekko.engine.cluster.transport"):
        assert "ekko.engine.engine" not in graph[transport]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("core") / "tiny.ekko"
    path.write_text(MODEL)
    return ekko.compile_model(path)


def test_the_in_process_transport_implements_the_ports(model) -> None:
    with ekko.Engine(model, replicas=2) as engine:
        assert type(engine) is ekko.Engine
        t = engine.transport
        assert isinstance(t, Transport) and isinstance(t.primary_port, PrimaryPort)
        assert all(isinstance(r, ReplicaPort) for r in t.replica_ports)
        for link in engine.links:
            assert isinstance(link.primary, LinkPrimary) and isinstance(link.replica, LinkReplica)
        engine.step("a", [1, 2], np.ones((2, 8), np.float32))
        engine.flush()
        assert engine.check() is True
        with pytest.raises(EkkoError, match="checkpoint\\(\\) needs cluster="):
            engine.checkpoint()
        s = engine.stats()
        assert s["steps"] == 1 and s["checks"] == 1 and s["failed_checks"] == 0
        assert s["check_skipped"] == [] and s["replicas"][0]["link_recoveries"] == 0


def test_unknown_options_and_cluster_only_options_without_a_cluster(model) -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument 'replica'"):
        ekko.Engine(model, replica=2)
    with pytest.raises(EkkoError, match="fsync, primary_shards: only with cluster="):
        ekko.Engine(model, primary_shards=2, fsync=False)
    with pytest.raises(EkkoError, match="replicas must be a positive integer, got True"):
        ekko.Engine(model, replicas=True)


def test_an_absurd_replica_count_is_refused_before_anything_is_built(model) -> None:
    """A million replicas would each copy every table: refused up front, naming the
    limit, in process, with regions and on Ray alike (nothing is started)."""
    before = threading.active_count()
    for kwargs in ({"replicas": 10**6}, {"regions": {"eu": 1, "us": 10**9}, "primary_region": "eu"},
                   {"replicas": 10**6, "cluster": "local"}):
        with pytest.raises(EkkoError, match="MAX_REPLICAS = 1024"):
            ekko.Engine(model, **kwargs)
    assert threading.active_count() == before
